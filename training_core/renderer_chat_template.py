"""The "chat_template" renderer: the tokenizer's own jinja chat template, token for token.

Training tokens are produced exactly as `tokenizer.apply_chat_template(messages, tokenize=True)` produces them
(render once, tokenize once with add_special_tokens=False), so what the model is trained on is what inference
and eval see (pain-points cluster 2). Token boundaries of each turn are found generically from the template:
message i ends where `apply_chat_template(messages[:i+1])` ends, and an assistant turn's output starts where
`apply_chat_template(messages[:i], add_generation_prompt=True)` ends. Both renderings must be prefixes of the
full rendering; templates that rewrite earlier turns (e.g. drop past reasoning) are rejected with a clear error.
"""

from __future__ import annotations

import warnings
from typing import Any

from training_core.renderer_base import (
    Message,
    TrainOnWhat,
    as_token_list,
    check_messages,
    decode,
    eos_ids,
    is_trained_turn,
    zero_after_last_stop,
)
from training_core.types import ModelInput

# Conversations used once per renderer to discover which special token closes an assistant turn.
_PROBES: list[list[Message]] = [
    [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": "pong"},
    ],
]


class TemplateNotPrefixStableError(ValueError):
    """The chat template renders a conversation prefix differently from the start of the full conversation."""


def _diff_at(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


class ChatTemplateRenderer:
    """Renderer over `tokenizer.chat_template` (any HF fast tokenizer with a jinja template)."""

    name = "chat_template"

    def __init__(self, tokenizer: Any, stop_token_ids: list[int] | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat_template; "
                "use the 'role_colon' renderer for base models or set tokenizer.chat_template"
            )
        self.tokenizer = tokenizer
        self._stop_ids = list(stop_token_ids) if stop_token_ids is not None else self._discover_stop_ids()
        if not self._stop_ids:
            raise ValueError(
                "could not determine an end-of-turn token: the tokenizer has no eos_token and the chat template "
                "closes no assistant turn with a special token; pass stop_token_ids explicitly"
            )

    # ---- rendering helpers -------------------------------------------------------------------------------
    def _render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # Same call apply_chat_template(tokenize=True) makes, plus offsets to map char spans to tokens.
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as e:  # slow (python) tokenizers have no offsets
            raise ValueError(
                f"the chat_template renderer needs a fast tokenizer with offset mapping; "
                f"{type(self.tokenizer).__name__} has none"
            ) from e
        return [int(t) for t in enc["input_ids"]], [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def _discover_stop_ids(self) -> list[int]:
        """End-of-turn id = first added/special token after the assistant content in a probe render; then eos."""
        added = set(self.tokenizer.get_added_vocab().values()) | set(self.tokenizer.all_special_ids)
        found: list[int] = []
        for probe in _PROBES:
            try:
                text = self._render(probe)
            except Exception:  # noqa: BLE001 - a template may reject a probe shape (e.g. needs a system turn)
                continue
            content_end = text.rfind("pong") + len("pong")
            if content_end < len("pong"):
                continue
            tokens, offsets = self._encode_with_offsets(text)
            for tok, (a, _b) in zip(tokens, offsets, strict=True):
                if a >= content_end and tok in added:
                    found.append(tok)
                    break
            if found:
                break
        for e in eos_ids(self.tokenizer):
            if e not in found:
                found.append(e)
        return found

    def _message_ends(self, messages: list[Message]) -> tuple[str, list[int]]:
        """Full text and the end char of each message (checked: every prefix renders as a prefix)."""
        full = self._render(messages)
        ends: list[int] = []
        for i in range(len(messages)):
            prefix = full if i == len(messages) - 1 else self._render(messages[: i + 1])
            if not full.startswith(prefix):
                k = _diff_at(prefix, full)
                raise TemplateNotPrefixStableError(
                    f"chat template is not prefix-stable for this conversation: rendering messages[:{i + 1}] "
                    f"differs from the full rendering at char {k} ({prefix[k : k + 40]!r} vs {full[k : k + 40]!r}); "
                    "the template rewrites earlier turns, so per-turn weights cannot be derived from it"
                )
            ends.append(len(prefix))
        return full, ends

    def _output_start(self, messages: list[Message], i: int, full: str, start: int, end: int) -> int:
        """Char where message i's output begins: after the assistant header the generation prompt adds."""
        if messages[i]["role"] != "assistant":
            return start
        if i == 0:
            # A leading assistant turn has no prefix to render with a generation prompt: locate its content.
            pos = full.find(messages[i]["content"].strip(), start, end)
            return pos if pos >= 0 else start
        gen = self._render(messages[:i], add_generation_prompt=True)
        if not full.startswith(gen) or not start <= len(gen) <= end:
            k = _diff_at(gen, full)
            raise TemplateNotPrefixStableError(
                f"chat template's generation prompt for messages[:{i}] is not a prefix of the full rendering "
                f"(differs at char {k}: {gen[k : k + 40]!r} vs {full[k : k + 40]!r}); "
                "inference would see a different assistant header than training"
            )
        return len(gen)

    # ---- Renderer protocol -------------------------------------------------------------------------------
    def build_supervised_example(
        self, messages: list[Message], train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE
    ) -> tuple[list[int], list[float]]:
        check_messages(messages)
        train_on_what = TrainOnWhat(train_on_what)
        full, ends = self._message_ends(messages)
        tokens, offsets = self._encode_with_offsets(full)
        weights = [0.0] * len(tokens)
        if train_on_what == TrainOnWhat.ALL_MESSAGES:
            weights = [1.0] * len(tokens)
            zero_after_last_stop(tokens, weights, [[s] for s in self._stop_ids])
            return tokens, weights
        stops = set(self._stop_ids)
        for i in range(len(messages)):
            if not is_trained_turn(messages, i, train_on_what):
                continue
            e = ends[i]
            s = self._output_start(messages, i, full, ends[i - 1] if i > 0 else 0, e)
            # Tokens overlapping [s, e); zero-width offsets (trimmed whitespace) count if they sit inside.
            idx = [j for j, (a, b) in enumerate(offsets) if (a < e and b > s) or (a == b and s <= a < e)]
            if idx and offsets[idx[0]][0] < s:
                # One token spans header and content: inference's prompt ends mid-token, training's doesn't.
                warnings.warn(
                    f"messages[{i}]: token {idx[0]} spans the end of the assistant header and the start of the "
                    "content, so the generation prompt does not tokenize as a prefix of the training tokens "
                    "(template/tokenizer mismatch between training and inference)",
                    stacklevel=2,
                )
            # The turn ends at its last end-of-turn token: trailing template whitespace is not model output.
            stop_pos = [j for j in idx if tokens[j] in stops]
            if stop_pos:
                idx = [j for j in idx if j <= stop_pos[-1]]
            for j in idx:
                weights[j] = 1.0
        return tokens, weights

    def build_generation_prompt(self, messages: list[Message]) -> ModelInput:
        check_messages(messages)
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return ModelInput.from_ints(as_token_list(out))

    def get_stop_sequences(self) -> list[int]:
        return list(self._stop_ids)

    def get_stop_strings(self) -> list[str]:
        return []

    def get_end_of_turn_sequences(self) -> list[list[int]]:
        return [[s] for s in self._stop_ids]

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        """Content up to the first stop token; clean stop iff a stop token was sampled."""
        stops = set(self._stop_ids)
        for j, t in enumerate(tokens):
            if t in stops:
                return {"role": "assistant", "content": decode(self.tokenizer, tokens[:j])}, True
        return {"role": "assistant", "content": decode(self.tokenizer, tokens)}, False
