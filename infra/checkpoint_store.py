"""Commit a locally committed checkpoint directory to storage, manifest last, reusing its own manifest.

training_core writes `manifest.json` in the same format as infra.storage, so the object in storage and the
local directory verify the same way; an identical re-upload (a retried task) is a no-op.
"""

from __future__ import annotations

from pathlib import Path

from infra.storage_base import Manifest, Storage
from training_core.checkpoint import verify_checkpoint


def upload_committed_dir(storage: Storage, local_dir: str | Path, prefix: str) -> Manifest:
    verify_checkpoint(local_dir)  # never publish a half-written or tampered checkpoint
    return storage.upload_dir(local_dir, prefix)
