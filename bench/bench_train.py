"""Training throughput: ours vs a plain PyTorch + peft loop vs TRL ``SFTTrainer``, interleaved in one run.

Same model (the ``tiny-30m`` preset, ~29M-param Llama), same LoRA (r=16, alpha=32, attention + MLP, no
unembedding, no dropout), same data (B=8 rows of T=256 seeded random tokens, every position trained), same
optimizer math (AdamW, lr 1e-4 constant, betas 0.9/0.999, eps 1e-8, no weight decay, no clipping). Sides:

- ``ours``: ``ServiceClient(compute_dtype, load_dtype)`` -> ``forward_backward(data, "cross_entropy")`` +
  ``optim_step`` per step, used as the Tinker pattern says (both submitted at once; the next batch's
  ``Datum`` objects are built while the engine computes); bf16 = bf16 base weights, fp32 LoRA + AdamW.
- ``plain_loop``: ``get_peft_model`` + ``model(input_ids).logits`` + ``F.cross_entropy`` + ``backward`` +
  ``torch.optim.AdamW``; bf16 = ``torch.autocast("cpu", bfloat16)`` over the fp32 model.
- ``trl``: ``SFTTrainer`` (``peft_config``, pre-tokenized ``input_ids`` of length 256, batch 8,
  ``use_cpu``, no eval / saving / logging) at its defaults otherwise, which include gradient checkpointing
  and fused AdamW: ``train_tokens_per_s_ratio_vs_trl``. ``trl_no_ckpt`` turns gradient checkpointing off
  (faster on CPU), reported as ``train_tokens_per_s_ratio_vs_trl_no_ckpt``. Packing is a no-op here (every
  row is exactly 256 tokens). TRL's step time is ``on_step_begin`` -> ``on_step_end`` (a TrainerCallback),
  which leaves out its data loading.

All sides live in one process and take turns, one step each per round (TRL's trainers run in threads that
a callback parks between steps), so load from other processes hits them alike; tokens/s = B*T / median
step time after ``--warmup`` rounds. A bf16 and an fp32 2048^3 ``torch.mm`` are timed in the same rounds
(the peak). Time to first step: fresh ``python -c`` processes, from spawn to the end of the first
optimizer step, ours and TRL alternating (both bf16: each side's best precision here).

    python -m bench.bench_train [--rounds 8] [--warmup 2] [--ttfs-repeats 2] [--sides ours,plain_loop] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

import torch  # noqa: E402

from bench.train_sides import (  # noqa: E402
    ALPHA,
    LR,
    MODEL,
    RANK,
    B,
    OursSide,
    PlainSide,
    Side,
    T,
    TrlSide,
    make_rows,
    model_flops_per_token,
)
from bench.ttfs import time_to_first_step  # noqa: E402

SIDE_NAMES = ("ours", "plain_loop", "trl", "trl_no_ckpt")
PEAK_N = 2048


def _mm_gflops(dtype: torch.dtype, reps: int = 3) -> float:
    a = torch.randn(PEAK_N, PEAK_N, dtype=dtype)
    b = torch.randn(PEAK_N, PEAK_N, dtype=dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return reps * 2 * PEAK_N**3 / (time.perf_counter() - t0) / 1e9


def build_sides(names: list[str], rows_BT1: torch.Tensor, max_steps: int,
                precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[Side]:
    sides: list[Side] = []
    for precision in precisions:
        if "ours" in names:
            sides.append(OursSide(precision, rows_BT1))
        if "plain_loop" in names:
            sides.append(PlainSide(precision, rows_BT1))
        if "trl" in names:
            sides.append(TrlSide(precision, rows_BT1, max_steps, grad_ckpt=True))
    if "trl_no_ckpt" in names and "bf16" in precisions:
        sides.append(TrlSide("bf16", rows_BT1, max_steps, grad_ckpt=False))
    return sides


def run(rounds: int = 8, warmup: int = 2, ttfs_repeats: int = 2, names: list[str] | None = None,
        precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    from training_core.presets import resolve_model_path

    names = list(names or SIDE_NAMES)
    path = resolve_model_path(MODEL)  # build/cache the preset outside every timing
    load_start = os.getloadavg()[0]
    ttfs = time_to_first_step(path, ttfs_repeats, with_trl=any(n.startswith("trl") for n in names)) \
        if ttfs_repeats > 0 else {}
    rows_BT1 = make_rows(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    sides = build_sides(names, rows_BT1, warmup + rounds, precisions)
    times: dict[str, list[float]] = {s.key: [] for s in sides}
    peak: dict[str, list[float]] = {"bf16": [], "fp32": []}
    try:
        for r in range(warmup + rounds):
            for s in sides:
                dt = s.step()
                if r >= warmup:
                    times[s.key].append(dt)
            if r >= warmup:
                peak["bf16"].append(_mm_gflops(torch.bfloat16))
                peak["fp32"].append(_mm_gflops(torch.float32))
            print(f"round {r + 1}/{warmup + rounds}: " + ", ".join(f"{s.key} {s.last:.2f}s" for s in sides),
                  flush=True)
    finally:
        for s in sides:
            s.close()
    tps = {k: B * T / statistics.median(v) for k, v in times.items()}
    peak_bf16, peak_fp32 = statistics.median(peak["bf16"]), statistics.median(peak["fp32"])
    flops_tok, n_mm, n_lora = model_flops_per_token(sides)
    res: dict[str, Any] = {f"train_tokens_per_s_{k}": round(v, 1) for k, v in tps.items()}
    best: dict[str, tuple[str, float]] = {}  # family -> (side at its best precision, tokens/s)
    for k, v in tps.items():
        fam = "trl_no_ckpt" if k.endswith("_no_ckpt") else k.rsplit("_", 1)[0]
        if fam not in best or v > best[fam][1]:
            best[fam] = (k, v)
    res.update({f"train_best_{fam}": k for fam, (k, _) in best.items()})
    for fam in ("trl", "plain_loop", "trl_no_ckpt"):  # trl: SFTTrainer as configured above (its defaults)
        if "ours" in best and fam in best:
            res[f"train_tokens_per_s_ratio_vs_{fam}"] = round(best["ours"][1] / best[fam][1], 3)
    res["matmul_peak_gflops_bf16"] = round(peak_bf16, 1)
    res["matmul_peak_gflops_fp32"] = round(peak_fp32, 1)
    if "ours" in best:
        res["train_fraction_of_bf16_peak"] = round(best["ours"][1] * flops_tok / 1e9 / peak_bf16, 3)
    res.update(ttfs)
    res["train_bench_setup"] = {
        "model": MODEL, "batch": B, "seq_len": T, "lora_rank": RANK, "lora_alpha": ALPHA, "lr": LR,
        "rounds": rounds, "warmup": warmup, "torch_threads": torch.get_num_threads(),
        "flops_per_token": flops_tok, "flops_formula": "4*N_linear + 6*N_lora (fwd 2N, bwd-activation 2N; "
        "LoRA fwd + bwd-activation + bwd-weight; attention scores not counted)",
        "n_linear_params": n_mm, "n_lora_params": n_lora,
        "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "step_s_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "first_loss": {s.key: round(s.first_loss, 4) for s in sides if s.first_loss is not None},
    }
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps per side")
    ap.add_argument("--ttfs-repeats", type=int, default=2, help="time-to-first-step runs per side (0: skip)")
    ap.add_argument("--sides", default=",".join(SIDE_NAMES), help=f"subset of {','.join(SIDE_NAMES)}")
    ap.add_argument("--precisions", default="fp32,bf16", help="subset of fp32,bf16")
    ap.add_argument("--no-write", action="store_true", help="do not merge into bench/results.json")
    args = ap.parse_args(argv)
    names = [n for n in args.sides.split(",") if n]
    unknown = sorted(set(names) - set(SIDE_NAMES))
    if unknown:
        ap.error(f"--sides: unknown {unknown}; choose from {SIDE_NAMES}")
    from bench.common import merge_results, print_table

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would drown the table
    except ImportError:
        pass
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores; absolute timings will be noisy "
              "(ratios are taken within one interleaved run)")
    res = run(args.rounds, args.warmup, args.ttfs_repeats, names, tuple(args.precisions.split(",")))
    setup = res["train_bench_setup"]
    print_table([{"side": k, "tokens/s (median)": res[f"train_tokens_per_s_{k}"],
                  "first loss": setup["first_loss"].get(k, ""), "step s": v}
                 for k, v in setup["step_s_all"].items()])
    keys = ("train_tokens_per_s_ratio_vs_trl", "train_tokens_per_s_ratio_vs_trl_no_ckpt",
            "train_tokens_per_s_ratio_vs_plain_loop",
            "train_fraction_of_bf16_peak", "matmul_peak_gflops_bf16", "matmul_peak_gflops_fp32",
            "time_to_first_step_s_ours", "time_to_first_step_s_trl")
    print_table([{"figure": k, "value": res[k]} for k in keys if k in res])
    if not args.no_write:
        print(f"wrote {merge_results(res)}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
