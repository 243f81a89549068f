"""Prompt-only datasets: what on-policy recipes (distillation, RL) sample from.

Sources (one string, so a config or a CLI override names any of them):
- `task:NAME` — prompts of a built-in generated task (`data.generators.TASKS`, train split, seeded);
- `builtin:NAME` — the prompts of a built-in benchmark (`evals.builtin`: arithmetic, gsm, ...);
- a dataset: JSONL (read line by line), or any other source `tasks.data_io.load_rows` reads (JSON, Parquet,
  CSV, an Arrow dir, a dataset dir, org/name[:split], s3://) — one `{"prompt": str}` or
  `{"messages": [...]}` per row; a chat row whose last message is the assistant's (any SFT file)
  contributes the messages before it, so the prompts of a chat dataset are used as they are; `id` and
  `answer` are kept when present. Other column names map with `columns={"prompt": "question"}` (or
  `"messages": "conversation"`); ShareGPT `from`/`value` turns and CSV cells holding the turns as JSON work.

Every bad row is reported as `file:line: field 'x': ...` (JSONL) or `file row i: field 'x': ...` (columnar,
0-based row index), a `BadInputError`: refused before anything runs; duplicate prompts are dropped (they
would only re-weight the data). Trade-off: the prompts are returned as a list (prompt sets are small next to
the models that sample from them); the rows are streamed from Arrow while they are validated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.config import BadInputError

ROLES = ("system", "user", "assistant", "tool")


class PromptDataError(BadInputError):
    """A prompt row is malformed; the message names the file, line and field."""


@dataclass
class PromptRow:
    id: str
    messages: list[dict[str, str]]  # the conversation to continue: its last message is not the assistant's
    answer: str | None = None  # kept when the source has one (graded evaluation), never used for training
    meta: dict[str, Any] = field(default_factory=dict)


def prompt_id(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    def err(fld: str, msg: str) -> PromptDataError:
        return PromptDataError(f"{where}: field '{fld}': {msg}")

    if "messages" in row:
        from tasks.data_io import normalize_turns

        msgs = normalize_turns(row["messages"])  # ShareGPT turns, Arrow's nulls, a CSV cell's JSON
        if not isinstance(msgs, list) or not msgs:
            raise err("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise err(f"messages[{i}].role", f"must be one of {list(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise err(f"messages[{i}].content", "missing or not a string")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if msgs[-1]["role"] == "assistant":  # a chat (SFT) row: its prompt is everything before the target
            msgs = msgs[:-1]
        if not msgs:
            raise err("messages", "nothing before the assistant turn: no prompt to continue")
        return msgs
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise err("prompt", "missing or empty (give 'prompt' or 'messages')")
    return [{"role": "user", "content": prompt}]


def read_prompt_jsonl(path: str | Path, columns: dict[str, str] | None = None,
                      cache_dir: str | Path | None = None) -> list[PromptRow]:
    """The prompts of a dataset of any format (the name stays for its callers), deduplicated, all validated."""
    from tasks.data_io import DataLoadError, iter_validated, load_rows, resolve_source
    from tasks.prepare_data import iter_json_lines

    p = Path(str(path))
    if "://" not in str(path) and not p.exists() and p.suffix:
        raise PromptDataError(f"{p}: prompt file not found")
    try:
        src = resolve_source(str(path), cache_dir)
    except DataLoadError as e:
        raise PromptDataError(str(e)) from None
    rows: list[PromptRow] = []
    seen: set[str] = set()

    def add(row: dict[str, Any], where: str) -> None:
        for ours, theirs in (columns or {}).items():
            if theirs in row and theirs != ours:
                row[ours] = row.pop(theirs)
        msgs = _messages(row, where)
        pid = prompt_id(msgs)
        if pid in seen:
            return
        seen.add(pid)
        answer = row.get("answer")
        if src.kind == "csv" and isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)  # CSV cells are text; the reader's type inference made a number of "42"
        rows.append(PromptRow(pid, msgs, answer if isinstance(answer, str) else None,
                              {"source_id": row["id"]} if row.get("id") is not None else {}))

    if src.kind == "jsonl":  # the exact line reader: lines as the user's editor shows them
        name = str(path) if src.spec.startswith("s3://") else str(p)
        for line_no, row in iter_json_lines(Path(src.path), name, PromptDataError):
            if not isinstance(row, dict):
                raise PromptDataError(f"{name}:{line_no}: field '<row>': expected a JSON object")
            add(row, f"{name}:{line_no}")
    else:
        def check(row: dict[str, Any], where: str) -> dict[str, Any]:
            add(row, where)
            return row

        ds = load_rows(src, columns, cache_dir=cache_dir, normalize=False)
        for _ in iter_validated(ds, src, check):
            pass
    if not rows:
        raise PromptDataError(f"{path}: no prompts")
    return rows


def task_prompts(task: str, n: int, seed: int = 0, split: str = "train", **task_kwargs: Any) -> list[PromptRow]:
    """`n` prompts of a generated task; the eval split never overlaps the train split (data.generators)."""
    from data.generators import TASKS, generate

    if task not in TASKS:
        raise BadInputError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    try:
        recs = generate(task, n, seed, split, **task_kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise BadInputError(f"task {task!r} {task_kwargs}: {e}") from None
    out = []
    for r in recs:
        msgs = r["messages"][:-1]
        out.append(PromptRow(prompt_id(msgs), msgs, r["answer"], {"row_id": r["id"]}))
    return out


def load_prompts(source: str, n: int | None = None, seed: int = 0,
                 task_kwargs: dict[str, Any] | None = None, columns: dict[str, str] | None = None,
                 cache_dir: str | Path | None = None) -> list[PromptRow]:
    """Prompts from `source` (see the module docstring), the first `n` (all when None); `columns` maps our
    field names (`prompt`, `messages`, `answer`, `id`) to a dataset's."""
    if source.startswith("task:"):
        if n is None:
            raise BadInputError(f"{source}: a generated task needs a prompt count")
        return task_prompts(source.removeprefix("task:"), n, seed, **(task_kwargs or {}))
    if source.startswith("builtin:"):
        from evals.builtin import builtin_benchmark

        try:
            bench = builtin_benchmark(source.removeprefix("builtin:"), n or 100, seed=seed)
        except (KeyError, ValueError) as e:
            raise BadInputError(f"{source}: {e}") from None
        rows = [PromptRow(prompt_id(ex.messages), list(ex.messages),
                          ex.target if isinstance(ex.target, str) else None, {"example_id": ex.id})
                for ex in bench.examples if ex.messages]
        if not rows:
            raise BadInputError(f"{source}: a text benchmark has no prompts")
        return rows[:n] if n else rows
    rows = read_prompt_jsonl(source, columns, cache_dir)
    return rows[:n] if n else rows


def prompts_hash(rows: list[PromptRow]) -> str:
    return hashlib.sha256(",".join(r.id for r in rows).encode()).hexdigest()[:16]
