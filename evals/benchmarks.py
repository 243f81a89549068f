"""Benchmarks: examples with stable content-hash ids, prompt rendering, sampling overrides and a grader."""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.graders import Grader, make_grader
from evals.protocols import EvalProtocol, Messages

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
PERPLEXITY_GRADER = ("nll_per_token", "1")


class BenchmarkFormatError(ValueError):
    """A user benchmark row is malformed; the message names file, line and field."""

    def __init__(self, path: str | Path, line: int, field_name: str, msg: str) -> None:
        super().__init__(f"{path}:{line}: field {field_name!r}: {msg}")
        self.path, self.line, self.field = str(path), line, field_name


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def example_id(messages: Messages, target: Any, meta: dict[str, Any]) -> str:
    """Content hash: the same prompt, target and metadata give the same id on every machine."""
    return hashlib.sha256(_canon({"m": messages, "t": target, "x": meta}).encode()).hexdigest()[:16]


@dataclass
class Example:
    id: str
    messages: Messages
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, messages: Messages, target: Any = None, meta: dict[str, Any] | None = None) -> Example:
        meta = dict(meta or {})
        return cls(example_id(messages, target, meta), messages, target, meta)

    def prompt_text(self) -> str:
        """A flat view for stores, reports and contamination checks."""
        if not self.messages:
            return str(self.target)
        return "\n".join(m["content"] for m in self.messages)


def render_choices(question: str, choices: list[Any]) -> str:
    letters = string.ascii_uppercase
    lines = [question.rstrip()] + [f"{letters[i]}. {c}" for i, c in enumerate(choices)]
    lines.append("Answer with the letter of the correct option.")
    return "\n".join(lines)


@dataclass
class Benchmark:
    """Examples to sample and grade. `max_tokens`/`stop` override the base protocol for this benchmark."""

    name: str
    examples: list[Example]
    grader: Grader
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    description: str = ""
    kind: str = "generate"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"benchmark name {self.name!r}: use letters, digits, '_', '.', '-' only")
        if not self.examples:
            raise ValueError(f"benchmark {self.name!r} has no examples")
        seen: dict[str, int] = {}
        for i, ex in enumerate(self.examples):
            if ex.id in seen:
                raise ValueError(f"benchmark {self.name!r}: examples {seen[ex.id]} and {i} are identical (id {ex.id})")
            seen[ex.id] = i

    def protocol_for(self, base: EvalProtocol) -> EvalProtocol:
        changes: dict[str, Any] = {"grader": self.grader.name, "grader_version": self.grader.version}
        if self.max_tokens is not None:
            changes["max_tokens"] = self.max_tokens
        if self.stop is not None:
            changes["stop"] = tuple(self.stop)
        return base.replace(**changes)

    def dataset_hash(self) -> str:
        return hashlib.sha256(",".join(sorted(e.id for e in self.examples)).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class PerplexityBenchmark:
    """Held-out text scored by `Generator.nll`; per-example score is the log-likelihood per token (higher is better)."""

    name: str
    examples: list[Example]
    description: str = ""
    kind: str = "perplexity"

    def __post_init__(self) -> None:
        Benchmark.__post_init__(self)  # type: ignore[arg-type]  # same name/emptiness/duplicate checks

    @classmethod
    def from_texts(cls, name: str, texts: list[str], description: str = "") -> PerplexityBenchmark:
        return cls(name, [Example.make([], t) for t in texts], description)

    def protocol_for(self, base: EvalProtocol) -> EvalProtocol:
        # NLL of raw text does not depend on sampling, system prompt or chat template: pin only the scorer.
        return EvalProtocol(renderer="raw-text", grader=PERPLEXITY_GRADER[0], grader_version=PERPLEXITY_GRADER[1])

    def dataset_hash(self) -> str:
        return Benchmark.dataset_hash(self)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.examples)


AnyBenchmark = Benchmark | PerplexityBenchmark

_ROW_FIELDS = {"id", "prompt", "messages", "answer", "target", "choices", "meta", "constraints", "text"}


