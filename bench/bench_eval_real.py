"""Real-benchmark eval throughput on `smollm2-135m` (issue 13, "Performance"), two comparisons:

    python -m bench.bench_eval_real [--mc-n 200] [--mc-dense 10x20] [--gen-n 100] [--chunks 4] [--skip-mc] [--skip-gen]

1. Log-likelihood multiple choice (MMLU, seeded stratified subset, 5-shot, letters): ours
   (`evaluate_suite` -> `HFLoglikScorer` over the training_core sampling client: the 5-shot prefix of a
   subject run once and its KV cache reused, suffixes batched, LM head only at scored positions) vs
   lm-evaluation-harness 0.4.13 (`HFLM`, its `hf` backend, on the same HF model dir, batch size 1 = its
   default) on the *same* examples: the bench writes them to a local JSONL file and hands lm-eval a task
   config dict (`dataset_path: json`, `doc_to_text: context`, `doc_to_choice: choices`, `target_delimiter: " "`,
   metrics acc / acc_norm), so nothing is downloaded (HF_DATASETS_OFFLINE=1). Without lm-eval installed the
   other side is a plain transformers loop (one full forward per choice) and the figure is
   `mc_eval_examples_per_s_ratio_vs_plain_loop` instead. Two subsets: `--mc-n` the stratified one a
   `--limit` run uses (57 subjects, ~3.5 questions each at n = 200: the goal figure
   `mc_eval_examples_per_s_ratio_vs_lm_eval`), and `--mc-dense SxQ` S seeded subjects x Q questions, the
   density of a full MMLU run (`mc_eval_dense_examples_per_s_ratio_vs_lm_eval`); the saving is a subject's
   5-shot prefix run once, so it grows with questions per subject. CPU-second ratios are saved beside them.
2. Generative (GSM8K, 8-shot CoT, greedy, max 256 tokens, stop `Question:` / blank line): ours (the batched
   KV-cache sampler through `SamplingGenerator`, the runner's default batch) vs an HF `generate` loop, one
   prompt at a time, same prompt tokens (our renderer's), same greedy decoding, same grader, both through
   `evals.runner.evaluate`.

The examples are split into `--chunks` chunks (MMLU: cut at subject boundaries) and the sides alternate
chunk by chunk (A, B, A, B, ...), so load from other processes hits both alike; examples/s = n / summed time. Model load is outside the timing
on both sides. 1 torch thread everywhere (OMP_NUM_THREADS=1). Each part's figures go to bench/results.json
as soon as it ends.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import merge_results, print_table  # noqa: E402
from evals.benchmarks_real.loaders import real_benchmark  # noqa: E402
from evals.benchmarks_real.loglik import HFLoglikScorer, LoglikMCBenchmark, mc_metrics  # noqa: E402
from evals.protocols import EvalProtocol, Messages  # noqa: E402

MODEL = "smollm2-135m"


def _chunks(xs: list[Any], k: int) -> list[list[Any]]:
    k = max(1, min(k, len(xs)))
    size = -(-len(xs) // k)
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def _chunks_by(xs: list[Any], k: int, key: Any) -> list[list[Any]]:
    """~k chunks of about equal size, each cut moved to the nearest change of `key` (an MMLU subject), so
    that no chunk boundary splits a subject's shared 5-shot prefix (lm-eval is indifferent to the cuts)."""
    k = max(1, min(k, len(xs)))
    changes = [i for i in range(1, len(xs)) if key(xs[i]) != key(xs[i - 1])]
    cuts: list[int] = []
    for j in range(1, k):
        ideal = round(j * len(xs) / k)
        best = min(changes, key=lambda c: abs(c - ideal)) if changes else ideal
        if (not cuts or best > cuts[-1]) and 0 < best < len(xs):
            cuts.append(best)
    bounds = [0, *cuts, len(xs)]
    return [xs[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _subset(bench: Any, examples: list[Any]) -> Any:
    import dataclasses

    return dataclasses.replace(bench, examples=list(examples))


# ------------------------------------------------------------------ multiple choice


def _lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _lm_eval_task(path: Path, name: str) -> dict[str, Any]:
    return {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
        "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def _run_lm_eval(lm: Any, tm: Any, path: Path, name: str) -> list[list[float]]:
    """One chunk through lm-eval's simple_evaluate; returns per-doc choice log-likelihoods in file order.
    `tm`: one TaskManager built before the timing (indexing lm-eval's task YAMLs once, not once per chunk)."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[_lm_eval_task(path, name)], num_fewshot=0, bootstrap_iters=0,
                          log_samples=True, verbosity="ERROR", task_manager=tm)
    assert out is not None
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def mmlu_dense_subset(subjects: int, per_subject: int, seed: int) -> LoglikMCBenchmark:
    """`subjects` MMLU subjects x `per_subject` questions each (both seeded), in benchmark order: the
    questions-per-subject density of a full-MMLU run (14,042 / 57 = 246), which a stratified n = 200
    subset (3.5 per subject) does not have, so each subject's 5-shot prefix is shared as in a full run."""
    import random

    full = real_benchmark("mmlu", None, seed)
    assert isinstance(full, LoglikMCBenchmark)
    by: dict[str, list[Any]] = {}
    for e in full.examples:
        by.setdefault(str(e.meta["subject"]), []).append(e)
    rng = random.Random(seed)
    chosen = set(rng.sample(sorted(k for k, v in by.items() if len(v) >= per_subject), subjects))
    keep = {e.id for k in sorted(chosen) for e in rng.sample(by[k], per_subject)}
    return _subset(full, [e for e in full.examples if e.id in keep])


class _MCSides:
    """Both sides' models, built once (outside the timing) and used for every MC subset."""

    def __init__(self) -> None:
        from training_core import ServiceClient
        from training_core.presets import resolve_model_path
        from training_core.textgen import SamplingGenerator

        self.gen = SamplingGenerator(ServiceClient().create_sampling_client(base_model=MODEL), f"base:{MODEL}")
        path = resolve_model_path(MODEL)
        self.use_lm_eval = _lm_eval_available()
        if self.use_lm_eval:
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager

            self.other_name = "lm_eval"
            self.tm = TaskManager()
            self.lm = HFLM(pretrained=str(path), batch_size=1, device="cpu", dtype="float32")
        else:
            from transformers import AutoModelForCausalLM

            self.other_name = "plain_loop"
            self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            self.enc = HFLoglikScorer.from_generator(self.gen)  # only its encode_pair (lm-eval's tokenisation)


def bench_mc(sides: _MCSides, bench: LoglikMCBenchmark, chunks: int, tmp: Path, *, subset: str,
             tag: str = "") -> dict[str, Any]:
    """One MMLU subset, both sides alternating chunk by chunk; figure names carry `tag` ("" or "_dense")."""
    from evals.benchmarks_real.run import evaluate_suite

    gen, use_lm_eval, other_name = sides.gen, sides.use_lm_eval, sides.other_name
    parts = _chunks_by(list(bench.examples), chunks, key=lambda e: e.meta.get("subject"))
    files = []
    for i, part in enumerate(parts):
        f = tmp / f"mmlu{tag}_chunk{i}.jsonl"
        f.write_text("".join(json.dumps({"id": e.id, "context": e.messages[0]["content"],
                                         "choices": [str(c) for c in e.meta["choices"]], "gold": int(e.target)}) + "\n"
                             for e in part))
        files.append(f)
    # warm-up both sides on one example (allocator, kernels, lm-eval's task machinery)
    evaluate_suite(gen, [_subset(bench, parts[0][:1])], EvalProtocol())
    scorer = HFLoglikScorer.from_generator(gen)  # what evaluate_suite builds itself; kept for its token counts
    warm = tmp / f"mmlu{tag}_warm.jsonl"
    warm.write_text(files[0].read_text().splitlines()[0] + "\n")
    ctx_tokens = sum(len(scorer.encode_pair(e.messages[0]["content"], " A")[0]) for e in bench.examples)
    scorer.stats = {"tokens": 0, "calls": 0, "prefix_tokens": 0}
    load_start = round(os.getloadavg()[0], 2)
    loads: list[float] = []
    ours_lp: list[list[float]] = []
    other_lp: list[list[float]] = []
    t_ours = t_other = c_ours = c_other = 0.0  # wall and process CPU seconds (all threads: the engine's too)
    if use_lm_eval:
        _run_lm_eval(sides.lm, sides.tm, warm, f"mmlu{tag}_local_warm")
    for i, part in enumerate(parts):
        t, c = time.perf_counter(), time.process_time()
        res = evaluate_suite(gen, [_subset(bench, part)], EvalProtocol(), scorer=scorer).benchmarks[bench.name]
        t_ours += time.perf_counter() - t
        c_ours += time.process_time() - c
        ours_lp += [list(res.records[e.id].extra["logprobs"]) if "logprobs" in res.records[e.id].extra
                    else [] for e in part]
        t, c = time.perf_counter(), time.process_time()
        if use_lm_eval:
            other_lp += _run_lm_eval(sides.lm, sides.tm, files[i], f"mmlu{tag}_local_{i}")
        else:
            from evals.benchmarks_real.bench_mc import plain_loop_logprobs

            with torch.inference_mode():
                other_lp += [plain_loop_logprobs(sides.hf, sides.enc, e.messages[0]["content"],
                                                 [" " + str(c) for c in e.meta["choices"]]) for e in part]
        t_other += time.perf_counter() - t
        c_other += time.process_time() - c
        done_n = sum(len(p) for p in parts[:i + 1])
        loads.append(os.getloadavg()[0])
        print(f"  mc{tag} chunk {i + 1}/{len(parts)} ({done_n} examples): ours {t_ours:.1f}s, {other_name} {t_other:.1f}s, "
              f"ratio so far {t_other / t_ours:.3f} (CPU {c_ours:.1f}s vs {c_other:.1f}s: {c_other / c_ours:.3f}), "
              f"model tokens ours {scorer.stats['tokens']}, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    exs = list(bench.examples)

    def acc(lps: list[list[float]], metric: str) -> float:
        return sum(mc_metrics(lp, list(e.meta["choices"]), int(e.target))[metric]
                   for lp, e in zip(lps, exs, strict=True)) / len(exs)

    max_diff = max(abs(a - b) for x, y in zip(ours_lp, other_lp, strict=True) for a, b in zip(x, y, strict=True))
    ratio = t_other / t_ours
    return {
        f"mc_eval{tag}_examples_per_s_ratio_vs_{other_name}": round(ratio, 3),
        f"mc_eval{tag}_cpu_time_ratio_vs_{other_name}": round(c_other / c_ours, 3),
        f"mc_eval{tag}_real_setup": {
            "benchmark": "mmlu", "subset": subset, "n": len(exs),
            "subjects": len({e.meta["subject"] for e in exs}), "model": MODEL, "other_side": other_name,
            "lm_eval_version": _version("lm_eval") if use_lm_eval else None,
            "lm_eval_batch_size": 1 if use_lm_eval else None, "chunks": len(parts), "torch_threads": 1,
            "examples_per_s_ours": round(len(exs) / t_ours, 4),
            f"examples_per_s_{other_name}": round(len(exs) / t_other, 4),
            "seconds_ours": round(t_ours, 1), f"seconds_{other_name}": round(t_other, 1),
            # CPU seconds of the process while each side ran: robust to other jobs taking the cores
            "cpu_seconds_ours": round(c_ours, 1), f"cpu_seconds_{other_name}": round(c_other, 1),
            "cpu_time_ratio": round(c_other / c_ours, 3),
            "acc_ours": acc(ours_lp, "acc"), f"acc_{other_name}": acc(other_lp, "acc"),
            "acc_norm_ours": acc(ours_lp, "acc_norm"), f"acc_norm_{other_name}": acc(other_lp, "acc_norm"),
            "max_abs_logprob_diff": max_diff, "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "loadavg_1m_start": load_start, "loadavg_1m_after_each_chunk": [round(x, 2) for x in loads],
            "chunk_sizes": [len(p) for p in parts],
            # ours: tokens through the model (padding included) vs the contexts' total (what lm-eval runs)
            "model_tokens_ours": scorer.stats["tokens"], "context_tokens_total": ctx_tokens,
            "forward_calls_ours": scorer.stats["calls"],
        },
    }


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg.replace("_", "-"))


# ------------------------------------------------------------------ generative


class OneAtATimeHFGenerator:
    """HF `generate`, one prompt per call, greedy; prompt tokens from the same renderer as ours."""

    def __init__(self, path: str, renderer: Any, name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.renderer = renderer
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[Messages], protocol: EvalProtocol) -> list[list[str]]:
        out = []
        stops = list(protocol.stop or ())
        for m in prompts:
            ids = self.renderer.build_generation_prompt(m).to_ints()
            seq = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=protocol.max_tokens, do_sample=False, top_p=None, top_k=None,
                                      temperature=None, stop_strings=stops or None, tokenizer=self.tok,
                                      pad_token_id=self.tok.eos_token_id)
            text = self.tok.decode(seq[0, len(ids):], skip_special_tokens=True)
            cut = min([text.find(s) for s in stops if s in text] or [len(text)])
            out.append([text[:cut]])
        return out

    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        raise NotImplementedError


def bench_gen(n: int, seed: int, chunks: int) -> dict[str, Any]:
    from evals.runner import evaluate
    from training_core import ServiceClient
    from training_core.presets import resolve_model_path
    from training_core.textgen import SamplingGenerator

    bench = real_benchmark("gsm8k", n, seed)
    gen = SamplingGenerator(ServiceClient().create_sampling_client(base_model=MODEL), f"base:{MODEL}")
    proto = bench.protocol_for(EvalProtocol())
    loop = OneAtATimeHFGenerator(str(resolve_model_path(MODEL)), gen._renderer_for(proto), "hf_generate_loop")
    parts = _chunks(list(bench.examples), chunks)
    evaluate(gen, [_subset(bench, parts[0][:1])], EvalProtocol(), batch_size=1)  # warm-up
    evaluate(loop, [_subset(bench, parts[0][:1])], EvalProtocol(), batch_size=1)
    t_ours = t_loop = 0.0
    load_start = round(os.getloadavg()[0], 2)
    rec_ours: dict[str, Any] = {}
    rec_loop: dict[str, Any] = {}
    for i, part in enumerate(parts):
        sub = _subset(bench, part)
        t = time.perf_counter()
        rec_ours.update(evaluate(gen, [sub], EvalProtocol()).benchmarks[bench.name].records)  # runner default batch
        t_ours += time.perf_counter() - t
        t = time.perf_counter()
        rec_loop.update(evaluate(loop, [sub], EvalProtocol(), batch_size=1).benchmarks[bench.name].records)
        t_loop += time.perf_counter() - t
        print(f"  gen chunk {i + 1}/{len(parts)}: ours {t_ours:.1f}s, generate loop {t_loop:.1f}s", flush=True)
    ids = [e.id for e in bench.examples]
    stops = list(proto.stop or ())
    same = sum(_pred(rec_ours[i], stops) == _pred(rec_loop[i], stops) for i in ids)
    same_answer = sum(str(rec_ours[i].extracted) == str(rec_loop[i].extracted) for i in ids)  # graded answer
    return {
        "gen_eval_examples_per_s_ratio_vs_generate_loop": round(t_loop / t_ours, 3),
        "gen_eval_real_setup": {
            "benchmark": "gsm8k", "n": len(ids), "seed": seed, "model": MODEL, "max_tokens": proto.max_tokens,
            "chunks": len(parts), "torch_threads": 1, "ours_batch_size": len(parts[0]),
            "examples_per_s_ours": round(len(ids) / t_ours, 4),
            "examples_per_s_generate_loop": round(len(ids) / t_loop, 4),
            "seconds_ours": round(t_ours, 1), "seconds_generate_loop": round(t_loop, 1),
            "score_ours": sum(rec_ours[i].score for i in ids) / len(ids),
            "score_generate_loop": sum(rec_loop[i].score for i in ids) / len(ids),
            "same_completion": same, "same_extracted_answer": same_answer, "loadavg_1m_start": load_start,
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
        },
    }


def _pred(rec: Any, stops: list[str]) -> str:
    """The completion up to its first stop string (ours returns the stop string itself, the loop cuts it)."""
    text = str(rec.output)
    return text[:min([text.find(s) for s in stops if s in text] or [len(text)])].strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mc-n", type=int, default=200, help="stratified MMLU subset size (0: skip it)")
    ap.add_argument("--mc-dense", default="none",
                    help="also an MMLU subset of SUBJECTSxQUESTIONS (e.g. 10x20), the density of a full run")
    ap.add_argument("--gen-n", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-mc", action="store_true")
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    figures: dict[str, Any] = {}

    def emit(figs: dict[str, Any]) -> None:
        """Print and save one part's figures as soon as it is done (a long run cut later keeps them)."""
        figures.update(figs)
        print(json.dumps(figs, indent=2), flush=True)
        if not args.no_save:
            print(f"merged into {merge_results(figs)}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        dense = None if args.mc_dense == "none" else tuple(int(x) for x in args.mc_dense.split("x"))
        if not args.skip_mc and (args.mc_n > 0 or dense):
            sides = _MCSides()
            if args.mc_n > 0:
                strat = real_benchmark("mmlu", args.mc_n, args.seed)
                assert isinstance(strat, LoglikMCBenchmark)
                emit(bench_mc(sides, strat, args.chunks, Path(tmp),
                              subset=f"stratified over 57 subjects, limit={args.mc_n}, seed={args.seed}"))
            if dense:
                emit(bench_mc(sides, mmlu_dense_subset(dense[0], dense[1], args.seed), args.chunks, Path(tmp),
                              tag="_dense", subset=f"{dense[0]} seeded subjects x {dense[1]} seeded questions, "
                                                   f"seed={args.seed}"))
        if not args.skip_gen:
            emit(bench_gen(args.gen_n, args.seed, args.chunks))
    print_table([{"figure": k, "value": v} for k, v in figures.items() if not isinstance(v, dict)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
