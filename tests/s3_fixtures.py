"""S3 test fixtures: a real SeaweedFS server on 127.0.0.1 shared by the whole session.

If `.ci/run` already started one (python -m infra.services up s3 --env-file F), it exports
TUNELOOP_TEST_S3_ENDPOINT / _ACCESS_KEY / _SECRET_KEY and we use it; otherwise the first test that needs
S3 starts one under a temp dir. Import into a test module with
    from tests.s3_fixtures import s3_endpoint, s3_bucket  # noqa: F401

pytest makes one FixtureDef per importing module, so the server itself is a reference-counted module
global: started once, stopped when the last module's fixture is torn down.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator

import pytest

from infra.s3_server import S3Endpoint, SeaweedS3Server

_lock = threading.Lock()
_state: dict[str, object] = {"refs": 0, "server": None, "endpoint": None, "bucket": None}


def _endpoint_from_env() -> S3Endpoint | None:
    url = os.environ.get("TUNELOOP_TEST_S3_ENDPOINT")
    if not url:
        return None
    return S3Endpoint(
        url,
        os.environ.get("TUNELOOP_TEST_S3_ACCESS_KEY", os.environ.get("AWS_ACCESS_KEY_ID", "")),
        os.environ.get("TUNELOOP_TEST_S3_SECRET_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY", "")),
    )


def _acquire() -> S3Endpoint:
    with _lock:
        if _state["endpoint"] is None:
            ep = _endpoint_from_env()
            if ep is None:
                server = SeaweedS3Server(tempfile.mkdtemp(prefix="tuneloop-s3-"), die_with_parent=True)
                ep = server.start(timeout=60)
                _state["server"] = server
            _state["endpoint"] = ep
        _state["refs"] = int(_state["refs"]) + 1  # type: ignore[call-overload]
        return _state["endpoint"]  # type: ignore[return-value]


def _release() -> None:
    with _lock:
        _state["refs"] = int(_state["refs"]) - 1  # type: ignore[call-overload]
        if _state["refs"] != 0:
            return
        server, ep, bucket = _state["server"], _state["endpoint"], _state["bucket"]
        _state.update(server=None, endpoint=None, bucket=None)
    if server is not None:  # ours: stop it and drop its data dir
        server.stop()  # type: ignore[attr-defined]
        shutil.rmtree(server.data_dir, ignore_errors=True)  # type: ignore[attr-defined]
    elif bucket is not None and ep is not None:  # a shared server (.ci/run): leave it as we found it
        from infra.storage_s3 import S3Storage

        st = S3Storage(str(bucket), **ep.storage_options())  # type: ignore[attr-defined]
        st.delete_prefix("")
        st.client.delete_bucket(Bucket=st.bucket)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    ep = _acquire()
    try:
        yield ep
    finally:
        _release()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: S3Endpoint) -> str:
    """One fresh bucket per test session, so reruns against a long-lived server never collide."""
    from infra.storage_s3 import S3Storage

    with _lock:
        if _state["bucket"] is None:
            name = f"tl-test-{uuid.uuid4().hex[:10]}"
            S3Storage(name, **s3_endpoint.storage_options()).ensure_bucket()
            _state["bucket"] = name
        return str(_state["bucket"])
