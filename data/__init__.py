"""Deterministic, code-checkable chat datasets (see `data.generators`)."""

from data.generators import (
    TASKS,
    Record,
    extract_answer,
    generate,
    read_jsonl,
    score,
    split_of,
    train_eval,
    write_jsonl,
)

__all__ = [
    "TASKS",
    "Record",
    "extract_answer",
    "generate",
    "read_jsonl",
    "score",
    "split_of",
    "train_eval",
    "write_jsonl",
]
