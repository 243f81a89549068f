"""One TRL `SFTTrainer` run driven step by step over stdin/stdout (see `bench.train_sides.TrlSide`).

    python -m bench.trl_worker {fp32|bf16} {grad_ckpt 0|1} MAX_STEPS ROWS.pt

Before each optimizer step it waits for a line on stdin (EOF: stop); after it, it prints
``step <seconds from on_step_begin to on_step_end> <loss of the first step>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import torch


class _Stop(Exception):
    pass


def main(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.train_sides import ALPHA, LR, MODEL, RANK, TARGETS, B, T
    from training_core.model_loading import tune_malloc
    from training_core.presets import resolve_model_path

    tune_malloc()  # the allocator settings our engine applies to its process (and so to the plain loop's)

    precision, grad_ckpt, max_steps, rows_path = argv[0], argv[1] == "1", int(argv[2]), argv[3]
    rows_BT1 = torch.load(rows_path)
    os.unlink(rows_path)
    state = {"t0": 0.0, "loss": float("nan"), "seen_loss": False}

    class Baton(TrainerCallback):
        def on_step_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            if st.global_step == 0:
                print("ready", flush=True)  # set-up done: the parent starts the timed rounds after this
            if not sys.stdin.readline():
                raise _Stop
            state["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            dt = time.perf_counter() - state["t0"]
            print(f"step {dt:.6f} {state['loss']:.6f}", flush=True)

    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=max_steps, per_device_train_batch_size=B,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_length=T, packing=False,
        use_cpu=True, bf16=precision == "bf16", gradient_checkpointing=grad_ckpt,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    ids = rows_BT1[:, :T].tolist() * max_steps  # one epoch of max_steps batches of the same rows
    trainer = SFTTrainer(model=resolve_model_path(MODEL), args=cfg, peft_config=peft_cfg,
                         train_dataset=Dataset.from_dict({"input_ids": ids}), callbacks=[Baton()])
    compute_loss = trainer.compute_loss

    def first_loss(*a: Any, **k: Any) -> Any:  # logging is off: record the first step's loss here
        loss = compute_loss(*a, **k)
        if not state["seen_loss"]:
            state["loss"], state["seen_loss"] = float((loss[0] if isinstance(loss, tuple) else loss).detach()), True
        return loss

    trainer.compute_loss = first_loss  # type: ignore[method-assign]
    try:
        trainer.train()
    except _Stop:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
