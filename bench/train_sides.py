"""The three training loops that bench_train compares; each `step()` runs one optimizer step, returns seconds.

Every side trains the same LoRA (r=16, alpha=32, q/k/v/o/gate/up/down, no dropout) on the same rows with the
same AdamW math; `first_loss` (mean CE per token of the first step) lets the caller check they do the same work.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

MODEL = "tiny-30m"
B, T = 8, 256
RANK, ALPHA, LR = 16, 32, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_rows(vocab: int = 8192, seed: int = 0) -> torch.Tensor:
    """(B, T+1) fixed random tokens: row[:T] is the input, row[1:] the targets (every position trained)."""
    return torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))


class Side:
    key: str = ""
    last: float = 0.0
    first_loss: float | None = None
    model: torch.nn.Module | None = None  # for the FLOP count

    def step(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _timed(self, fn: Any) -> float:
        t0 = time.perf_counter()
        loss = fn()
        self.last = time.perf_counter() - t0
        if self.first_loss is None:
            self.first_loss = float(loss)
        return self.last


class OursSide(Side):
    def __init__(self, precision: str, rows_BT1: torch.Tensor) -> None:
        from training_core import ServiceClient, types

        self.key = f"ours_{precision}"
        dt = "bfloat16" if precision == "bf16" else "float32"
        sc = ServiceClient(checkpoint_root=tempfile.mkdtemp(prefix="bench-train-"), compute_dtype=dt, load_dtype=dt)
        self.tc = sc.create_lora_training_client(MODEL, rank=RANK, lora_alpha=ALPHA, seed=0, train_unembed=False)
        self.adam = types.AdamParams(learning_rate=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        self.rows = rows_BT1.tolist()  # a user's data arrives as token lists
        self.types = types
        self.model = self.tc._engine.base.model
        self.next = self._batch()

    def _batch(self) -> list[Any]:
        t = self.types
        return [t.Datum(model_input=t.ModelInput.from_ints(r[:T]),
                        loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * T}) for r in self.rows]

    def _step(self) -> float:
        fb = self.tc.forward_backward(self.next, "cross_entropy")
        opt = self.tc.optim_step(self.adam)
        self.next = self._batch()  # prepare the next batch while the engine computes (Tinker's pattern)
        loss = fb.result().metrics["loss:sum"] / (B * T)
        opt.result()
        return loss

    def step(self) -> float:
        return self._timed(self._step)

    def lora_params(self) -> int:
        return sum(p.numel() for p in self.tc.trainable_parameters().values())


class PlainSide(Side):
    def __init__(self, precision: str, rows_BT1: torch.Tensor) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from training_core.presets import resolve_model_path

        self.key, self.precision = f"plain_loop_{precision}", precision
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        self.model = get_peft_model(base, cfg)
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=LR,
                                     betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.ids_BT, self.tgt_BT = rows_BT1[:, :T].contiguous(), rows_BT1[:, 1:].contiguous()

    def _step(self) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        with ctx:
            logits_BTV = self.model(input_ids=self.ids_BT).logits
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), self.tgt_BT.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step(self) -> float:
        return self._timed(self._step)


class TrlSide(Side):
    """`SFTTrainer.train()` in its own process (accelerate's state is a per-process singleton, so two
    trainers of different precision cannot share one); `bench.trl_worker` parks it before each step
    until `step()` writes a line, then reports the step time and, once, the first loss."""

    def __init__(self, precision: str, rows_BT1: torch.Tensor, max_steps: int, grad_ckpt: bool = True) -> None:
        import os
        import subprocess
        import sys
        from pathlib import Path

        self.key = f"trl_{precision}" + ("" if grad_ckpt else "_no_ckpt")
        repo = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.key}-", suffix=".log", delete=False)
        torch.save(rows_BT1, rows_path := tempfile.mktemp(prefix="bench-trl-rows-", suffix=".pt"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.trl_worker", precision, str(int(grad_ckpt)), str(max_steps), rows_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=repo,
        )
        self.model = None
        self._read("ready")  # let its set-up finish before anything is timed

    def _read(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        while line and not line.startswith(prefix):  # skip anything else the libraries print
            line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            with open(self.log.name, errors="replace") as fh:
                tail = fh.read()[-3000:]
            raise RuntimeError(f"{self.key}: the SFTTrainer worker exited (rc {rc}); its stderr ends:\n{tail}")
        return line

    def step(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        _, dt, loss = self._read("step ").split()
        self.last = float(dt)
        if self.first_loss is None:
            self.first_loss = float(loss)
        return self.last

    def close(self) -> None:
        import os

        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the worker stops before its next step
            try:
                self.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - never leave a worker behind
                self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


def model_flops_per_token(sides: list[Side]) -> tuple[int, int, int]:
    """(FLOPs per trained token, linear params, LoRA params) = 4 * N_linear + 6 * N_lora.

    N_linear counts every Linear weight of the base (attention, MLP, LM head; a tied head counts once):
    forward 2N and backward-activation 2N; the frozen weights get no weight gradient. LoRA factors cost
    2N each for forward, backward-activation and their own weight gradient. Attention scores are left out.
    """
    from torch import nn

    ours = next((s for s in sides if isinstance(s, OursSide)), None)
    model = (ours or sides[0]).model
    assert model is not None
    seen: set[int] = set()
    n_mm = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "lora_" not in name and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            n_mm += mod.weight.numel()
    n_lora = ours.lora_params() if ours else sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * n_mm + 6 * n_lora, n_mm, n_lora
