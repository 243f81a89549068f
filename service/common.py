"""What every router shares: the server context, auth, and JSON parsing that names the bad field."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError

from service.checkpoints import CheckpointStore
from service.db import Store
from service.keys import KeyRing
from service.runtime import Runtime

M = TypeVar("M", bound=BaseModel)


@dataclass
class Ctx:
    runtime: Runtime
    store: Store
    ckpts: CheckpointStore
    keys: KeyRing
    max_body_bytes: int = 256 << 20
    poll_timeout_s: float = 25.0  # long-poll hold; the SDK's own read timeout is 45 s

    @property
    def auth(self) -> Callable[[Request], str]:
        keys, limit = self.keys, self.max_body_bytes

        def dependency(request: Request) -> str:
            """The caller's owner id; 401 before anything runs when the key is missing or unknown."""
            owner = keys.owner(request.headers.get("x-api-key"))
            if owner is None:
                missing = not request.headers.get("x-api-key")
                raise HTTPException(401, "X-API-Key header missing" if missing else "unknown or revoked API key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > limit:
                raise HTTPException(413, f"body: {size} bytes exceed the server's limit of {limit}")
            return owner

        return dependency


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        doc = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"body: malformed JSON ({e})") from None
    if not isinstance(doc, dict):
        raise HTTPException(400, "body: expected a JSON object")
    return doc


def parse_model(model: type[M], raw: dict[str, Any]) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        msgs = ["{}: {}".format(".".join(str(p) for p in err["loc"]) or "body", err["msg"]) for err in e.errors()]
        raise HTTPException(400, "; ".join(msgs[:5])) from None
