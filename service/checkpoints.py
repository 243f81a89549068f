"""Where checkpoints live: `tinker://` paths <-> storage prefixes <-> local directories the engine reads.

training_core writes every checkpoint atomically (files, then `manifest.json`, then a rename). With
`file://` storage it writes straight into the storage root; with `s3://` it writes into a local cache and
`infra`'s storage uploads it, manifest last, so an object store never shows a half checkpoint either.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from infra.checkpoint_store import upload_committed_dir
from infra.storage import open_storage
from infra.storage_local import LocalStorage
from training_core.checkpoint import read_manifest

SEGMENTS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


class BadPathError(ValueError):
    pass


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    segment: str
    name: str

    @classmethod
    def parse(cls, path: str, field: str = "path") -> TinkerPath:
        if not path.startswith("tinker://"):
            raise BadPathError(f"{field}: {path!r} is not a tinker:// path")
        parts = path[len("tinker://"):].split("/")
        if len(parts) != 3 or not all(parts) or parts[1] not in SEGMENTS:
            raise BadPathError(f"{field}: {path!r} is not tinker://<run_id>/(weights|sampler_weights|external_weights)/<name>")
        return cls(*parts)

    @property
    def kind(self) -> str:
        return SEGMENTS[self.segment]

    @property
    def checkpoint_id(self) -> str:
        return f"{self.segment}/{self.name}"

    @property
    def prefix(self) -> str:
        return f"{self.run_id}/{self.segment}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.prefix}"


def check_name(name: str, field: str = "path") -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise BadPathError(f"{field}: invalid checkpoint name {name!r} (non-empty, no '/', not hidden)")
    return name


class CheckpointStore:
    def __init__(self, uri: str, cache_dir: Path) -> None:
        self.storage = open_storage(uri)
        self.uri = uri
        local = isinstance(self.storage, LocalStorage)
        self.root = self.storage.root if isinstance(self.storage, LocalStorage) else cache_dir
        self.remote = not local
        self.root.mkdir(parents=True, exist_ok=True)

    def write_dir(self, prefix: str) -> Path:
        """Where the engine writes a new checkpoint (it must not exist yet)."""
        return self.root / prefix

    def commit(self, prefix: str) -> int:
        """After the local atomic write: upload (remote storage). Returns the checkpoint's size in bytes."""
        local = self.root / prefix
        if self.remote:
            upload_committed_dir(self.storage, local, prefix)  # verifies, then uploads the manifest last
        return int(read_manifest(local)["total_bytes"])

    def read_dir(self, prefix: str) -> Path:
        """A local directory holding the committed checkpoint (downloaded and verified when remote)."""
        local = self.root / prefix
        if self.remote and not (local / "manifest.json").is_file():
            self.storage.download_dir(prefix, local)
            # download_dir writes the files; the manifest comes from storage too, so the engine verifies it
            (local / "manifest.json").write_bytes(self.storage.get_bytes(f"{prefix}/manifest.json"))
        return local

    def delete(self, prefix: str) -> None:
        if self.remote:
            self.storage.delete_checkpoint(prefix)
        local = self.root / prefix
        if local.exists():
            # un-commit first (manifest), as infra's storage does, so a reader never sees half a checkpoint
            (local / "manifest.json").unlink(missing_ok=True)
            shutil.rmtree(local, ignore_errors=True)
