"""Eval suite config (YAML): the protocol, the benchmarks and the gate policy in one file.

    protocol: {max_tokens: 256, temperature: 0.0, system_prompt: null, renderer: default, seed: 0}
    benchmarks:
      - builtin: arithmetic        # arithmetic | gsm | mc | ifeval | heldout_text
        n: 100
        seed: 0
      - path: data/my_eval.jsonl   # user benchmark; paths are relative to this file
        grader: {type: numeric, abs_tol: 0.01}
        name: my_eval
        max_tokens: 64
      - text: data/heldout.txt     # held-out text for perplexity (.txt lines or .jsonl {"text": ...})
      - saved: guards/             # every benchmark frozen by save_benchmark / build_guard_suite
    gate: {targets: [arithmetic], guards: [guard_mc, heldout_text], guard_margin: 0.03}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evals.benchmarks import AnyBenchmark, load_benchmark, load_jsonl_benchmark, load_text_benchmark
from evals.builtin import builtin_benchmark
from evals.compare import GatePolicy
from evals.protocols import EvalProtocol

DEFAULT_BUILTINS = ("arithmetic", "gsm", "mc", "ifeval", "heldout_text")


@dataclass
class Suite:
    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    benchmarks: list[AnyBenchmark] = field(default_factory=list)
    gate: GatePolicy = field(default_factory=GatePolicy)


def _benchmark_from_entry(entry: dict[str, Any], base: Path, where: str) -> list[AnyBenchmark]:
    keys = {"builtin", "path", "text", "saved"} & set(entry)
    if len(keys) != 1:
        raise ValueError(f"{where}: give exactly one of builtin / path / text / saved, got {sorted(entry)}")
    kind = keys.pop()
    if kind == "builtin":
        allowed = {"builtin", "n", "seed"}
        _check_keys(entry, allowed, where)
        return [builtin_benchmark(entry["builtin"], int(entry.get("n", 100)), int(entry.get("seed", 0)))]
    if kind == "path":
        _check_keys(entry, {"path", "grader", "name", "max_tokens", "stop"}, where)
        stop = entry.get("stop")
        return [load_jsonl_benchmark(base / entry["path"], entry.get("grader", "exact"), name=entry.get("name"),
                                     max_tokens=entry.get("max_tokens"), stop=tuple(stop) if stop else None)]
    if kind == "text":
        _check_keys(entry, {"text", "name"}, where)
        return [load_text_benchmark(base / entry["text"], name=entry.get("name"))]
    _check_keys(entry, {"saved"}, where)
    d = base / entry["saved"]
    names = sorted(p.stem for p in d.glob("*.json"))
    if not names:
        raise ValueError(f"{where}: no saved benchmarks in {d}")
    return [load_benchmark(d, n) for n in names]


def _check_keys(entry: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed here: {sorted(allowed)}")


def load_suite(path: str | Path) -> Suite:
    p = Path(path)
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: top level must be a mapping with protocol / benchmarks / gate")
    _check_keys(data, {"protocol", "benchmarks", "gate"}, str(p))
    try:
        protocol = EvalProtocol.from_dict(data.get("protocol") or {})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: protocol: {e}") from e
    benches: list[AnyBenchmark] = []
    for i, entry in enumerate(data.get("benchmarks") or []):
        if not isinstance(entry, dict):
            raise ValueError(f"{p}: benchmarks[{i}]: expected a mapping")
        benches.extend(_benchmark_from_entry(entry, p.parent, f"{p}: benchmarks[{i}]"))
    gate = GatePolicy.from_dict(data.get("gate") or {}, source=f"{p}: gate")
    return Suite(protocol, benches, gate)


def default_suite(names: list[str] | None = None, n: int = 100, seed: int = 0) -> Suite:
    return Suite(EvalProtocol(), [builtin_benchmark(b, n, seed) for b in (names or list(DEFAULT_BUILTINS))])
