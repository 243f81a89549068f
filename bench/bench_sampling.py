"""Sampling throughput: our ``sample_batch`` against Hugging Face ``generate``, same settings, one run.

Both sample with temperature 1, top_p 1, no top-k, at batch 16 with 32-token prompts and exactly 128 new
tokens (EOS ignored on both sides: ``stop=[]`` for ours, ``eos_token_id=None`` + ``min_new_tokens`` for HF).
The model is the ``tiny`` preset when ``training_core.presets`` can provide it, else a ~5M-param Llama built
here. Each side runs in fp32 and with bf16 weights (``model.to(bfloat16)``, what a user loading the model in
bf16 gets; our decoder then runs its projections as prepacked bf16 matmuls and attention in fp32). One
warm-up each, then ``--repeats`` timed rounds that alternate all four (so load from other processes hits them
alike); ``sample_tokens_per_s_ratio_vs_generate`` (goal: >= 2) is the ratio of the medians of each side at
its faster precision, and the same-precision ratios are reported beside it.

    python -m bench.bench_sampling [--threads N] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

import torch

BATCH, PROMPT_LEN, NEW_TOKENS = 16, 32, 128


def load_model() -> tuple[torch.nn.Module, str]:
    """The tiny preset if available, else a seeded ~5M-param Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    try:
        from training_core.presets import resolve_model_path

        path = resolve_model_path("tiny")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), "tiny"
    except Exception as e:  # noqa: BLE001 - any failure here just means "no preset": build one
        print(f"tiny preset unavailable ({type(e).__name__}: {e}); building a 5M Llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(cfg).eval(), "llama-5m"


def run(repeats: int = 3) -> dict[str, Any]:
    from training_core.sampler import sample_batch
    from training_core.types import SamplingParams

    model32, model_name = load_model()
    models = {"fp32": model32, "bf16": copy.deepcopy(model32).to(torch.bfloat16)}
    vocab = model32.get_input_embeddings().num_embeddings
    ids_BP = torch.randint(0, vocab, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    prompts = ids_BP.tolist()
    params = SamplingParams(max_tokens=NEW_TOKENS, seed=0, stop=[], temperature=1.0, top_k=-1, top_p=1.0)
    pad_id = model32.config.pad_token_id if model32.config.pad_token_id is not None else 0

    def hf(model: torch.nn.Module) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids_BP,
                attention_mask=torch.ones_like(ids_BP),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=pad_id,
            )
        dt = time.perf_counter() - t0
        assert out.shape == (BATCH, PROMPT_LEN + NEW_TOKENS), out.shape
        return BATCH * NEW_TOKENS / dt

    def ours(model: torch.nn.Module) -> float:
        t0 = time.perf_counter()
        res = sample_batch(model, prompts, params, eos_token_ids=[])
        dt = time.perf_counter() - t0
        assert all(len(g[0].tokens) == NEW_TOKENS for g in res)
        return BATCH * NEW_TOKENS / dt

    sides = {f"{name}_{prec}": (fn, m) for prec, m in models.items() for name, fn in (("hf", hf), ("ours", ours))}
    for fn, m in sides.values():  # warm-up
        fn(m)
    tps: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):  # interleaved: load from other processes hits every side alike
        for k, (fn, m) in sides.items():
            tps[k].append(fn(m))
    med = {k: statistics.median(v) for k, v in tps.items()}
    best_hf = max(("hf_fp32", "hf_bf16"), key=med.__getitem__)
    best_ours = max(("ours_fp32", "ours_bf16"), key=med.__getitem__)
    return {
        "sample_tokens_per_s_ratio_vs_generate": round(med[best_ours] / med[best_hf], 3),
        "sample_tokens_per_s_ratio_vs_generate_fp32": round(med["ours_fp32"] / med["hf_fp32"], 3),
        "sample_tokens_per_s_ratio_vs_generate_bf16": round(med["ours_bf16"] / med["hf_bf16"], 3),
        "sample_tokens_per_s": round(med[best_ours], 1),
        "generate_tokens_per_s": round(med[best_hf], 1),
        "sample_bench_setup": {
            "model": model_name,
            "params_m": round(sum(p.numel() for p in model32.parameters()) / 1e6, 2),
            "batch": BATCH,
            "prompt_len": PROMPT_LEN,
            "new_tokens": NEW_TOKENS,
            "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            "best_ours": best_ours,
            "best_generate": best_hf,
            "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
            "tokens_per_s_all": {k: [round(x, 1) for x in v] for k, v in tps.items()},
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not merge into bench/results.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.common import merge_results, print_table

    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores; timings will be noisy")
    res = run(args.repeats)
    setup = res["sample_bench_setup"]
    print_table(
        [
            {"side": k, "tokens/s (median)": v, "runs": setup["tokens_per_s_all"][k]}
            for k, v in setup["tokens_per_s_median"].items()
        ]
    )
    print(
        f"ratio: {res['sample_tokens_per_s_ratio_vs_generate']}x (goal >= 2; {setup['best_ours']} vs "
        f"{setup['best_generate']}, each side at its faster precision); same precision: fp32 "
        f"{res['sample_tokens_per_s_ratio_vs_generate_fp32']}x, bf16 {res['sample_tokens_per_s_ratio_vs_generate_bf16']}x; "
        f"{setup['model']}, {setup['torch_threads']} threads"
    )
    if not args.no_write:
        print(f"wrote {merge_results(res)}")
    return res


if __name__ == "__main__":
    main()
