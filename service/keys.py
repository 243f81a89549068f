"""API keys: `tml-...` secrets shown once, stored as sha256 in a JSON keys file.

The SDK refuses keys without the `tml-` prefix client-side, so every key we mint has it. A key's id (the
first 16 hex digits of its hash) is the owner of every run, checkpoint and sampler it creates. The server
re-reads the file when its mtime changes, so `tuneloop keys revoke` takes effect without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

KEY_PREFIX = "tml-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    return key_hash[:16]


@dataclass
class KeyRecord:
    name: str
    sha256: str
    created_at: str
    revoked: bool = False

    @property
    def id(self) -> str:
        return key_id(self.sha256)


def _read(path: Path) -> list[KeyRecord]:
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text() or "{}")
        return [KeyRecord(**k) for k in doc.get("keys", [])]
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a tuneloop keys file ({e})") from None


def _write(path: Path, keys: list[KeyRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # hashes only, but still private
    with os.fdopen(fd, "w") as f:
        json.dump({"keys": [asdict(k) for k in keys]}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_key(path: Path, name: str) -> tuple[str, KeyRecord]:
    keys = _read(path)
    if any(k.name == name and not k.revoked for k in keys):
        raise ValueError(f"a key named {name!r} already exists in {path}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    rec = KeyRecord(name=name, sha256=hash_key(secret), created_at=dt.datetime.now(dt.UTC).isoformat())
    _write(path, [*keys, rec])
    return secret, rec


def list_keys(path: Path) -> list[KeyRecord]:
    return _read(path)


def revoke_key(path: Path, name_or_id: str) -> KeyRecord:
    keys = _read(path)
    hits = [k for k in keys if not k.revoked and name_or_id in (k.name, k.id)]
    if not hits:
        raise ValueError(f"no active key named {name_or_id!r} in {path}")
    for k in hits:
        k.revoked = True
    _write(path, keys)
    return hits[0]


class KeyRing:
    """Hash -> owner id of the active keys, reloaded when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._active: dict[str, str] = {}

    def owner(self, key: str | None) -> str | None:
        if not key:
            return None
        self._reload()
        return self._active.get(hash_key(key))

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = -1
        if mtime == self._mtime:
            return
        with self._lock:
            keys = _read(self.path)
            self._active = {k.sha256: k.id for k in keys if not k.revoked}
            self._mtime = mtime
