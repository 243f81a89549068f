"""Storage interface shared by the file:// and s3:// backends, plus committed checkpoint directories.

A checkpoint directory is a key prefix holding files and a `manifest.json` (sha256 + size per file). The
manifest is written LAST, so its presence is the commit point: readers (`list_committed`, `download_dir`)
only ever see checkpoints whose every file was uploaded and size-checked before the manifest existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tuneloop.checkpoint.manifest/v1"
# Written before an upload's first file and removed after its manifest: a prefix holding it but no manifest is
# an interrupted upload, the only kind of uncommitted object retention may delete (a run's summary.json,
# report/ ... are never mistaken for one).
UPLOAD_MARKER = "UPLOADING.json"
_HASH_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """Any storage failure; the message names the URI involved."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The key does not exist (also catchable as FileNotFoundError)."""


class CorruptCheckpointError(StorageError):
    """A checkpoint is not committed (no manifest) or a file does not match its manifest entry."""


class CheckpointExistsError(StorageError):
    """Refused to overwrite a committed checkpoint with different content."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root, '/'-separated
    size: int  # bytes
    mtime: float  # epoch seconds (S3: LastModified)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    format: str = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def same_content(self, other: Manifest) -> bool:
        """True when both describe exactly the same files (metadata and timestamps are ignored)."""
        return self.files == other.files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created_at": self.created_at,
            "created_at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
            "total_bytes": self.total_bytes,
            "files": {k: {"sha256": e.sha256, "size": e.size} for k, e in sorted(self.files.items())},
            "metadata": self.metadata,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; `where` (its URI) goes into every error message."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            raise CorruptCheckpointError(f"{where}: field 'format' is not {MANIFEST_FORMAT!r}")
        files_raw = raw.get("files")
        if not isinstance(files_raw, dict):
            raise CorruptCheckpointError(f"{where}: field 'files' missing or not an object")
        files: dict[str, FileEntry] = {}
        for name, entry in files_raw.items():
            try:
                files[name] = FileEntry(sha256=str(entry["sha256"]), size=int(entry["size"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptCheckpointError(f"{where}: files[{name!r}] lacks sha256/size ({exc})") from exc
        return cls(
            files=files,
            metadata=dict(raw.get("metadata") or {}),
            created_at=float(raw.get("created_at", 0.0)),
        )


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_for_dir(local_dir: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Manifest:
    """Hash every regular file under local_dir (symlinks followed, as in HF caches).

    A top-level manifest.json in our format (training_core writes one when it commits a checkpoint
    locally) is checked against the files and reused, keeping its metadata and created_at; `metadata`
    is merged over it. Any other top-level manifest.json is refused as a name collision.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint source {root} is not a directory")
    files: dict[str, FileEntry] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_NAME:
            files[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    if not files:
        raise ValueError(f"checkpoint source {root} contains no files")
    local_manifest = root / MANIFEST_NAME
    if not local_manifest.is_file():
        return Manifest(files=files, metadata=dict(metadata or {}))
    raw = local_manifest.read_bytes()
    try:
        fmt = json.loads(raw).get("format")
    except (ValueError, AttributeError):
        fmt = None
    if fmt != MANIFEST_FORMAT:
        raise ValueError(
            f"{local_manifest}: a file named {MANIFEST_NAME} would collide with the checkpoint manifest"
        )
    existing = Manifest.from_json(raw, str(local_manifest))
    if not existing.same_content(Manifest(files=files)):
        bad = sorted(k for k in files.keys() | existing.files.keys() if files.get(k) != existing.files.get(k))
        raise CorruptCheckpointError(
            f"{root}: local files do not match its {MANIFEST_NAME} (first difference: {bad[0]!r})"
        )
    existing.metadata.update(metadata or {})
    return existing


def norm_key(key: str, *, allow_empty: bool = False) -> str:
    """Canonical '/'-separated relative key; rejects '..' and empty components."""
    k = key.replace("\\", "/").strip("/")
    if not k:
        if allow_empty:
            return ""
        raise ValueError("empty storage key")
    parts = k.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: empty, '.' or '..' component")
    return k


def join_key(prefix: str, name: str) -> str:
    prefix = norm_key(prefix, allow_empty=True)
    return f"{prefix}/{name}" if prefix else name


def dir_prefix(prefix: str) -> str:
    """Directory semantics for a prefix: 'a/b' -> 'a/b/' so that 'a/bc' never matches; '' stays ''."""
    p = norm_key(prefix, allow_empty=True)
    return f"{p}/" if p else ""


class Storage(ABC):
    """Object storage with relative '/'-separated keys. Subclasses implement the primitive operations."""

    # --- primitives -------------------------------------------------------------------------------------
    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> None: ...

    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with `prefix` (plain string match, as in S3), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error."""

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    @abstractmethod
    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if the key does not exist yet (atomic where the backend allows); False if it existed."""

    def list_temp(self, prefix: str = "") -> list[ObjectInfo]:
        """Hidden temp files/dirs a killed local writer left (key, total bytes, newest mtime); `list` skips them.

        Object stores have none: an S3 object appears whole or not at all (abandoned multipart uploads are
        the bucket lifecycle rule AbortIncompleteMultipartUpload's job).
        """
        return []

    def delete_temp(self, key: str) -> None:
        """Delete one entry of `list_temp` (a whole temp dir)."""
        raise StorageError(f"{self.uri(key)}: this storage has no temp entries")

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under the directory `prefix` ('a/b' never touches 'a/bc'); returns the count."""
        objs = self.list(dir_prefix(prefix))
        for o in objs:
            self.delete(o.key)
        return len(objs)

    # --- checkpoint directories ---------------------------------------------------------------------------
    def read_manifest(self, prefix: str) -> Manifest:
        key = join_key(prefix, MANIFEST_NAME)
        try:
            data = self.get_bytes(key)
        except ObjectNotFoundError as exc:
            raise CorruptCheckpointError(
                f"{self.uri(prefix)}: no {MANIFEST_NAME}; the checkpoint is not committed (missing or partial upload)"
            ) from exc
        return Manifest.from_json(data, self.uri(key))

    def is_committed(self, prefix: str) -> bool:
        return self.exists(join_key(prefix, MANIFEST_NAME))

    def upload_dir(
        self, local_dir: str | os.PathLike[str], prefix: str, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        """Upload every file of local_dir under prefix, size-check them, then commit by writing the manifest.

        Idempotent: if prefix already holds a committed checkpoint with identical files, nothing is uploaded
        and the existing manifest is returned; different content raises CheckpointExistsError.
        """
        prefix = norm_key(prefix)
        manifest = manifest_for_dir(local_dir, metadata)
        if UPLOAD_MARKER in manifest.files:
            raise ValueError(f"{local_dir}: a file named {UPLOAD_MARKER} would collide with the upload marker")
        if self.is_committed(prefix):
            return self._existing_or_refuse(prefix, manifest)
        # Leftovers of an earlier interrupted attempt that the new manifest won't list: remove them so
        # nothing unaccounted for stays under a committed prefix.
        for obj in self.list(dir_prefix(prefix)):
            if obj.key[len(prefix) + 1 :] not in manifest.files:
                self.delete(obj.key)
        marker = join_key(prefix, UPLOAD_MARKER)
        self.put_bytes(marker, json.dumps({"started_at": time.time()}).encode())
        root = Path(local_dir)
        for rel in manifest.files:
            self.put_file(join_key(prefix, rel), root / rel)
        self._check_uploaded_sizes(prefix, manifest)
        committed = self.put_bytes_if_absent(join_key(prefix, MANIFEST_NAME), manifest.to_json())
        self.delete(marker)  # a kill right before this leaves a stray marker inside a committed checkpoint: harmless
        if not committed:
            # Someone (or our own retried PUT whose response was lost) committed first.
            return self._existing_or_refuse(prefix, manifest)
        return manifest

    def _existing_or_refuse(self, prefix: str, manifest: Manifest) -> Manifest:
        existing = self.read_manifest(prefix)
        if existing.same_content(manifest):
            return existing
        raise CheckpointExistsError(
            f"{self.uri(prefix)} already holds a committed checkpoint with different content; "
            "refusing to overwrite it (write to a new prefix)"
        )

    def _check_uploaded_sizes(self, prefix: str, manifest: Manifest) -> None:
        seen = {o.key[len(prefix) + 1 :]: o.size for o in self.list(dir_prefix(prefix))}
        for rel, entry in manifest.files.items():
            if seen.get(rel) != entry.size:
                raise StorageError(
                    f"{self.uri(join_key(prefix, rel))}: after upload the stored size is {seen.get(rel)}, "
                    f"expected {entry.size}; not committing the checkpoint"
                )

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> Manifest:
        """Download a committed checkpoint, verifying size and sha256 of every file against the manifest.

        Files are staged in a sibling temp dir and moved into local_dir only after all of them verified,
        so a failed download leaves nothing new in local_dir.
        """
        prefix = norm_key(prefix, allow_empty=True)
        manifest = self.read_manifest(prefix)
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for rel, entry in manifest.files.items():
                key = join_key(prefix, rel)
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.get_file(key, target)
                except ObjectNotFoundError as exc:
                    raise CorruptCheckpointError(
                        f"{self.uri(key)}: file {rel!r} is listed in the manifest but missing from storage"
                    ) from exc
                size = target.stat().st_size
                digest = sha256_file(target)
                if size != entry.size or digest != entry.sha256:
                    raise CorruptCheckpointError(
                        f"{self.uri(key)}: file {rel!r} does not match the manifest "
                        f"(size {size} vs {entry.size}, sha256 {digest[:12]}.. vs {entry.sha256[:12]}..)"
                    )
            for rel in manifest.files:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, dest / rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def list_committed(self, prefix: str = "") -> list[str]:
        """Prefixes of committed checkpoints under the directory `prefix` (the prefix itself included)."""
        suffix = "/" + MANIFEST_NAME
        found = sorted(
            o.key[: -len(suffix)] if o.key != MANIFEST_NAME else ""
            for o in self.list(dir_prefix(prefix))
            if o.key == MANIFEST_NAME or o.key.endswith(suffix)
        )
        # A file named manifest.json inside a committed checkpoint is content, not a nested checkpoint.
        out: list[str] = []
        for p in found:
            if not any(p.startswith(dir_prefix(q)) for q in out if q) and "" not in out:
                out.append(p)
        return out

    def delete_checkpoint(self, prefix: str) -> int:
        """Un-commit first (delete the manifest) so readers never see a half-deleted checkpoint."""
        prefix = norm_key(prefix)
        self.delete(join_key(prefix, MANIFEST_NAME))
        return self.delete_prefix(prefix) + 1
