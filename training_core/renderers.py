"""Renderers: chat messages -> tokens + per-token weights, and the checks around them.

- `get_renderer("chat_template", tok)`: the tokenizer's own jinja template, tokens == apply_chat_template.
- `get_renderer("role_colon", tok)`: "User:/Assistant:" text for base models, stop string "\\n\\nUser:".
- `datum_from_tokens_weights`: next-token shift into a Tinker `Datum`.
- `validate_supervised_batch`: refuses all-zero weights and masked-out EOS, naming the example
  (pain-points cluster 3: "assistant-only loss silently all zeros", "EOS masked because pad == eos").
- `format_weighted_example`: shows which tokens are trained.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from training_core.renderer_base import Message, Renderer, TrainOnWhat, decode
from training_core.renderer_chat_template import ChatTemplateRenderer, TemplateNotPrefixStableError
from training_core.renderer_role_colon import RoleColonRenderer
from training_core.types import Datum, ModelInput, TensorData

__all__ = [
    "ChatTemplateRenderer",
    "Message",
    "Renderer",
    "RoleColonRenderer",
    "TemplateNotPrefixStableError",
    "TrainOnWhat",
    "datum_from_tokens_weights",
    "format_weighted_example",
    "get_renderer",
    "validate_supervised_batch",
]

_RENDERERS = {"chat_template": ChatTemplateRenderer, "role_colon": RoleColonRenderer}


def get_renderer(name: str, tokenizer: Any) -> Renderer:
    if name not in _RENDERERS:
        raise ValueError(f"unknown renderer {name!r}; available: {sorted(_RENDERERS)}")
    return _RENDERERS[name](tokenizer)


def datum_from_tokens_weights(
    tokens: list[int], weights: list[float], max_length: int | None = None
) -> Datum:
    """Tokens/weights of one sequence -> Datum: input tokens[:-1] predicts target tokens[1:] with weights[1:]."""
    if len(tokens) != len(weights):
        raise ValueError(f"tokens and weights differ in length: {len(tokens)} vs {len(weights)}")
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one input and one target), got {max_length}")
        tokens, weights = tokens[:max_length], weights[:max_length]
    if len(tokens) < 2:
        raise ValueError(f"a supervised example needs at least 2 tokens, got {len(tokens)}")
    targets_T = torch.tensor(tokens[1:], dtype=torch.int64)
    weights_T = torch.tensor(weights[1:], dtype=torch.float32)
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(targets_T),
            "weights": TensorData.from_torch(weights_T),
        },
    )


def _stop_occurrences(tokens: Sequence[int], stops: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """(end_exclusive, start) of every end-of-turn occurrence, sorted by end."""
    single = {s[0] for s in stops if len(s) == 1}
    multi = [s for s in stops if len(s) > 1]
    occ: list[tuple[int, int]] = []
    for i, t in enumerate(tokens):
        if t in single:
            occ.append((i + 1, i))
        for s in multi:
            if t == s[0] and tuple(tokens[i : i + len(s)]) == s:
                occ.append((i + len(s), i))
    occ.sort()
    return occ


def validate_supervised_batch(
    examples: list[tuple[list[int], list[float]]],
    eos_token_ids: Sequence[int | Sequence[int]],
    names: list[str] | None = None,
    *,
    pad_token_id: int | None = None,
) -> None:
    """Raise ValueError naming the first bad example.

    `eos_token_ids`: end-of-turn tokens; an entry may also be a token sequence (role_colon's "User:"), see
    `Renderer.get_end_of_turn_sequences()`. Errors: all weights zero; a weighted token whose closing
    end-of-turn token is unweighted (EOS masked out) or absent (truncated / template without end of turn);
    `pad_token_id` equal to an EOS that is trained (a pad-masking collator would drop it).
    """
    if names is not None and len(names) != len(examples):
        raise ValueError(f"names has {len(names)} entries for {len(examples)} examples")
    stops = [tuple(int(x) for x in s) if isinstance(s, Sequence) else (int(s),) for s in eos_token_ids]
    stops = [s for s in stops if s]
    if not stops:
        raise ValueError("eos_token_ids is empty: cannot check that the end of turn is trained")
    single_eos = {s[0] for s in stops if len(s) == 1}
    for idx, (tokens, weights) in enumerate(examples):
        label = f"example {idx}" + (f" ({names[idx]!r})" if names is not None else "")
        if len(tokens) != len(weights):
            raise ValueError(f"{label}: {len(tokens)} tokens but {len(weights)} weights")
        if not any(w != 0 for w in weights):
            raise ValueError(
                f"{label}: all {len(weights)} weights are zero, nothing would be trained "
                "(no assistant message for train_on_what, or the loss mask was built wrongly)"
            )
        occ = _stop_occurrences(tokens, stops)
        ends = [e for e, _ in occ]
        checked_upto = -1  # occurrences already verified, so each is checked once
        for p, w in enumerate(weights):
            if w == 0:
                continue
            k = bisect.bisect_right(ends, p)  # first occurrence ending after p (p may sit inside it)
            if k == len(occ):
                raise ValueError(
                    f"{label}: weighted token at position {p} is never followed by an EOS/end-of-turn token "
                    f"{sorted(single_eos) or [list(s) for s in stops]} (truncated, or the template closes no turn); "
                    "the model would not learn to stop"
                )
            if k <= checked_upto:
                continue
            end, start = occ[k]
            masked = [q for q in range(start, end) if weights[q] == 0]
            if masked:
                raise ValueError(
                    f"{label}: EOS/end-of-turn token {tokens[start:end]} at position {start} closes the weighted "
                    f"turn containing position {p} but has weight 0 (EOS masked out, e.g. because pad == eos); "
                    "the model would never learn to stop"
                )
            if pad_token_id is not None and int(pad_token_id) in single_eos and end - start == 1:
                raise ValueError(
                    f"{label}: pad_token_id {pad_token_id} equals the EOS token trained at position {start}; a "
                    "collator that masks pad tokens would mask out EOS. Use a distinct pad token"
                )
            checked_upto = k


_GREEN, _RESET = "\x1b[1;32m", "\x1b[0m"


def format_weighted_example(
    tokens: list[int], weights: list[float], tokenizer: Any, color: bool = True
) -> str:
    """The decoded example with weighted (w != 0) tokens highlighted: ANSI green, or [[...]] when color=False."""
    if len(tokens) != len(weights):
        raise ValueError(f"tokens and weights differ in length: {len(tokens)} vs {len(weights)}")
    parts: list[str] = []
    j = 0
    while j < len(tokens):
        on = weights[j] != 0
        k = j
        while k < len(tokens) and (weights[k] != 0) == on:
            k += 1
        # Decode whole runs, not single tokens, so multi-byte characters split across tokens stay intact.
        text = decode(tokenizer, tokens[j:k])
        parts.append((f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]") if on else text)
        j = k
    return "".join(parts)
