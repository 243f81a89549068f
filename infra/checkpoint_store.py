"""Commit a locally committed checkpoint directory to storage, manifest last, reusing its own manifest.

training_core writes `manifest.json` in the same format as infra.storage, so the object in storage and the
local directory verify the same way; an identical re-upload (a retried task) is a no-op.
"""

from __future__ import annotations

from pathlib import Path

from infra.storage_base import (
    MANIFEST_NAME,
    CheckpointExistsError,
    Manifest,
    Storage,
    StorageError,
    dir_prefix,
    join_key,
    norm_key,
)
from training_core.checkpoint import verify_checkpoint


def upload_committed_dir(storage: Storage, local_dir: str | Path, prefix: str) -> Manifest:
    local = Path(local_dir)
    verify_checkpoint(local)  # never publish a half-written or tampered checkpoint
    raw = (local / MANIFEST_NAME).read_bytes()
    manifest = Manifest.from_json(raw, str(local / MANIFEST_NAME))
    prefix = norm_key(prefix)
    if storage.is_committed(prefix):
        existing = storage.read_manifest(prefix)
        if existing.same_content(manifest):
            return existing
        raise CheckpointExistsError(f"{storage.uri(prefix)} already holds a different committed checkpoint")
    for obj in storage.list(dir_prefix(prefix)):  # leftovers of an interrupted upload
        if obj.key[len(prefix) + 1 :] not in manifest.files:
            storage.delete(obj.key)
    for rel in manifest.files:
        storage.put_file(join_key(prefix, rel), local / rel)
    sizes = {o.key[len(prefix) + 1 :]: o.size for o in storage.list(dir_prefix(prefix))}
    for rel, entry in manifest.files.items():
        if sizes.get(rel) != entry.size:
            raise StorageError(f"{storage.uri(join_key(prefix, rel))}: stored size {sizes.get(rel)} != {entry.size}")
    if not storage.put_bytes_if_absent(join_key(prefix, MANIFEST_NAME), raw):
        existing = storage.read_manifest(prefix)
        if not existing.same_content(manifest):
            raise CheckpointExistsError(f"{storage.uri(prefix)} was committed concurrently with other content")
    return manifest
