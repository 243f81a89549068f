"""DPO step throughput: ours (`recipes.dpo`, one `forward_backward_custom` over chosen + rejected) vs TRL's
``DPOTrainer``, interleaved in one run.

Same model (``tiny-30m`` preset), same LoRA (r=16, alpha=32, q/k/v/o/gate/up/down, no unembedding, no
dropout), same data (8 pairs; each side of a pair = 64 prompt + 64 completion seeded random tokens, so 2 x 128
tokens per pair), same loss (sigmoid DPO, beta 0.1), same AdamW math (lr 1e-4 constant, betas 0.9/0.999, eps
1e-8, no weight decay, no clipping), same precision policy per row (bf16: ours = bf16 base weights + fp32 LoRA
through the engine's fused path, TRL = ``bf16=True`` autocast; fp32: both fp32).

Reference logprobs are counted the same way on both sides: computed ONCE before the timed steps (ours:
``recipes.dpo.sequence_logprobs`` = ``forward``; TRL: ``precompute_ref_log_probs=True``), left out of the step
time, and reported separately (``dpo_ref_pass_s_*``: seconds per 8 pairs, both sides timed over the same number
of copies of the pairs, since TRL's dataset repeats them once per step). TRL's step time is ``on_step_begin`` -> ``on_step_end``
(a TrainerCallback; its data loading is left out, in its favour); ours is ``forward_backward_custom`` +
``optim_step`` until both results are back. Each TRL trainer runs in its own process (parked by the callback
before each step); rounds alternate the sides so load from other processes hits them alike. tokens/s =
2 x 8 x 128 / median step time after ``--warmup`` rounds. ``trl`` runs at TRL's defaults (gradient checkpointing
on), ``trl_no_ckpt`` without it (its faster setting on CPU).

    python -m bench.bench_dpo [--rounds 6] [--warmup 2] [--precisions bf16] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

MODEL = "tiny-30m"
B, P, C = 8, 64, 64  # pairs per step, prompt tokens, completion tokens (each sequence P + C = 128)
RANK, ALPHA, LR, BETA = 16, 32, 1e-4, 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS_PER_STEP = 2 * B * (P + C)


def make_pairs(vocab: int = 8192, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(16, vocab, (B, P + 2 * C), generator=g).tolist()  # no special tokens
    return [{"prompt_ids": r[:P], "chosen_ids": r[P:P + C], "rejected_ids": r[P + C:]} for r in ids]


class Ours:
    def __init__(self, precision: str, pairs: list[dict[str, list[int]]], copies: int = 1) -> None:
        from recipes import dpo
        from recipes.preference_data import PreferencePair
        from training_core import ServiceClient, types

        dt = "bfloat16" if precision == "bf16" else "float32"
        self.sc = ServiceClient(checkpoint_root=tempfile.mkdtemp(prefix="bench-dpo-"), compute_dtype=dt, load_dtype=dt)
        self.tc = self.sc.create_lora_training_client(MODEL, rank=RANK, lora_alpha=ALPHA, seed=0, train_unembed=False)
        self.pairs = [PreferencePair(str(i), "bench", p["prompt_ids"], p["chosen_ids"], p["rejected_ids"])
                      for i, p in enumerate(pairs)]
        t0 = time.perf_counter()
        # the reference pass, over as many copies of the pairs as TRL's precompute sees (its dataset repeats
        # them once per step), per copy: first-call costs are spread the same way on both sides
        ref_B2 = dpo.sequence_logprobs(self.tc, self.pairs * copies, B)[:B]
        self.ref_s = (time.perf_counter() - t0) / copies
        self.loss_fn = dpo.make_loss_fn(ref_B2.float(), BETA)
        self.data = dpo.pair_datums(self.pairs)
        self.adam = types.AdamParams(learning_rate=LR, beta1=0.9, beta2=0.999, eps=1e-8)
        self.first_loss: float | None = None

    def step(self) -> float:
        t0 = time.perf_counter()
        fb = self.tc.forward_backward_custom(self.data, self.loss_fn)
        op = self.tc.optim_step(self.adam)
        loss = fb.result().metrics["loss:sum"]
        op.result()
        if self.first_loss is None:
            self.first_loss = loss
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sc.close()


class TrlProc:
    """A `--trl-worker` child process, one step per line on its stdin."""

    def __init__(self, precision: str, grad_ckpt: bool, steps: int, pairs_path: str) -> None:
        cmd = [sys.executable, "-m", "bench.bench_dpo", "--trl-worker", precision, str(int(grad_ckpt)), str(steps),
               pairs_path]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.ref_s = float(self._expect("ref")[0])
        self._expect("ready")
        self.first_loss: float | None = None

    def _expect(self, tag: str) -> list[str]:
        while True:
            line = self.p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"TRL worker exited before {tag!r}")
            parts = line.split()
            if parts and parts[0] == tag:
                return parts[1:]

    def step(self) -> float:
        self.p.stdin.write("go\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]
        dt, loss = self._expect("step")
        if self.first_loss is None:
            self.first_loss = float(loss)
        return float(dt)

    def close(self) -> None:
        self.p.stdin.close()  # type: ignore[union-attr]
        self.p.wait(timeout=120)


def trl_worker(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from training_core.model_loading import tune_malloc
    from training_core.presets import resolve_model_path

    tune_malloc()  # the allocator settings our engine applies to its own process
    precision, grad_ckpt, steps, path = argv[0], argv[1] == "1", int(argv[2]), argv[3]
    pairs = torch.load(path)
    state: dict[str, float] = {"t0": 0.0, "loss": float("nan")}

    class Stop(Exception):
        pass

    class Baton(TrainerCallback):
        def on_step_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            if st.global_step == 0:
                print("ready", flush=True)
            if not sys.stdin.readline():
                raise Stop
            state["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            print(f"step {time.perf_counter() - state['t0']:.6f} {state['loss']:.6f}", flush=True)

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *a: Any, **k: Any) -> Any:
            return dataset  # the same token ids as ours

        def _precompute_ref_logps(self, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            # the dataset repeats the 8 pairs once per step: report the pass over one copy of them, as ours
            print(f"ref {(time.perf_counter() - t0) / steps:.6f}", flush=True)
            return out

        def compute_loss(self, *a: Any, **k: Any) -> Any:
            loss = super().compute_loss(*a, **k)
            state["loss"] = float((loss[0] if isinstance(loss, tuple) else loss).detach())
            return loss

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-dpo-"), max_steps=steps,
                    per_device_train_batch_size=B, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                    max_grad_norm=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, beta=BETA,
                    precompute_ref_log_probs=True, precompute_ref_batch_size=B, max_length=None, use_cpu=True,
                    bf16=precision == "bf16", gradient_checkpointing=grad_ckpt, logging_strategy="no",
                    save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                    dataloader_num_workers=0, remove_unused_columns=False)
    peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    data = Dataset.from_list(pairs * steps)  # max_steps batches of the same 8 pairs
    trainer = PreTokenized(model=resolve_model_path(MODEL), args=cfg, peft_config=peft_cfg, train_dataset=data,
                           callbacks=[Baton()])
    try:
        trainer.train()
    except Stop:
        pass
    return 0


def run(rounds: int, warmup: int, precisions: list[str]) -> dict[str, Any]:
    pairs = make_pairs()
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    torch.save(pairs, path)
    figures: dict[str, Any] = {}
    try:
        for prec in precisions:
            sides: dict[str, Any] = {"ours": Ours(prec, pairs, copies=rounds + warmup + 1)}
            for name, ckpt in (("trl", True), ("trl_no_ckpt", False)):
                sides[name] = TrlProc(prec, ckpt, rounds + warmup + 1, path)
            times: dict[str, list[float]] = {k: [] for k in sides}
            for r in range(rounds + warmup):
                for k, s in sides.items():
                    dt = s.step()
                    if r >= warmup:
                        times[k].append(dt)
            for k, s in sides.items():
                med = statistics.median(times[k])
                figures[f"dpo_step_s_{k}_{prec}"] = med
                figures[f"dpo_tokens_per_s_{k}_{prec}"] = TOKENS_PER_STEP / med
                figures[f"dpo_ref_pass_s_{k}_{prec}"] = s.ref_s
                figures[f"dpo_first_loss_{k}_{prec}"] = s.first_loss
                s.close()
            ours = figures[f"dpo_tokens_per_s_ours_{prec}"]
            figures[f"dpo_step_tokens_per_s_ratio_vs_trl_{prec}"] = ours / figures[f"dpo_tokens_per_s_trl_{prec}"]
            figures[f"dpo_step_tokens_per_s_ratio_vs_trl_no_ckpt_{prec}"] = (
                ours / figures[f"dpo_tokens_per_s_trl_no_ckpt_{prec}"])
    finally:
        if os.path.exists(path):
            os.unlink(path)
    best = max(precisions, key=lambda p: figures[f"dpo_tokens_per_s_ours_{p}"])
    trl_best = max(precisions, key=lambda p: figures[f"dpo_tokens_per_s_trl_{p}"])
    # the headline takes each side at its best precision: written only by a run that measured bf16 (the best
    # of both sides here), so an fp32-only run does not overwrite it with a same-precision fp32 figure
    if "bf16" in precisions:
        figures["dpo_step_tokens_per_s_ratio_vs_trl"] = (figures[f"dpo_tokens_per_s_ours_{best}"]
                                                         / figures[f"dpo_tokens_per_s_trl_{trl_best}"])
    figures[f"dpo_bench_setup_{'_'.join(precisions)}"] = {"model": MODEL, "pairs": B, "tokens_per_sequence": P + C, "rounds": rounds,
                                  "warmup": warmup, "precisions": precisions, "best_ours": best,
                                  "best_trl": trl_best, "lora": {"rank": RANK, "alpha": ALPHA}, "beta": BETA,
                                  "ref_pass": "once before timing, both sides, excluded from step time",
                                  "loadavg_1m": round(os.getloadavg()[0], 2)}
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--trl-worker":
        return trl_worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precisions", default="bf16")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    figures = run(a.rounds, a.warmup, a.precisions.split(","))
    from bench.common import merge_results, print_table

    print_table([{"figure": k, "value": v} for k, v in figures.items() if not isinstance(v, dict)])
    if not a.no_write:
        print("wrote", merge_results(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