def _row_messages(row: dict[str, Any], path: Path, line: int) -> Messages:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BenchmarkFormatError(path, line, "messages", "must be a non-empty list of {role, content}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BenchmarkFormatError(path, line, f"messages[{i}]", "needs string 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise BenchmarkFormatError(path, line, f"messages[{i}].role", f"unknown role {m['role']!r}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BenchmarkFormatError(path, line, "prompt", "missing or empty (give 'prompt' or 'messages')")
    if "choices" in row:
        prompt = render_choices(prompt, row["choices"])
    return [{"role": "user", "content": prompt}]


def load_jsonl_benchmark(path: str | Path, grader: str | dict[str, Any] | Grader = "exact", *,
                         name: str | None = None, max_tokens: int | None = None,
                         stop: tuple[str, ...] | None = None) -> Benchmark:
    """Rows: {prompt | messages, answer | target, [choices], [constraints], [meta], [id]}.

    The stored id is always the content hash (a user 'id' is kept as meta['source_id']).
    """
    path = Path(path)
    g = make_grader(grader)
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(path, line_no, "<row>", f"invalid JSON: {e.msg}") from e
            if not isinstance(row, dict):
                raise BenchmarkFormatError(path, line_no, "<row>", "each line must be a JSON object")
            unknown = sorted(set(row) - _ROW_FIELDS)
            if unknown:
                raise BenchmarkFormatError(path, line_no, unknown[0], f"unknown field; allowed: {sorted(_ROW_FIELDS)}")
            meta = row.get("meta", {})
            if not isinstance(meta, dict):
                raise BenchmarkFormatError(path, line_no, "meta", "must be an object")
            meta = dict(meta)
            if "choices" in row:
                if not isinstance(row["choices"], list):
                    raise BenchmarkFormatError(path, line_no, "choices", "must be a list")
                meta["choices"] = row["choices"]
            if "constraints" in row:
                meta["constraints"] = row["constraints"]
            if "id" in row:
                meta["source_id"] = row["id"]
            if "answer" in row and "target" in row:
                raise BenchmarkFormatError(path, line_no, "answer", "give either 'answer' or 'target', not both")
            target_field = "answer" if "answer" in row else "target"
            target = row.get(target_field)
            msgs = _row_messages(row, path, line_no)
            problem = g.check_target(target, meta)
            if problem is not None:
                fld = problem.split(":")[0] if problem.startswith(("choices", "constraints")) else target_field
                raise BenchmarkFormatError(path, line_no, fld, f"{problem} (grader {g.name})")
            ex = Example.make(msgs, target, meta)
            if ex.id in first_line:
                raise BenchmarkFormatError(path, line_no, "<row>", f"duplicate of line {first_line[ex.id]}")
            first_line[ex.id] = line_no
            examples.append(ex)
    if not examples:
        raise BenchmarkFormatError(path, 0, "<file>", "no rows")
    return Benchmark(name or path.stem, examples, g, max_tokens=max_tokens, stop=stop)


def load_text_benchmark(path: str | Path, *, name: str | None = None) -> PerplexityBenchmark:
    """Held-out text for perplexity: JSONL rows {"text": ...} or a plain .txt with one text per line."""
    path = Path(path)
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise BenchmarkFormatError(path, line_no, "<row>", f"invalid JSON: {e.msg}") from e
                if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                    raise BenchmarkFormatError(path, line_no, "text", "missing or empty string")
                texts.append(row["text"])
            else:
                texts.append(raw.rstrip("\n"))
    return PerplexityBenchmark.from_texts(name or path.stem, texts)


def save_benchmark(bench: AnyBenchmark, directory: str | Path) -> Path:
    """Write `<name>.jsonl` (rows) and `<name>.json` (grader and overrides) so a suite is frozen on disk."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with (d / f"{bench.name}.jsonl").open("w", encoding="utf-8") as f:
        for ex in bench.examples:
            f.write(_canon({"id": ex.id, "messages": ex.messages, "target": ex.target, "meta": ex.meta}) + "\n")
    spec: dict[str, Any] = {"name": bench.name, "kind": bench.kind, "description": bench.description}
    if isinstance(bench, Benchmark):
        spec.update(grader=bench.grader.spec(), max_tokens=bench.max_tokens,
                    stop=list(bench.stop) if bench.stop is not None else None)
    (d / f"{bench.name}.json").write_text(json.dumps(spec, indent=2))
    return d / f"{bench.name}.jsonl"


def load_benchmark(directory: str | Path, name: str) -> AnyBenchmark:
    """Inverse of `save_benchmark`; ids are recomputed and must match the stored ones."""
    d = Path(directory)
    spec = json.loads((d / f"{name}.json").read_text())
    examples: list[Example] = []
    rows_path = d / f"{name}.jsonl"
    with rows_path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            row = json.loads(raw)
            ex = Example.make(row["messages"], row["target"], row["meta"])
            if ex.id != row["id"]:
                raise BenchmarkFormatError(rows_path, line_no, "id", f"stored {row['id']} != content hash {ex.id}")
            examples.append(ex)
    if spec["kind"] == "perplexity":
        return PerplexityBenchmark(name, examples, spec.get("description", ""))
    stop = spec.get("stop")
    return Benchmark(name, examples, make_grader(spec["grader"]), max_tokens=spec.get("max_tokens"),
                     stop=tuple(stop) if stop is not None else None, description=spec.get("description", ""))
