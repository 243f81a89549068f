"""Eval throughput: the runner's batched sampling vs a one-prompt-at-a-time loop, on a real HF model.

    .venv/bin/python bench/bench_eval.py [--model tiny-30m] [--n 32] [--max-tokens 64] [--batch-size 32]

Both arms run the same `evals.evaluate` on the same examples with a simple HF-`generate` Generator
(greedy, same max_tokens); only `batch_size` differs (N prompts per `generate` call vs 1). Reports
examples/s for each, the speed-up, and how many greedy outputs agree between the arms (a sanity check
that batching with left padding does not change answers). Results go to bench/out/bench_eval.json (or
through bench/common.py:merge_results when that exists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.builtin import builtin_benchmark  # noqa: E402
from evals.protocols import EvalProtocol, Messages  # noqa: E402
from evals.runner import evaluate  # noqa: E402


class HFGenerator:
    """Minimal Generator: chat template -> left-padded batch -> model.generate -> decoded completions."""

    def __init__(self, path: str, name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"  # decoder-only batching: pad on the left so all prompts end together
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.calls = 0

    @torch.inference_mode()
    def generate(self, prompts: list[Messages], protocol: EvalProtocol) -> list[list[str]]:
        self.calls += 1
        texts = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(protocol.seed)
        out_B_T = self.model.generate(
            **enc, max_new_tokens=protocol.max_tokens, do_sample=protocol.temperature > 0,
            temperature=protocol.temperature if protocol.temperature > 0 else None,
            top_p=protocol.top_p if protocol.temperature > 0 else None, top_k=None,
            num_return_sequences=protocol.num_samples, pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id)
        new_B_T = out_B_T[:, enc["input_ids"].shape[1]:]
        decoded = self.tok.batch_decode(new_B_T, skip_special_tokens=True)
        k = protocol.num_samples
        return [decoded[i * k:(i + 1) * k] for i in range(len(prompts))]

    @torch.inference_mode()
    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        out = []
        for t in texts:
            ids_1_T = self.tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
            logits_1_T_V = self.model(ids_1_T).logits
            lp_T = torch.log_softmax(logits_1_T_V[0, :-1], -1).gather(-1, ids_1_T[0, 1:, None])[:, 0]
            out.append((float(-lp_T.sum()), int(lp_T.numel())))
        return out


def _timed(gen: HFGenerator, benches: list[Any], proto: EvalProtocol, batch_size: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    res = evaluate(gen, benches, proto, None, checkpoint=gen.name, batch_size=batch_size)
    return time.perf_counter() - t0, res


def _write(results: dict[str, Any]) -> Path:
    try:
        from bench.common import merge_results  # written by the "sampler" helper, when present
    except ImportError:
        merge_results = None
    if merge_results is not None:
        try:
            return Path(str(merge_results("eval", results)))
        except TypeError as e:  # a different signature than expected: fall back to our own file
            print(f"bench.common.merge_results not usable ({e}); writing JSON directly", file=sys.stderr)
    out = Path(__file__).resolve().parent / "out" / "bench_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-30m", help="preset name or local HF dir")
    ap.add_argument("--n", type=int, default=32, help="examples (GSM-style prompts)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from training_core.presets import resolve_model_path

    path = resolve_model_path(args.model)
    gen = HFGenerator(path, args.model)
    bench = builtin_benchmark("gsm", args.n)
    proto = EvalProtocol(max_tokens=args.max_tokens, temperature=0.0)
    bench.max_tokens = args.max_tokens
    _timed(gen, [builtin_benchmark("gsm", 4, seed=99)], proto, 4)  # warm-up (allocator, kernels)
    gen.calls = 0
    t_batched, res_b = _timed(gen, [bench], proto, args.batch_size)
    calls_batched = gen.calls
    gen.calls = 0
    t_single, res_s = _timed(gen, [bench], proto, 1)
    rb, rs = res_b.benchmarks["gsm"].records, res_s.benchmarks["gsm"].records
    agree = sum(rb[k].output == rs[k].output for k in rb) / len(rb)
    results = {
        "model": args.model, "n": args.n, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "batched_examples_per_s": args.n / t_batched, "unbatched_examples_per_s": args.n / t_single,
        "speedup": t_single / t_batched, "generate_calls_batched": calls_batched,
        "generate_calls_unbatched": gen.calls, "greedy_output_agreement": agree,
        "seconds_batched": t_batched, "seconds_unbatched": t_single,
    }
    where = _write(results)
    print(json.dumps(results, indent=2))
    print(f"speed-up {results['speedup']:.1f}x (target >= 5x); written to {where}")
    return results


if __name__ == "__main__":
    main()
