"""Prompt-only datasets: what on-policy recipes (distillation, RL) sample from.

Sources (one string, so a config or a CLI override names any of them):
- `task:NAME` — prompts of a built-in generated task (`data.generators.TASKS`, train split, seeded);
- `builtin:NAME` — the prompts of a built-in benchmark (`evals.builtin`: arithmetic, gsm, ...);
- a JSONL path — one `{"prompt": str}` or `{"messages": [...]}` per line; a chat row whose last message is
  the assistant's (any SFT file) contributes the messages before it, so the prompts of a chat JSONL are used
  as they are; `id` and `answer` are kept when present.

Every bad row is reported as `file:line: field 'x': ...` (a `BadInputError`: refused before anything runs);
duplicate prompts are dropped (they would only re-weight the data). Trade-off: the file is read whole
(prompt sets are small next to the models that sample from them).
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


def _messages(row: dict[str, Any], path: str, line: int) -> list[dict[str, str]]:
    def err(fld: str, msg: str) -> PromptDataError:
        return PromptDataError(f"{path}:{line}: field '{fld}': {msg}")

    if "messages" in row:
        msgs = row["messages"]
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


def read_prompt_jsonl(path: str | Path) -> list[PromptRow]:
    p = Path(path)
    if not p.is_file():
        raise PromptDataError(f"{p}: prompt file not found")
    rows: list[PromptRow] = []
    seen: set[str] = set()
    raw = p.read_bytes().decode("utf-8-sig", errors="strict") if p.stat().st_size else ""
    for line_no, text in enumerate(raw.splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptDataError(f"{p}:{line_no}: field '<row>': invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise PromptDataError(f"{p}:{line_no}: field '<row>': expected a JSON object")
        msgs = _messages(row, str(p), line_no)
        pid = prompt_id(msgs)
        if pid in seen:
            continue
        seen.add(pid)
        answer = row.get("answer")
        rows.append(PromptRow(pid, msgs, answer if isinstance(answer, str) else None,
                              {"source_id": row["id"]} if "id" in row else {}))
    if not rows:
        raise PromptDataError(f"{p}: no prompts")
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
                 task_kwargs: dict[str, Any] | None = None) -> list[PromptRow]:
    """Prompts from `source` (see the module docstring), the first `n` (all when None)."""
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
    rows = read_prompt_jsonl(source)
    return rows[:n] if n else rows


def prompts_hash(rows: list[PromptRow]) -> str:
    return hashlib.sha256(",".join(r.id for r in rows).encode()).hexdigest()[:16]
