"""A minimal on-policy RL loop (GRPO-style group baselines, `importance_sampling` loss) over the primitives.

    python examples/rl_minimal.py --iterations 5

Each iteration: snapshot weights -> sample a group of answers per prompt (with sampler logprobs) -> grade
by code -> advantages = reward - group mean -> one `forward_backward(..., "importance_sampling")` + step.
Sampler logprobs are untempered model logprobs, so the importance ratio is exactly 1 on-policy.
"""

from __future__ import annotations

import argparse

import torch

from data.generators import score, train_eval
from training_core import ServiceClient, TrainingClient, types
from training_core.renderers import get_renderer


def rl_datum(prompt: list[int], sampled: list[int], logprobs: list[float], adv: float) -> types.Datum:
    tokens = prompt + sampled
    n_p = len(prompt)
    T = len(tokens) - 1
    lp = [0.0] * (n_p - 1) + list(logprobs)
    advantages = [0.0] * (n_p - 1) + [adv] * len(sampled)  # prompt positions carry no advantage
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:]), "logprobs": torch.tensor(lp[:T]),
                                       "advantages": torch.tensor(advantages[:T])})


def run(tc: TrainingClient, iterations: int, group: int, n_prompts: int, lr: float) -> list[float]:
    renderer = get_renderer("chat_template", tc.get_tokenizer())
    problems, _ = train_eval("addition", n_train=256, n_eval=1, seed=1, digits=1)
    rewards_per_iter = []
    for it in range(iterations):
        sampler = tc.save_weights_and_get_sampling_client()
        batch_rows = [problems[(it * n_prompts + i) % len(problems)] for i in range(n_prompts)]
        prompts = [renderer.build_generation_prompt(r["messages"][:-1]) for r in batch_rows]
        params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=it)
        outs = sampler.sample_batch(prompts, params, num_samples=group).result()
        data, rewards = [], []
        for row, prompt, out in zip(batch_rows, prompts, outs, strict=True):
            texts = [renderer.parse_response(s.tokens)[0]["content"] for s in out.sequences]
            r = [score(t, row["answer"]) for t in texts]
            rewards.extend(r)
            mean = sum(r) / len(r)
            for s, ri in zip(out.sequences, r, strict=True):
                if ri != mean:  # zero advantage contributes nothing
                    data.append(rl_datum(prompt.to_ints(), s.tokens, s.logprobs or [], ri - mean))
        if data:
            tc.forward_backward(data, "importance_sampling")
            tc.optim_step(types.AdamParams(learning_rate=lr)).result()
        rewards_per_iter.append(sum(rewards) / len(rewards))
        print(f"iter {it}: mean reward {rewards_per_iter[-1]:.3f} ({len(data)} datums with nonzero advantage)")
    return rewards_per_iter


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    tc = ServiceClient().create_lora_training_client(args.model, rank=16, seed=0)
    return run(tc, args.iterations, args.group, args.prompts, args.lr)


if __name__ == "__main__":
    main()
