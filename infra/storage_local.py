"""file:// backend: a directory tree; every write is temp file + fsync + rename, so readers never see half a file."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path

from infra.storage_base import ObjectInfo, ObjectNotFoundError, Storage, StorageError, norm_key

_TMP_MARK = ".tmp-"
# Hidden names of half-written things: this module's file writes and training_core's checkpoint dirs
# (`.step-000004.tmp-1a2b3c4d`), download staging (`.init.partial-x1y2`). Never listed as objects.
_TEMP_RE = re.compile(r"^\..+\.(tmp|partial)-[A-Za-z0-9_]+$")


def _is_temp(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def _tree_size_mtime(path: Path) -> tuple[int, float]:
    """Total bytes and newest mtime of a file or a directory tree (the dir's own mtime included)."""
    if not path.is_dir():
        st = path.stat()
        return st.st_size, st.st_mtime
    size, mtime = 0, path.stat().st_mtime
    for dirpath, _, filenames in os.walk(path):
        mtime = max(mtime, os.stat(dirpath).st_mtime)
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(Path(dirpath) / name)
                size, mtime = size + st.st_size, max(mtime, st.st_mtime)
    return size, mtime


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri()!r})"

    def _path(self, key: str) -> Path:
        return self.root / norm_key(key)

    def _temp_beside(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.parent / f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"

    def _write_temp(self, path: Path, data: bytes) -> Path:
        tmp = self._temp_beside(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        os.replace(self._write_temp(path, data), path)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)  # atomic and fails if path exists, unlike rename
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"{self.uri(key)} does not exist") from exc

    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        path = self._path(key)
        tmp = self._temp_beside(path)
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        src = self._path(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except FileNotFoundError as exc:
            if not src.exists():
                raise ObjectNotFoundError(f"{self.uri(key)} does not exist") from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _walk_root(self, prefix: str) -> tuple[str, Path | None]:
        """(normalised prefix, the deepest directory it pins down or None): walk only that, then filter by
        plain string match."""
        prefix = prefix.replace("\\", "/").lstrip("/")
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        return prefix, (base if base.is_dir() else None)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        prefix, base = self._walk_root(prefix)
        if base is None:
            return []
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not _is_temp(d)]
            for name in filenames:
                if _is_temp(name):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        st = full.stat()
                    except FileNotFoundError:  # deleted while listing
                        continue
                    out.append(ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def list_temp(self, prefix: str = "") -> list[ObjectInfo]:
        prefix, base = self._walk_root(prefix)
        if base is None:
            return []
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            temps = [d for d in dirnames if _is_temp(d)] + [f for f in filenames if _is_temp(f)]
            dirnames[:] = [d for d in dirnames if not _is_temp(d)]  # a temp dir is one entry, not walked
            for name in temps:
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        size, mtime = _tree_size_mtime(full)
                    except FileNotFoundError:  # its writer finished (renamed it) while we looked
                        continue
                    out.append(ObjectInfo(key=key, size=size, mtime=mtime))
        return sorted(out, key=lambda o: o.key)

    def delete_temp(self, key: str) -> None:
        path = self._path(key)
        if not _is_temp(path.name):
            raise StorageError(f"{self.uri(key)} is not a temp entry; refusing to delete it as one")
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        self._drop_empty_parents(path)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except IsADirectoryError as exc:
            raise StorageError(f"{self.uri(key)} is a directory, not an object") from exc
        self._drop_empty_parents(path)

    def _drop_empty_parents(self, path: Path) -> None:
        # Drop now-empty parent directories so deleted checkpoints leave no skeleton behind.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def uri(self, key: str = "") -> str:
        k = norm_key(key, allow_empty=True)
        return f"file://{self.root / k if k else self.root}"
