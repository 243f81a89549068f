"""Shared pieces of the renderers: the TrainOnWhat enum, the Renderer protocol and small helpers.

Kept apart from `renderers.py` so the concrete renderers can import them without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from training_core.types import ModelInput

Message = dict[str, str]  # {"role": ..., "content": ...}


class TrainOnWhat(StrEnum):
    """Which tokens of a conversation get weight 1 in a supervised example."""

    LAST_ASSISTANT_MESSAGE = "last_assistant_message"
    ALL_ASSISTANT_MESSAGES = "all_assistant_messages"
    ALL_MESSAGES = "all_messages"


@runtime_checkable
class Renderer(Protocol):
    name: str

    def build_supervised_example(
        self, messages: list[Message], train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE
    ) -> tuple[list[int], list[float]]: ...

    def build_generation_prompt(self, messages: list[Message]) -> ModelInput: ...

    def get_stop_sequences(self) -> list[int]: ...

    def get_stop_strings(self) -> list[str]: ...

    def get_end_of_turn_sequences(self) -> list[list[int]]: ...

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]: ...


def check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Fail early, naming the message, on the schema errors that otherwise surface as a KeyError deep in jinja."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise TypeError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages is empty: a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}] has no {key!r} field (keys: {sorted(m)})")
            if not isinstance(m[key], str):
                raise TypeError(f"messages[{i}][{key!r}] must be a str, got {type(m[key]).__name__}")


def last_assistant_index(messages: Sequence[Mapping[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    return None


def is_trained_turn(messages: Sequence[Mapping[str, Any]], i: int, train_on_what: TrainOnWhat) -> bool:
    """True when message i's output (content + end of turn) is weighted under `train_on_what`."""
    if train_on_what == TrainOnWhat.ALL_MESSAGES:
        return True
    if messages[i]["role"] != "assistant":
        return False
    if train_on_what == TrainOnWhat.ALL_ASSISTANT_MESSAGES:
        return True
    if train_on_what == TrainOnWhat.LAST_ASSISTANT_MESSAGE:
        return i == last_assistant_index(messages)
    raise ValueError(
        f"unknown train_on_what {train_on_what!r}; expected one of {[t.value for t in TrainOnWhat]}"
    )


def as_token_list(out: Any) -> list[int]:
    """Token ids from what `apply_chat_template(tokenize=True)` returns: a list (4.x) or a BatchEncoding (5.x)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if len(out) > 0 and isinstance(out[0], list):  # batched output of a single conversation
        if len(out) != 1:
            raise ValueError(f"expected one tokenized conversation, got a batch of {len(out)}")
        out = out[0]
    return [int(t) for t in out]


def decode(tokenizer: Any, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
    return tokenizer.decode(
        list(tokens), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def eos_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos id(s) as a list (some tokenizers carry none)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def find_subsequence(tokens: Sequence[int], seq: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of `seq` in `tokens` at or after `start`, or -1."""
    n = len(seq)
    if n == 0:
        return -1
    first = seq[0]
    for i in range(start, len(tokens) - n + 1):
        if tokens[i] == first and list(tokens[i : i + n]) == list(seq):
            return i
    return -1


def zero_after_last_stop(tokens: Sequence[int], weights: list[float], stops: Sequence[Sequence[int]]) -> None:
    """Zero the weights after the end of the last end-of-turn occurrence (template trailer, not model output)."""
    last_end = 0
    for seq in stops:
        pos = find_subsequence(tokens, seq)
        while pos >= 0:
            last_end = max(last_end, pos + len(seq))
            pos = find_subsequence(tokens, seq, pos + 1)
    for j in range(last_end, len(weights)):
        weights[j] = 0.0
