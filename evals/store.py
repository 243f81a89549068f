"""Per-example result store: JSONL files under a results dir, append-only, resumable.

Layout (one folder per checkpoint, one file pair per benchmark x protocol):
    <root>/<checkpoint-slug>/checkpoint.json
    <root>/<checkpoint-slug>/<benchmark>.<protocol_hash>.jsonl      one record per finished example
    <root>/<checkpoint-slug>/<benchmark>.<protocol_hash>.meta.json  the full protocol, dataset hash, kind
Records are appended after each generation batch, so a crash loses at most one batch; a torn last line
(crash mid-write) is ignored on reload and that example is simply redone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.protocols import EvalProtocol


@dataclass
class ExampleRecord:
    example_id: str
    benchmark: str
    checkpoint: str
    protocol_hash: str
    prompt: str
    output: str
    extracted: str | None
    score: float
    samples: list[str] = field(default_factory=list)
    sample_scores: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExampleRecord:
        return cls(**d)


@dataclass
class ResultMeta:
    benchmark: str
    checkpoint: str
    kind: str
    protocol: EvalProtocol
    protocol_hash: str
    dataset_hash: str
    n_examples: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["protocol"] = self.protocol.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResultMeta:
        d = dict(d)
        d["protocol"] = EvalProtocol.from_dict(d["protocol"])
        return cls(**d)


def checkpoint_slug(name: str) -> str:
    """Filesystem-safe and collision-free: readable tail + hash of the full name."""
    tail = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name.rstrip("/")).strip("_.")[-60:] or "ckpt"
    return f"{tail}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class ResultStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def checkpoint_dir(self, checkpoint: str) -> Path:
        return self.root / checkpoint_slug(checkpoint)

    def _path(self, checkpoint: str, benchmark: str, protocol_hash: str, suffix: str) -> Path:
        # Not Path.with_suffix: benchmark names may contain dots and the hash would be taken as a suffix.
        return self.checkpoint_dir(checkpoint) / f"{benchmark}.{protocol_hash}{suffix}"

    def begin(self, meta: ResultMeta) -> None:
        """Create the folder and meta file; refuse to mix a different dataset under the same key."""
        d = self.checkpoint_dir(meta.checkpoint)
        d.mkdir(parents=True, exist_ok=True)
        (d / "checkpoint.json").write_text(json.dumps({"checkpoint": meta.checkpoint}))
        path = self._path(meta.checkpoint, meta.benchmark, meta.protocol_hash, ".meta.json")
        if path.exists():
            old = ResultMeta.from_dict(json.loads(path.read_text()))
            if old.dataset_hash != meta.dataset_hash:
                raise ValueError(
                    f"{path}: benchmark {meta.benchmark!r} changed (dataset hash {old.dataset_hash} -> "
                    f"{meta.dataset_hash}); resume would mix examples. Use a new results dir or delete the file.")
        path.write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True))

    def load_records(self, checkpoint: str, benchmark: str, protocol_hash: str) -> dict[str, ExampleRecord]:
        path = self._path(checkpoint, benchmark, protocol_hash, ".jsonl")
        return _read_records(path)

    def append(self, records: list[ExampleRecord]) -> None:
        if not records:
            return
        r0 = records[0]
        path = self._path(r0.checkpoint, r0.benchmark, r0.protocol_hash, ".jsonl")
        _drop_torn_tail(path)
        with path.open("a", encoding="utf-8") as f:
            for r in records:
                f.write(r.to_json() + "\n")
            f.flush()


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _read_records(path: Path) -> dict[str, ExampleRecord]:
    out: dict[str, ExampleRecord] = {}
    if not path.exists():
        return out
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = ExampleRecord.from_dict(json.loads(line))
        except (json.JSONDecodeError, TypeError) as e:
            if i == len(lines):  # torn final write (no trailing newline): redo that example
                break
            raise ValueError(f"{path}:{i}: corrupt result record: {e}") from e
        out[rec.example_id] = rec
    return out


def list_result_metas(checkpoint_dir: str | Path) -> list[tuple[ResultMeta, Path]]:
    """All (meta, records path) pairs in one checkpoint folder, newest first."""
    d = Path(checkpoint_dir)
    metas = sorted(d.glob("*.meta.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    out = []
    for p in metas:
        meta = ResultMeta.from_dict(json.loads(p.read_text()))
        out.append((meta, p.with_name(p.name[: -len(".meta.json")] + ".jsonl")))
    return out


def read_records_file(path: str | Path) -> dict[str, ExampleRecord]:
    return _read_records(Path(path))


def store_result(root: str | Path, who: str, res: Any) -> None:
    """An in-memory EvalResult (e.g. a recipe's own evaluation: DPO preference accuracy, RL episodes) into the
    result store at `root` under checkpoint name `who`, like the sampled benchmarks; one already stored (a
    retried task, a resumed run) is kept."""
    store = ResultStore(root)
    for br in res.benchmarks.values():
        if store.load_records(who, br.benchmark, br.protocol_hash):
            continue
        store.begin(ResultMeta(br.benchmark, who, br.kind, br.protocol, br.protocol_hash, br.dataset_hash,
                               br.n_examples))
        store.append(list(br.records.values()))
