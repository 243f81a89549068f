"""One storage interface over URIs: `file://path` or a plain path, and `s3://bucket/prefix`.

    st = open_storage("s3://ckpts/team-a")          # endpoint from TUNELOOP_S3_ENDPOINT / AWS_ENDPOINT_URL[_S3]
    manifest = st.upload_dir("out/step-100", "run-7/step-100")   # manifest.json written last = commit
    st.list_committed("run-7")                      # only fully uploaded checkpoints
    st.download_dir("run-7/step-100", "/tmp/ck")    # every sha256 verified, CorruptCheckpointError otherwise

The backends live in storage_local.py and storage_s3.py; the checkpoint logic is in storage_base.py.
"""

from __future__ import annotations

import os
from typing import Any

from infra.storage_base import (
    MANIFEST_NAME,
    CheckpointExistsError,
    CorruptCheckpointError,
    FileEntry,
    Manifest,
    ObjectInfo,
    ObjectNotFoundError,
    Storage,
    StorageError,
    join_key,
    manifest_for_dir,
    sha256_file,
)
from infra.storage_local import LocalStorage

__all__ = [
    "MANIFEST_NAME",
    "CheckpointExistsError",
    "CorruptCheckpointError",
    "FileEntry",
    "LocalStorage",
    "Manifest",
    "ObjectInfo",
    "ObjectNotFoundError",
    "Storage",
    "StorageError",
    "join_key",
    "manifest_for_dir",
    "open_storage",
    "sha256_file",
]


def open_storage(uri: str | os.PathLike[str], **s3_options: Any) -> Storage:
    """Open `file://path`, a plain path, or `s3://bucket[/prefix]`.

    s3_options go to S3Storage: endpoint_url, access_key, secret_key, region, max_attempts,
    multipart_threshold, multipart_chunksize, max_concurrency, connect_timeout, read_timeout, and
    create_bucket=True to create a missing bucket (dev servers).
    """
    text = os.fspath(uri)
    if text.startswith("s3://"):
        from infra.storage_s3 import S3Storage  # boto3 import only when S3 is used

        rest = text[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"{text!r}: missing bucket name (expected s3://bucket/prefix)")
        create = bool(s3_options.pop("create_bucket", False))
        st = S3Storage(bucket, prefix, **s3_options)
        if create:
            st.ensure_bucket()
        return st
    if s3_options:
        raise TypeError(f"options {sorted(s3_options)} only apply to s3:// URIs, not {text!r}")
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ValueError(
            f"unsupported storage URI {text!r}: use file://path, a plain path or s3://bucket/prefix"
        )
    if not text:
        raise ValueError("empty storage path")
    return LocalStorage(text)
