"""The "role_colon" renderer for base models (no chat template), Tinker-cookbook style.

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\nUser: ...

A turn is encoded piecewise (role header, then " content\\n\\n") so the generation prompt's tokens are exactly
the prefix of the training tokens. An assistant turn is closed by the stop string "\\n\\nUser:": its weighted
output is " content\\n\\n" plus the following "User:" header (appended after a final assistant message), so the
model learns to emit the stop string.
"""

from __future__ import annotations

from typing import Any

from training_core.renderer_base import (
    Message,
    TrainOnWhat,
    check_messages,
    decode,
    eos_ids,
    is_trained_turn,
    zero_after_last_stop,
)
from training_core.types import ModelInput

STOP_STRING = "\n\nUser:"


class RoleColonRenderer:
    name = "role_colon"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._user_header = self._encode("User:")

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [] if bos is None else [int(bos)]

    @staticmethod
    def _header_text(role: str) -> str:
        return f"{role.capitalize()}:"

    def build_supervised_example(
        self, messages: list[Message], train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE
    ) -> tuple[list[int], list[float]]:
        check_messages(messages)
        train_on_what = TrainOnWhat(train_on_what)
        tokens = self._bos()
        weights = [0.0] * len(tokens)  # BOS is never a prediction target
        for i, m in enumerate(messages):
            trained = is_trained_turn(messages, i, train_on_what)
            header = self._encode(self._header_text(m["role"]))
            # "User:" after a trained assistant turn completes that turn's stop string.
            prev_trained_assistant = (
                i > 0
                and messages[i - 1]["role"] == "assistant"
                and is_trained_turn(messages, i - 1, train_on_what)
            )
            header_w = 1.0 if train_on_what == TrainOnWhat.ALL_MESSAGES else 0.0
            if m["role"] == "user" and prev_trained_assistant:
                header_w = 1.0
            body = self._encode(f" {m['content']}\n\n")
            tokens += header + body
            weights += [header_w] * len(header) + [1.0 if trained else 0.0] * len(body)
        last = len(messages) - 1
        if messages[last]["role"] == "assistant" and is_trained_turn(messages, last, train_on_what):
            tokens += self._user_header
            weights += [1.0] * len(self._user_header)
        if train_on_what == TrainOnWhat.ALL_MESSAGES:
            zero_after_last_stop(tokens, weights, self.get_end_of_turn_sequences())
        return tokens, weights

    def build_generation_prompt(self, messages: list[Message]) -> ModelInput:
        check_messages(messages)
        tokens = self._bos()
        for m in messages:
            tokens += self._encode(self._header_text(m["role"])) + self._encode(f" {m['content']}\n\n")
        tokens += self._encode("Assistant:")
        return ModelInput.from_ints(tokens)

    def get_stop_sequences(self) -> list[int]:
        # Token-level stops only (the base model's EOS); the turn's real stop is the string "\n\nUser:".
        return eos_ids(self.tokenizer)

    def get_stop_strings(self) -> list[str]:
        return [STOP_STRING]

    def get_end_of_turn_sequences(self) -> list[list[int]]:
        return [list(self._user_header)] + [[e] for e in eos_ids(self.tokenizer)]

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        """Content before "\\n\\nUser:" (or EOS), stripped; clean stop iff one of them was produced."""
        eos = set(eos_ids(self.tokenizer))
        cut = next((j for j, t in enumerate(tokens) if t in eos), None)
        text = decode(self.tokenizer, tokens[:cut] if cut is not None else tokens, skip_special_tokens=True)
        if STOP_STRING in text:
            return {"role": "assistant", "content": text.split(STOP_STRING, 1)[0].strip()}, True
        return {"role": "assistant", "content": text.strip()}, cut is not None
