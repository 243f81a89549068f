"""The pinned eval protocol and the Generator protocol evals talk to models through.

Scores swing with system prompt, max_tokens, stop sequences, chat template and grader version
(pain-points cluster 1), so every score is stored next to the full protocol and its hash, and two
results are only compared when their protocol hashes match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Messages = list[dict[str, str]]


class ProtocolMismatchError(ValueError):
    """Two results were produced under different eval protocols."""


@dataclass(frozen=True)
class EvalProtocol:
    """Everything that can change a score, apart from the model and the examples themselves."""

    renderer: str = "default"
    system_prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    stop: tuple[str, ...] = ()
    num_samples: int = 1
    grader: str = ""
    grader_version: str = ""
    # Free-form extras a generator may need to reproduce a run (e.g. a timeout); part of the hash.
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Accept lists from YAML/JSON but store tuples so the dataclass stays hashable and frozen.
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        extra = self.extra
        if isinstance(extra, dict):
            extra = tuple(sorted((str(k), str(v)) for k, v in extra.items()))
        object.__setattr__(self, "extra", tuple(tuple(x) for x in extra))
        if self.num_samples < 1:
            raise ValueError(f"EvalProtocol.num_samples must be >= 1, got {self.num_samples}")
        if self.max_tokens < 1:
            raise ValueError(f"EvalProtocol.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"EvalProtocol.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalProtocol.top_p must be in (0, 1], got {self.top_p}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["extra"] = {k: v for k, v in self.extra}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalProtocol:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"EvalProtocol: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def hash(self) -> str:
        """Short stable hash of the canonical JSON form (order-independent, float repr stable)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> EvalProtocol:
        return dataclasses.replace(self, **changes)


def diff_protocols(a: EvalProtocol, b: EvalProtocol) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between two protocols, for error messages."""
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


@runtime_checkable
class Generator(Protocol):
    """What evals needs from a model. The lead implements it over training_core.

    `generate` takes chat messages (the runner has already inserted `protocol.system_prompt`) and
    returns `protocol.num_samples` completions per prompt, honouring the protocol's renderer,
    sampling params, seed and stop strings. `nll` returns (summed NLL in nats, token count) per text.
    """

    name: str

    def generate(self, prompts: list[Messages], protocol: EvalProtocol) -> list[list[str]]: ...

    def nll(self, texts: list[str]) -> list[tuple[float, int]]: ...
