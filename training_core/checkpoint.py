"""Atomic, verifiable checkpoint directories.

A checkpoint is written into a hidden temp dir next to its final name, each file is hashed, `manifest.json`
(sha256 + size of every file) is written last, then the dir is renamed into place. A reader trusts a
checkpoint only if its manifest exists and every hash matches. Only safetensors and JSON: nothing is ever
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "tuneloop.checkpoint.manifest/v1"  # shared with infra.storage (same manifest on disk and in S3)


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpointError(CheckpointError):
    """Missing manifest, missing file or hash mismatch: the checkpoint is half-written or tampered with."""


class CheckpointExistsError(CheckpointError):
    """A finished checkpoint is never overwritten."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_committed(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_checkpoint(
    final_dir: str | Path, writers: dict[str, Callable[[Path], None]], metadata: dict[str, Any]
) -> Path:
    """Write files via `writers[name](path)` into a temp dir, add the manifest last, rename into place."""
    final = Path(final_dir)
    if final.exists():
        raise CheckpointExistsError(f"checkpoint {final} already exists; refusing to overwrite a finished checkpoint")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        for name, write in writers.items():
            p = tmp / name
            write(p)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {"format": FORMAT, "created_at": time.time(), "total_bytes": sum(f["size"] for f in files.values()),
                    "files": files, "metadata": metadata}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    m = p / MANIFEST
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint at {p}")
    if not m.is_file():
        raise CorruptCheckpointError(f"checkpoint {p} has no {MANIFEST}: it is half-written or not a checkpoint")
    try:
        manifest = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{m}: invalid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{m}: unknown format {manifest.get('format')!r}")
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return the manifest after checking every file's size and sha256; raise CorruptCheckpointError."""
    p = Path(path)
    manifest = read_manifest(p)
    for name, info in manifest["files"].items():
        f = p / name
        if not f.is_file():
            raise CorruptCheckpointError(f"checkpoint {p}: file {name} listed in the manifest is missing")
        if f.stat().st_size != info["size"] or sha256_file(f) != info["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {p}: file {name} does not match its manifest sha256")
    return manifest
