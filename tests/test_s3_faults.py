"""Fault injection between storage and a real S3 server: 500s, dropped connections, uploads cut mid-body.

Every scenario is recorded (what was injected, what the pipeline did, what was left in storage) and the
report is written to $TUNELOOP_FAULT_REPORT (default /tmp/tuneloop-fault-report.json) and printed (-s).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.faultproxy import FaultProxy, FaultRule
from infra.s3_server import S3Endpoint
from infra.storage import CorruptCheckpointError, StorageError, open_storage
from infra.storage_s3 import S3Storage
from tests.s3_fixtures import s3_bucket, s3_endpoint  # noqa: F401

MAX_ATTEMPTS = 4
REPORT: list[dict[str, Any]] = []
PART_PUT = r"weights\.bin\?.*partNumber="  # UploadPart requests of the multipart weights file


@pytest.fixture(scope="module", autouse=True)
def fault_report() -> Iterator[None]:
    yield
    path = Path(os.environ.get("TUNELOOP_FAULT_REPORT", "/tmp/tuneloop-fault-report.json"))
    path.write_text(json.dumps(REPORT, indent=2))
    print(f"\n=== S3 fault-injection report ({path}) ===")
    for r in REPORT:
        print(
            f"- {r['scenario']}: injected {r['injected']['by_action']} -> {r['pipeline']}; "
            f"storage: committed={r['storage']['committed']} objects={len(r['storage']['keys'])} "
            f"open_multipart={r['storage']['open_multipart_uploads']}"
        )


@pytest.fixture()
def proxy(s3_endpoint: S3Endpoint) -> Iterator[FaultProxy]:  # noqa: F811
    with FaultProxy(s3_endpoint.url) as p:
        yield p


@pytest.fixture()
def store(proxy: FaultProxy, s3_endpoint: S3Endpoint, s3_bucket: str) -> S3Storage:  # noqa: F811
    opts = {**s3_endpoint.storage_options(), "endpoint_url": proxy.url}
    st = open_storage(
        f"s3://{s3_bucket}/faults-{uuid.uuid4().hex[:8]}",
        **opts,
        max_attempts=MAX_ATTEMPTS,
        multipart_threshold=5 << 20,
        multipart_chunksize=5 << 20,
    )
    assert isinstance(st, S3Storage)
    return st


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    rng = random.Random(0)
    (root / "weights.bin").write_bytes(rng.randbytes(11 << 20))  # 3 multipart parts of 5 MiB
    (root / "config.json").write_text(json.dumps({"hidden": 64}))
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_bytes(rng.randbytes(200_000))
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _storage_state(st: S3Storage, prefix: str) -> dict[str, Any]:
    uploads = st.client.list_multipart_uploads(Bucket=st.bucket, Prefix=f"{st.prefix}/{prefix}").get(
        "Uploads", []
    )
    return {
        "committed": st.list_committed(prefix),
        "keys": [o.key for o in st.list(prefix + "/")],
        "open_multipart_uploads": len(uploads),
    }


def _record(scenario: str, proxy: FaultProxy, pipeline: str, st: S3Storage, prefix: str) -> dict[str, Any]:
    entry = {
        "scenario": scenario,
        "injected": proxy.summary(),
        "pipeline": pipeline,
        "storage": _storage_state(st, prefix),
    }
    REPORT.append(entry)
    return entry


@pytest.mark.parametrize("action", ["error500", "drop", "cut", "lose_response"])
def test_transient_faults_are_retried(
    action: str, proxy: FaultProxy, store: S3Storage, ckpt_dir: Path, tmp_path: Path
) -> None:
    # Upload side: 2 multipart parts, the small single-PUT file once, the manifest commit once.
    proxy.add_rule(FaultRule(action, method="PUT", path_regex=PART_PUT, count=2))  # type: ignore[arg-type]
    proxy.add_rule(FaultRule(action, method="PUT", path_regex=r"config\.json", count=1))  # type: ignore[arg-type]
    proxy.add_rule(FaultRule(action, method="PUT", path_regex=r"manifest\.json", count=1))  # type: ignore[arg-type]
    # Download side: the first two GETs (a response "cut" is not defined for GET; use drop there).
    get_action = "drop" if action in ("cut", "lose_response") else action
    proxy.add_rule(FaultRule(get_action, method="GET", path_regex=r"/faults-", count=2))  # type: ignore[arg-type]
    manifest = store.upload_dir(ckpt_dir, "run/step-1")
    out = tmp_path / "dl"
    store.download_dir("run/step-1", out)
    injected = proxy.injected()
    assert len(injected) == 6, proxy.summary()
    assert _hashes(out) == _hashes(ckpt_dir) == {k: e.sha256 for k, e in manifest.files.items()}
    state = _record(f"transient {action}", proxy, "retried and completed; download verified", store, "run")[
        "storage"
    ]
    assert state == {
        "committed": ["run/step-1"],
        "keys": sorted(["run/step-1/manifest.json", "run/step-1/weights.bin", "run/step-1/config.json",
                        "run/step-1/tok/tokenizer.json"]),
        "open_multipart_uploads": 0,
    }  # fmt: skip


def test_cut_upload_with_retries_exhausted_leaves_nothing_visible(
    proxy: FaultProxy, store: S3Storage, ckpt_dir: Path, tmp_path: Path
) -> None:
    store.upload_dir(ckpt_dir, "run/step-1")  # an earlier good checkpoint that must survive
    proxy.add_rule(FaultRule("cut", method="PUT", path_regex=PART_PUT, after=1, count=-1))
    with pytest.raises(StorageError, match=r"weights\.bin") as err:
        store.upload_dir(ckpt_dir, "run/step-2")
    cut = [e for e in proxy.injected() if e.action == "cut"]
    assert len(cut) >= MAX_ATTEMPTS and all(0 < e.forwarded_bytes < e.body_bytes for e in cut)
    assert not store.is_committed("run/step-2")
    assert store.list_committed("run") == ["run/step-1"]
    with pytest.raises(CorruptCheckpointError, match="not committed"):
        store.download_dir("run/step-2", tmp_path / "never")
    assert not (tmp_path / "never").exists()
    failed = _record("cut mid-body, retries exhausted", proxy,
                     f"upload_dir raised after {MAX_ATTEMPTS} attempts per request, no manifest written: {err.value}",
                     store, "run")["storage"]  # fmt: skip
    assert failed["open_multipart_uploads"] == 0  # s3transfer aborted the multipart upload
    assert "run/step-2/manifest.json" not in failed["keys"]

    proxy.reset()  # the network heals; the pipeline's retry of the same step
    store.upload_dir(ckpt_dir, "run/step-2")
    for step in ("step-1", "step-2"):
        store.download_dir(f"run/{step}", tmp_path / step)
        assert _hashes(tmp_path / step) == _hashes(ckpt_dir)
    healed = _record(
        "retry after the cut", proxy, "second upload_dir committed; both checkpoints verify", store, "run"
    )
    assert healed["storage"]["committed"] == ["run/step-1", "run/step-2"]
    assert healed["injected"]["by_action"] == {"forward": healed["injected"]["requests"]}


def test_download_retries_exhausted_leaves_target_empty(
    proxy: FaultProxy, store: S3Storage, ckpt_dir: Path, tmp_path: Path
) -> None:
    store.upload_dir(ckpt_dir, "run/step-1")
    proxy.add_rule(FaultRule("error500", method="GET", path_regex=r"tokenizer\.json", count=-1))
    out = tmp_path / "dl"
    with pytest.raises(StorageError, match=r"tokenizer\.json") as err:
        store.download_dir("run/step-1", out)
    assert not any(p.is_file() for p in out.rglob("*"))  # nothing unverified was placed in the target
    _record(
        "GET 500 forever on one file",
        proxy,
        f"download_dir raised, target dir left empty: {err.value}",
        store,
        "run",
    )
    proxy.reset()
    store.download_dir("run/step-1", out)
    assert _hashes(out) == _hashes(ckpt_dir)
