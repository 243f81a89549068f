"""The smallest supervised loop over tuneloop's primitives (rung 1 of the ladder; the full loop is
`recipes/sft.py`, the pipeline `flows/sft_pipeline.py`).

    python examples/sl_minimal.py --steps 60

Same calls as a tinker-cookbook script: only the import differs.
"""

from __future__ import annotations

import argparse

from data.generators import score, train_eval
from training_core import ServiceClient, types
from training_core.renderers import TrainOnWhat, datum_from_tokens_weights, get_renderer


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)

    service = ServiceClient()
    tc = service.create_lora_training_client(args.model, rank=32, seed=0)
    renderer = get_renderer("chat_template", tc.get_tokenizer())
    train, evl = train_eval("addition", n_train=1000, n_eval=64, seed=0, digits=2)
    data = [datum_from_tokens_weights(*renderer.build_supervised_example(r["messages"], TrainOnWhat.LAST_ASSISTANT_MESSAGE))
            for r in train]

    first = last = 0.0
    for step in range(args.steps):
        batch = [data[(step * args.batch_size + i) % len(data)] for i in range(args.batch_size)]
        fb = tc.forward_backward(batch, "cross_entropy")  # queued; runs while we build the next batch
        tc.optim_step(types.AdamParams(learning_rate=args.lr))
        tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        loss = fb.result().metrics["loss:sum"] / tokens
        first, last = (loss if step == 0 else first), loss
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss/token {loss:.4f}")

    sampler = tc.save_weights_and_get_sampling_client()
    prompts = [renderer.build_generation_prompt(r["messages"][:-1]) for r in evl]
    outs = sampler.sample_batch(prompts, types.SamplingParams(max_tokens=12, temperature=0.0)).result()
    texts = [renderer.parse_response(o.sequences[0].tokens)[0]["content"] for o in outs]
    acc = sum(score(t, r["answer"]) for t, r in zip(texts, evl, strict=True)) / len(evl)
    print(f"loss {first:.3f} -> {last:.3f}; held-out accuracy {acc:.2%}; e.g. {evl[0]['messages'][0]['content']!r} -> {texts[0]!r}")
    return {"first_loss": first, "last_loss": last, "accuracy": acc}


if __name__ == "__main__":
    main()
