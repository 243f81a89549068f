"""ZeRO-3 full fine-tuning of a ~100M-parameter Llama-style model: per-rank memory and step time, 1 vs 2 ranks.

    python -m bench.bench_zero3_memory            # ~3-5 min on 2 cores; merges into bench/results.json
    python -m bench.bench_zero3_memory --quick    # a ~10M model, for a smoke run (writes nothing)

The model is random-initialised from a config inside each rank under `deepspeed.zero.Init` (no download,
no checkpoint read, so no rank ever holds the full weights). Memory per rank:
- `peak_rss_mb`: the process's peak RSS (ru_maxrss) over the whole run;
- `baseline_rss_mb`: RSS once Python, torch, transformers, peft and DeepSpeed are imported and a tiny LoRA
  model has been trained on the same ranks (what every rank pays whatever the model);
- `peak_above_baseline_mb` = peak - baseline: parameters, gradients, fp32 master, Adam moments, gathered
  layers, activations. This is the number ZeRO-3 divides across ranks, and the headline ratio.
- `model_state_elems`: the elements of ZeRO's partitions held by the rank (parameter shard + fp32 master +
  Adam moments), exact: should be ~1/N of world size 1.
World size 1 runs with 2 threads, world size 2 with 1 thread per rank (the machine's 2 cores either way).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from training_core import types
from training_core.distributed import WorkerPool, create_distributed_training_client

# ~105M parameters: 14 layers x 7.47M (GQA attention 1.57M + SwiGLU MLP 5.90M) + 0.8M tied embedding.
CONFIG_100M: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 768, "intermediate_size": 2560, "num_hidden_layers": 14,
    "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 1024, "max_position_embeddings": 1024,
    "tie_word_embeddings": True, "seed": 0,
}
CONFIG_QUICK: dict[str, Any] = {**CONFIG_100M, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6,
                                "num_attention_heads": 4, "num_key_value_heads": 2}


def batch(step: int, n: int, seq_len: int) -> list[types.Datum]:
    g = torch.Generator().manual_seed(step)
    toks = torch.randint(5, 1000, (n, seq_len + 1), generator=g)
    return [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": t[1:]}) for t in toks]


def run(world_size: int, config: dict[str, Any], steps: int, n: int, seq_len: int) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    pool = WorkerPool(world_size, timeout_s=1200, threads_per_rank=max(1, cores // world_size))
    try:
        warm = create_distributed_training_client("tiny", world_size=world_size, zero_stage=3, pool=pool,
                                                  lora=types.LoraConfig(rank=2))
        warm.forward_backward(batch(0, world_size, 8)).result()
        warm.optim_step().result()
        baseline = [st["rss_mb"] for st in warm.memory_stats()]
        warm.close()
        t0 = time.perf_counter()
        tc = create_distributed_training_client("tiny", world_size=world_size, zero_stage=3, lora=None, pool=pool,
                                                model_config=config, timeout_s=1200)
        init_s = time.perf_counter() - t0
        built = [st["rss_mb"] for st in tc.memory_stats()]
        adam = types.AdamParams(learning_rate=1e-4, eps=1e-8, grad_clip_norm=1.0)
        times, losses = [], []
        for s in range(steps + 1):  # step 0 is warm-up (first-touch allocations, lazy optimizer state)
            t = time.perf_counter()
            fb = tc.forward_backward(batch(s, n, seq_len))
            tc.optim_step(adam).result()
            times.append(time.perf_counter() - t)
            losses.append(fb.result().metrics["loss:sum"] / (n * seq_len))
        stats = tc.memory_stats()
        n_params = tc._info["n_params"]
        tc.close()
    finally:
        pool.close()
    ranks = []
    for r, st in enumerate(stats):
        ranks.append({
            "peak_rss_mb": round(st["max_rss_mb"], 1),
            "baseline_rss_mb": round(baseline[r], 1),
            "peak_above_baseline_mb": round(st["max_rss_mb"] - baseline[r], 1),
            "rss_after_model_build_mb": round(built[r], 1),
            "model_state_elems": int(st["model_param_numel"] + st["fp32_master_numel"] + st["optimizer_state_numel"]),
        })
    return {"world_size": world_size, "n_params": n_params, "ranks": ranks, "init_s": round(init_s, 2),
            "step_times_s": [round(x, 3) for x in times[1:]], "step_time_s": round(statistics.median(times[1:]), 3),
            "mean_token_loss": [round(x, 4) for x in losses], "threads_per_rank": max(1, cores // world_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~10M model; print only, write nothing")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="datums per step (global, split over ranks)")
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    config = CONFIG_QUICK if args.quick else CONFIG_100M
    t0 = time.perf_counter()
    res = {ws: run(ws, config, args.steps, args.batch, args.seq_len) for ws in (1, 2)}
    one, two = res[1]["ranks"][0], res[2]["ranks"]
    worst = max(two, key=lambda rk: rk["peak_rss_mb"])
    figures = {
        "zero3_rank_peak_memory_ratio_ws2_vs_ws1": round(
            max(rk["peak_above_baseline_mb"] for rk in two) / one["peak_above_baseline_mb"], 3),
        "zero3_rank_peak_rss_ratio_ws2_vs_ws1_raw": round(worst["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "zero3_rank_model_state_ratio_ws2_vs_ws1": round(
            max(rk["model_state_elems"] for rk in two) / one["model_state_elems"], 3),
        "zero3_step_time_s_ws1": res[1]["step_time_s"],
        "zero3_step_time_s_ws2": res[2]["step_time_s"],
        "zero3_memory": {
            "model": {k: v for k, v in config.items() if k != "seed"}, "n_params": res[1]["n_params"],
            "batch": f"{args.batch} x {args.seq_len} tokens per step (global)", "steps_timed": args.steps,
            "ratio_definition": "max over ranks of (peak RSS - baseline RSS) at world size 2, divided by the same "
                                "at world size 1; baseline = RSS after imports + a tiny warm-up model",
            "ws1": res[1], "ws2": res[2], "wall_s": round(time.perf_counter() - t0, 1),
        },
    }
    from bench.common import merge_results

    print(f"model: {res[1]['n_params'] / 1e6:.1f}M params, ZeRO-3 full fine-tuning")
    for ws, r in res.items():
        for i, rk in enumerate(r["ranks"]):
            print(f"ws{ws} rank{i}: peak {rk['peak_rss_mb']:.0f} MiB (+{rk['peak_above_baseline_mb']:.0f} above a "
                  f"{rk['baseline_rss_mb']:.0f} MiB baseline), ZeRO state {rk['model_state_elems'] / 1e6:.1f}M elems, step {r['step_time_s']:.2f} s")
    for k, v in figures.items():
        if k != "zero3_memory":
            print(f"{k}: {v}")
    if args.quick:
        return
    print("merged into", merge_results(figures))


if __name__ == "__main__":
    main()
