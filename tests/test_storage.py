"""Storage behaviour on file:// and on a real S3 server (SeaweedFS), checked against hashlib / the filesystem."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from infra.s3_server import S3Endpoint
from infra.storage import (
    MANIFEST_NAME,
    CheckpointExistsError,
    CorruptCheckpointError,
    LocalStorage,
    ObjectNotFoundError,
    Storage,
    manifest_for_dir,
    open_storage,
)
from infra.storage_base import UPLOAD_MARKER
from infra.storage_s3 import S3Storage
from tests.s3_fixtures import s3_bucket, s3_endpoint  # noqa: F401


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage(f"file://{tmp_path / 'store'}")
    ep: S3Endpoint = request.getfixturevalue("s3_endpoint")
    bucket: str = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/t-{uuid.uuid4().hex[:8]}", **ep.storage_options())


def _make_ckpt(root: Path, seed: int = 0) -> dict[str, bytes]:
    rng = __import__("random").Random(seed)
    files = {
        "model.safetensors": rng.randbytes(300_000),
        "config.json": json.dumps({"seed": seed}).encode(),
        "optimizer/state.pt": rng.randbytes(50_000),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


class Spy:
    """Wraps a Storage, recording every write key in order."""

    def __init__(self, inner: Storage) -> None:
        self.inner, self.writes = inner, []  # type: ignore[var-annotated]

    def install(self) -> None:
        for name in ("put_bytes", "put_file", "put_bytes_if_absent"):
            orig = getattr(self.inner, name)

            def wrapped(key: str, *a: object, _orig=orig, **k: object) -> object:
                self.writes.append(key)
                return _orig(key, *a, **k)

            setattr(self.inner, name, wrapped)


def test_object_roundtrip_list_delete(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("a/b/x.bin", b"\x00\x01" * 1000)
    storage.put_bytes("a/bc/y.txt", b"y")
    storage.put_bytes("z.txt", b"zz")
    assert storage.get_bytes("a/b/x.bin") == b"\x00\x01" * 1000
    assert storage.exists("z.txt") and not storage.exists("a/b")
    # Plain string prefix match (S3 semantics), sizes from the store.
    assert [(o.key, o.size) for o in storage.list("a/b")] == [("a/b/x.bin", 2000), ("a/bc/y.txt", 1)]
    assert [o.key for o in storage.list("a/b/")] == ["a/b/x.bin"]
    assert all(abs(o.mtime - os.path.getmtime(__file__)) < 10 * 365 * 86400 for o in storage.list(""))
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(70_000))
    storage.put_file("f/src.bin", src)
    storage.get_file("f/src.bin", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("missing")
    with pytest.raises(ObjectNotFoundError):
        storage.get_file("missing", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # delete_prefix has directory semantics: 'a/b' must not touch 'a/bc'.
    assert storage.delete_prefix("a/b") == 1
    assert [o.key for o in storage.list("")] == ["a/bc/y.txt", "f/src.bin", "z.txt"]
    storage.delete("z.txt")
    storage.delete("z.txt")  # idempotent
    assert not storage.exists("z.txt")
    with pytest.raises(ValueError):
        storage.put_bytes("a/../etc", b"")
    assert storage.uri("a/bc/y.txt").endswith("/a/bc/y.txt")


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = LocalStorage(tmp_path / "s")
    st.put_bytes("k.bin", b"old")

    def failing_copy(src: object, dst: object, length: int = 0) -> None:
        dst.write(b"half-written")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", failing_copy)
    (tmp_path / "new.bin").write_bytes(b"new content")
    with pytest.raises(OSError, match="disk full"):
        st.put_file("k.bin", tmp_path / "new.bin")
    assert st.get_bytes("k.bin") == b"old"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k.bin"]  # no temp file left behind
    assert st.put_bytes_if_absent("k.bin", b"x") is False and st.get_bytes("k.bin") == b"old"


def test_checkpoint_roundtrip_manifest_last(storage: Storage, tmp_path: Path) -> None:
    files = _make_ckpt(tmp_path / "ck")
    spy = Spy(storage)
    spy.install()
    manifest = storage.upload_dir(tmp_path / "ck", "run1/step-10", metadata={"eval/accuracy": 0.5})
    # the upload marker first (an interrupted upload is recognisable), the manifest last (the commit point),
    # and the marker gone once committed
    assert spy.writes[0] == f"run1/step-10/{UPLOAD_MARKER}" and spy.writes[-1] == f"run1/step-10/{MANIFEST_NAME}"
    assert sorted(spy.writes[1:-1]) == sorted(f"run1/step-10/{k}" for k in files)
    assert not storage.exists(f"run1/step-10/{UPLOAD_MARKER}")
    stored = json.loads(storage.get_bytes(f"run1/step-10/{MANIFEST_NAME}"))
    for rel, data in files.items():
        assert stored["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert stored["metadata"] == {"eval/accuracy": 0.5}
    assert manifest.total_bytes == sum(len(d) for d in files.values())
    out = tmp_path / "dl"
    storage.download_dir("run1/step-10", out)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert storage.is_committed("run1/step-10")


def test_partial_checkpoint_is_invisible_and_refused(storage: Storage, tmp_path: Path) -> None:
    _make_ckpt(tmp_path / "ck")
    storage.upload_dir(tmp_path / "ck", "run1/step-1")
    # A writer that died before the manifest: files present, no manifest.
    storage.put_file("run1/step-2/model.safetensors", tmp_path / "ck" / "model.safetensors")
    assert storage.list_committed("run1") == ["run1/step-1"]
    assert not storage.is_committed("run1/step-2")
    with pytest.raises(CorruptCheckpointError, match="not committed"):
        storage.download_dir("run1/step-2", tmp_path / "x")
    # The same prefix string without a directory boundary must not count: run1/step-1 vs run1/step-10.
    storage.upload_dir(tmp_path / "ck", "run1/step-10")
    assert storage.list_committed("run1/step-1") == ["run1/step-1"]
    assert storage.list_committed("") == ["run1/step-1", "run1/step-10"]


def test_corrupted_file_names_the_file(storage: Storage, tmp_path: Path) -> None:
    _make_ckpt(tmp_path / "ck")
    storage.upload_dir(tmp_path / "ck", "c/1")
    storage.put_bytes("c/1/optimizer/state.pt", b"bit rot")
    out = tmp_path / "dl"
    with pytest.raises(CorruptCheckpointError, match=r"optimizer/state\.pt.*does not match"):
        storage.download_dir("c/1", out)
    assert not any(p.is_file() for p in out.rglob("*"))  # nothing half-verified left in the target
    storage.delete("c/1/config.json")
    with pytest.raises(CorruptCheckpointError, match=r"config\.json.*missing"):
        storage.download_dir("c/1", out)
    storage.put_bytes("c/1/manifest.json", b"{not json")
    with pytest.raises(CorruptCheckpointError, match="manifest.json.*not valid JSON"):
        storage.download_dir("c/1", out)


def test_committed_checkpoint_is_never_overwritten(storage: Storage, tmp_path: Path) -> None:
    _make_ckpt(tmp_path / "a", seed=1)
    _make_ckpt(tmp_path / "b", seed=2)
    first = storage.upload_dir(tmp_path / "a", "r/s", metadata={"try": 1})
    spy = Spy(storage)
    spy.install()
    again = storage.upload_dir(tmp_path / "a", "r/s", metadata={"try": 2})  # idempotent retry
    assert spy.writes == [] and again.metadata == {"try": 1} and again.files == first.files
    with pytest.raises(CheckpointExistsError, match="refusing to overwrite"):
        storage.upload_dir(tmp_path / "b", "r/s")
    assert storage.read_manifest("r/s").files == first.files


def test_retry_after_partial_upload_removes_leftovers(storage: Storage, tmp_path: Path) -> None:
    _make_ckpt(tmp_path / "ck")
    storage.put_bytes("r/s/stale-from-crashed-attempt.bin", b"junk")
    storage.upload_dir(tmp_path / "ck", "r/s")
    keys = sorted(o.key for o in storage.list("r/s/"))
    assert keys == sorted(
        ["r/s/manifest.json", "r/s/config.json", "r/s/model.safetensors", "r/s/optimizer/state.pt"]
    )
    assert storage.delete_checkpoint("r/s") == 4 and storage.list("r/") == []


def test_manifest_collision_and_nested_manifest(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "s")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_text("{}")  # not our format: a name collision
    (tmp_path / "bad" / "w.bin").write_bytes(b"w")
    with pytest.raises(ValueError, match="collide"):
        st.upload_dir(tmp_path / "bad", "x")
    (tmp_path / "ok" / "tok").mkdir(parents=True)
    (tmp_path / "ok" / "tok" / MANIFEST_NAME).write_text("{}")  # content, not a nested checkpoint
    st.upload_dir(tmp_path / "ok", "x")
    assert st.list_committed("") == ["x"]


def test_open_storage_uris_and_s3_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert open_storage(f"file://{tmp_path}").uri("k") == f"file://{tmp_path}/k"
    with pytest.raises(ValueError, match="unsupported"):
        open_storage("gs://b/p")
    for var in ("TUNELOOP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    st = open_storage("s3://bkt/a/b", access_key="k", secret_key="s", max_attempts=7)
    assert isinstance(st, S3Storage) and st.client.meta.endpoint_url == "http://127.0.0.1:2"
    assert (st.bucket, st.prefix, st.uri("c")) == ("bkt", "a/b", "s3://bkt/a/b/c")
    monkeypatch.setenv("TUNELOOP_S3_ENDPOINT", "http://127.0.0.1:3")
    st = open_storage("s3://bkt", access_key="k", secret_key="s")
    assert st.client.meta.endpoint_url == "http://127.0.0.1:3" and st.uri() == "s3://bkt"
    explicit = open_storage(
        "s3://bkt", endpoint_url="http://127.0.0.1:4", access_key="k", secret_key="s", max_attempts=7
    )
    cfg = explicit.client.meta.config
    assert explicit.client.meta.endpoint_url == "http://127.0.0.1:4"
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 7}
    assert cfg.s3["addressing_style"] == "path"


def test_s3_multipart(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    st = open_storage(
        f"s3://{s3_bucket}/mp-{uuid.uuid4().hex[:6]}",
        **s3_endpoint.storage_options(),
        multipart_threshold=5 << 20,
        multipart_chunksize=5 << 20,
    )
    assert isinstance(st, S3Storage)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 << 20))
    st.put_file("big.bin", big)
    head = st.client.head_object(Bucket=st.bucket, Key=f"{st.prefix}/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # S3 multipart ETag: 11 MiB in 5 MiB parts = 3 parts
    st.get_file("big.bin", tmp_path / "back.bin")
    assert (
        hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest()
        == hashlib.sha256(big.read_bytes()).digest()
    )


def test_s3_server_persists_across_restart(tmp_path: Path) -> None:
    """SeaweedFS is a real store: an object written before a restart is read back after it."""
    from infra.s3_server import running_s3_server

    with running_s3_server(
        tmp_path / "data", access_key="ak-test", secret_key="sk-test-123", buckets=("keep",)
    ) as ep:
        open_storage("s3://keep/p", **ep.storage_options()).put_bytes("obj", b"survives")
    with running_s3_server(tmp_path / "data", access_key="ak-test", secret_key="sk-test-123") as ep2:
        assert open_storage("s3://keep/p", **ep2.storage_options()).get_bytes("obj") == b"survives"


def test_upload_reuses_a_valid_local_manifest(tmp_path: Path) -> None:
    """A dir already committed locally (manifest.json in our format) uploads with that manifest, verified."""
    st = LocalStorage(tmp_path / "s")
    files = _make_ckpt(tmp_path / "ck")
    m = manifest_for_dir(tmp_path / "ck", {"step": 3})
    m.created_at = 1000.0
    (tmp_path / "ck" / MANIFEST_NAME).write_bytes(m.to_json())
    up = st.upload_dir(tmp_path / "ck", "r/s", metadata={"eval": 0.9})
    assert up.created_at == 1000.0 and up.metadata == {"step": 3, "eval": 0.9}
    assert set(up.files) == set(files)
    (tmp_path / "ck" / "config.json").write_text("tampered")
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        st.upload_dir(tmp_path / "ck", "r/t")
    assert not st.is_committed("r/t")
