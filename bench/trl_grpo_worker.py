"""One TRL `GRPOTrainer` run driven iteration by iteration over stdin/stdout (see `bench.bench_rl.TrlGrpoSide`).

    python -m bench.trl_grpo_worker CONFIG.json

CONFIG.json (written by the bench, deleted here): model path, prompts + answers (plain text, already rendered
with the chat template, so TRL tokenizes them exactly as our side does), groups, group size, max tokens,
LoRA, optimizer, precision, gradient checkpointing, torch threads, iterations.

Before each optimizer step the worker prints ``ready`` once, then waits for a line on stdin (EOF: stop); after
the step it prints ``step <step s> <sampling+scoring s> <completion tokens> <prompt tokens> <loss> <reward sum>``.
A step is one GRPO iteration: ``generation_batch_size == per_device_train_batch_size``, one gradient
accumulation step, ``num_iterations=1``, so each step generates, scores and trains on one fresh batch. The
sampling+scoring time wraps ``_generate_and_score_completions`` (tokenize, ``generate``, decode, rewards,
advantages); the step time is ``on_step_begin`` -> ``on_step_end`` (a TrainerCallback), as for the SFT bench.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any


class _Stop(Exception):
    pass


def grpo_config_kwargs(cfg: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """The GRPOConfig that matches our iteration: on-policy (num_iterations=1, one step per generation), no KL
    (beta=0), group-centred advantages without std scaling, ``dapo`` token-sum / active-token normalisation."""
    batch = cfg["groups"] * cfg["group_size"]
    return dict(
        output_dir=output_dir, max_steps=cfg["iterations"], per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, generation_batch_size=batch, num_generations=cfg["group_size"],
        num_iterations=1, beta=0.0, loss_type="dapo", scale_rewards="none",
        max_completion_length=cfg["max_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        # Exactly max_tokens new tokens on both sides (ours: stop=[]), so both train on the same token count.
        generation_kwargs={"min_new_tokens": cfg["max_tokens"]},
        learning_rate=cfg["lr"], lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, shuffle_dataset=False,
        use_cpu=True, bf16=cfg["precision"] == "bf16", gradient_checkpointing=cfg["grad_ckpt"],
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=0, dataloader_num_workers=0, log_completions=False,
    )


def main(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    with open(argv[0]) as fh:
        cfg = json.load(fh)
    os.unlink(argv[0])
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data.generators import score
    from training_core.model_loading import tune_malloc

    tune_malloc()  # the allocator settings our engine applies to its own process
    state: dict[str, Any] = {"t0": 0.0, "gen": 0.0, "n_c": 0, "n_p": 0, "loss": float("nan"), "r": 0.0}

    class Baton(TrainerCallback):
        def on_step_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            if st.global_step == 0:
                print("ready", flush=True)  # set-up done: the parent starts the rounds after this
            if not sys.stdin.readline():
                raise _Stop
            state["gen"] = 0.0
            state["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            dt = time.perf_counter() - state["t0"]
            print(f"step {dt:.6f} {state['gen']:.6f} {state['n_c']} {state['n_p']} {state['loss']:.6g} "
                  f"{state['r']:.6g}", flush=True)

    def reward(completions: list[str], answer: list[str], **kw: Any) -> list[float]:
        return [score(c, a) for c, a in zip(completions, answer, strict=True)]  # the recipe's grader

    out_dir = tempfile.mkdtemp(prefix="bench-trl-grpo-")
    args = GRPOConfig(**grpo_config_kwargs(cfg, out_dir))
    peft_cfg = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                          target_modules=cfg["targets"], task_type="CAUSAL_LM")
    # One row per prompt; TRL's RepeatSampler repeats each num_generations times, in order (no shuffling).
    ds = Dataset.from_dict({"prompt": cfg["prompts"], "answer": cfg["answers"]})
    trainer = GRPOTrainer(model=cfg["model_path"], reward_funcs=reward, args=args, train_dataset=ds,
                          peft_config=peft_cfg, callbacks=[Baton()])
    gen_and_score = trainer._generate_and_score_completions
    compute_loss = trainer.compute_loss

    def timed_gen(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = gen_and_score(*a, **k)
        state["gen"] += time.perf_counter() - t0
        state["n_c"] = int(out["completion_mask"].sum())
        state["n_p"] = int(out["prompt_mask"].sum())
        state["r"] = float(trainer._metrics["train"]["reward"][-1]) * len(out["completion_mask"])
        return out

    def loss_of(*a: Any, **k: Any) -> Any:
        loss = compute_loss(*a, **k)
        state["loss"] = float((loss[0] if isinstance(loss, tuple) else loss).detach())
        return loss

    trainer._generate_and_score_completions = timed_gen  # type: ignore[method-assign]
    trainer.compute_loss = loss_of  # type: ignore[method-assign]
    try:
        trainer.train()
    except _Stop:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
