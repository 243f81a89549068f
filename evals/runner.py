"""Run benchmarks through a Generator: batched sampling, grading, resumable per-example storage."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evals.benchmarks import AnyBenchmark, Benchmark, Example
from evals.protocols import EvalProtocol, Generator, Messages
from evals.stats import CI, bootstrap_ci, pass_at_k
from evals.store import ExampleRecord, ResultMeta, ResultStore, list_result_metas, read_records_file


@dataclass
class BenchmarkResult:
    benchmark: str
    kind: str
    checkpoint: str
    protocol: EvalProtocol
    protocol_hash: str
    dataset_hash: str
    n_examples: int
    records: dict[str, ExampleRecord] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.records) >= self.n_examples

    def scores(self) -> dict[str, float]:
        return {k: r.score for k, r in self.records.items()}

    @property
    def mean(self) -> float:
        return float(np.mean([r.score for r in self.records.values()])) if self.records else math.nan

    def ci(self, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> CI:
        return bootstrap_ci([r.score for r in self.records.values()], confidence=confidence,
                            n_resamples=n_resamples, seed=seed)

    def pass_at(self, threshold: float = 1.0) -> dict[int, float]:
        """Unbiased pass@k averaged over examples, for k = 1, 2, 4, ... and num_samples."""
        n = self.protocol.num_samples
        if n <= 1 or not self.records:
            return {}
        ks = sorted({k for k in (2**i for i in range(int(math.log2(n)) + 1))} | {n})
        out: dict[int, float] = {}
        for k in ks:
            vals = [pass_at_k(len(r.sample_scores), sum(s >= threshold for s in r.sample_scores), k)
                    for r in self.records.values()]
            out[k] = float(np.mean(vals))
        return out

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {"benchmark": self.benchmark, "kind": self.kind, "n": len(self.records),
                             "n_expected": self.n_examples, "mean": self.mean, "protocol_hash": self.protocol_hash}
        if self.records and math.isfinite(self.mean):  # no CI over -inf scores (zero-probability texts)
            ci = self.ci()
            d.update(ci_low=ci.low, ci_high=ci.high)
        if self.kind == "perplexity" and self.records:
            nll = sum(r.extra["nll"] for r in self.records.values())
            toks = sum(r.extra["tokens"] for r in self.records.values())
            d["perplexity"] = math.exp(nll / toks)
        if self.protocol.num_samples > 1:
            d["pass_at_k"] = {str(k): v for k, v in self.pass_at().items()}
        return d


@dataclass
class EvalResult:
    checkpoint: str
    benchmarks: dict[str, BenchmarkResult] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "benchmarks": {k: v.summary() for k, v in self.benchmarks.items()}}

    def means(self) -> dict[str, float]:
        return {k: v.mean for k, v in self.benchmarks.items()}


def _with_system(messages: Messages, system_prompt: str | None) -> Messages:
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _check_outputs(gen: Generator, outs: Any, n_prompts: int, n_samples: int) -> list[list[str]]:
    if not isinstance(outs, list) or len(outs) != n_prompts:
        got = len(outs) if isinstance(outs, list) else type(outs).__name__
        raise ValueError(f"generator {gen.name!r}: generate() returned {got} results for {n_prompts} prompts")
    for i, o in enumerate(outs):
        if not isinstance(o, list) or len(o) != n_samples or not all(isinstance(s, str) for s in o):
            raise ValueError(f"generator {gen.name!r}: result {i} must be a list of {n_samples} strings, got {o!r:.200}")
    return outs


def _run_generate(gen: Generator, bench: Benchmark, batch: list[Example], proto: EvalProtocol, ckpt: str,
                  phash: str) -> list[ExampleRecord]:
    prompts = [_with_system(ex.messages, proto.system_prompt) for ex in batch]
    outs = _check_outputs(gen, gen.generate(prompts, proto), len(batch), proto.num_samples)
    records = []
    for ex, msgs, samples in zip(batch, prompts, outs, strict=True):
        grades = [bench.grader.grade(s, ex.target, ex.meta) for s in samples]
        scores = [g.score for g in grades]
        records.append(ExampleRecord(
            example_id=ex.id, benchmark=bench.name, checkpoint=ckpt, protocol_hash=phash,
            prompt=json.dumps(msgs, ensure_ascii=False), output=samples[0], extracted=grades[0].extracted,
            score=float(np.mean(scores)), samples=samples if len(samples) > 1 else [], sample_scores=scores,
            extra={"target": ex.target}))
    return records


def _run_nll(gen: Generator, bench: AnyBenchmark, batch: list[Example], ckpt: str, phash: str) -> list[ExampleRecord]:
    texts = [str(ex.target) for ex in batch]
    res = gen.nll(texts)
    if not isinstance(res, list) or len(res) != len(texts):
        raise ValueError(f"generator {gen.name!r}: nll() returned {type(res).__name__} for {len(texts)} texts")
    records = []
    for ex, text, (nll, toks) in zip(batch, texts, res, strict=True):
        if toks <= 0 or nll == -math.inf:
            raise ValueError(f"generator {gen.name!r}: nll() gave ({nll}, {toks}) for a text in {bench.name!r}")
        # A non-finite NLL means the model put zero (or NaN) probability on a held-out token: it is scored
        # -inf, which counts against this model in the comparison (see evals.compare), instead of failing
        # the whole eval or being dropped.
        nll = float(nll) if math.isfinite(nll) else math.inf
        records.append(ExampleRecord(
            example_id=ex.id, benchmark=bench.name, checkpoint=ckpt, protocol_hash=phash, prompt=text,
            output="", extracted=f"{nll / toks:.6f}", score=-nll / toks, extra={"nll": nll, "tokens": int(toks)}))
    return records


def evaluate(generator: Generator, benchmarks: Sequence[AnyBenchmark], protocol: EvalProtocol,
             store: ResultStore | str | Path | None = None, *, checkpoint: str | None = None,
             batch_size: int = 64, progress: Callable[[str, int, int], None] | None = None) -> EvalResult:
    """Evaluate `generator` on each benchmark under `protocol` (per-benchmark max_tokens/grader applied).

    Many prompts go to one `generate` call (batch_size). With a store, finished example ids are
    skipped and each batch is persisted as soon as it is graded, so a re-run resumes.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate benchmark names: {names}")
    st = ResultStore(store) if isinstance(store, str | Path) else store
    ckpt = checkpoint or generator.name
    result = EvalResult(ckpt)
    for bench in benchmarks:
        proto = bench.protocol_for(protocol)
        phash = proto.hash()
        meta = ResultMeta(bench.name, ckpt, bench.kind, proto, phash, bench.dataset_hash(), len(bench))
        done: dict[str, ExampleRecord] = {}
        if st is not None:
            st.begin(meta)
            done = st.load_records(ckpt, bench.name, phash)
        pending = [ex for ex in bench.examples if ex.id not in done]
        if progress is not None:  # before any work: what was already stored is the starting point, not progress
            progress(bench.name, len(bench) - len(pending), len(bench))
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            if isinstance(bench, Benchmark):
                recs = _run_generate(generator, bench, batch, proto, ckpt, phash)
            else:
                recs = _run_nll(generator, bench, batch, ckpt, phash)
            if st is not None:
                st.append(recs)
            done.update({r.example_id: r for r in recs})
            if progress is not None:
                progress(bench.name, len(bench) - len(pending) + start + len(batch), len(bench))
        ordered = {ex.id: done[ex.id] for ex in bench.examples}
        result.benchmarks[bench.name] = BenchmarkResult(bench.name, bench.kind, ckpt, proto, phash,
                                                        meta.dataset_hash, len(bench), ordered)
    return result


def load_eval_result(checkpoint_dir: str | Path) -> EvalResult:
    """Load every benchmark stored in one checkpoint folder (newest protocol per benchmark)."""
    d = Path(checkpoint_dir)
    info = d / "checkpoint.json"
    if not info.exists():
        raise FileNotFoundError(f"{d}: not an eval result folder (no checkpoint.json)")
    result = EvalResult(json.loads(info.read_text())["checkpoint"])
    for meta, path in list_result_metas(d):
        if meta.benchmark in result.benchmarks:
            continue  # an older protocol for the same benchmark
        result.benchmarks[meta.benchmark] = BenchmarkResult(
            meta.benchmark, meta.kind, meta.checkpoint, meta.protocol, meta.protocol_hash, meta.dataset_hash,
            meta.n_examples, read_records_file(path))
    if not result.benchmarks:
        raise FileNotFoundError(f"{d}: no stored benchmark results")
    return result
