"""s3:// backend over boto3: custom endpoint (SeaweedFS/MinIO), path-style, standard retries, multipart, checksums."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError

from infra.storage_base import ObjectInfo, ObjectNotFoundError, Storage, StorageError, norm_key

ENDPOINT_ENV_VARS = ("TUNELOOP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_MiB = 1 << 20
# The parsed service models are the slow part of client creation (~0.15 s); share them between sessions.
_LOADER = botocore.loaders.create_loader()


def resolve_endpoint(explicit: str | None = None) -> str | None:
    """Explicit argument, then TUNELOOP_S3_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL; None means AWS."""
    if explicit:
        return explicit
    for var in ENDPOINT_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        max_attempts: int | None = None,
        multipart_threshold: int = 16 * _MiB,
        multipart_chunksize: int = 16 * _MiB,
        max_concurrency: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        addressing_style: str = "path",
    ) -> None:
        self.bucket = bucket
        self.prefix = norm_key(prefix, allow_empty=True)
        self.endpoint_url = resolve_endpoint(endpoint_url)
        attempts = max_attempts or int(os.environ.get("TUNELOOP_S3_MAX_ATTEMPTS", "5"))
        config = Config(
            # total_max_attempts counts the first try (botocore's "max_attempts" counts only retries).
            retries={"mode": "standard", "total_max_attempts": attempts},
            s3={"addressing_style": addressing_style},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # CRC32 checksums on every upload, validated on download when the object carries one.
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_supported",
            max_pool_connections=max(10, max_concurrency * 2),
        )
        # None credentials fall through to the standard AWS chain (env, profile, IMDS, IRSA ...).
        core = botocore.session.get_session()
        core.register_component("data_loader", _LOADER)
        session = boto3.session.Session(
            botocore_session=core,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
        )
        self.client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            num_download_attempts=attempts,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.uri()!r}, endpoint={self.endpoint_url!r})"

    # --- helpers ------------------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        k = norm_key(key)
        return f"{self.prefix}/{k}" if self.prefix else k

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _error(self, key: str, exc: Exception, action: str) -> StorageError:
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code in _NOT_FOUND:
                return ObjectNotFoundError(f"{self.uri(key)} does not exist")
            if code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}")
        return StorageError(f"{action} {self.uri(key)} failed: {exc}")

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (dev servers; production buckets are provisioned outside)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _NOT_FOUND | {"NoSuchBucket"}:
                raise self._error("", exc, "head bucket") from exc
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc2:
                if _code(exc2) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise self._error("", exc2, "create bucket") from exc2

    # --- primitives ---------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(key, exc, "put") from exc

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = _code(exc)
            if code in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return False
            if code not in {"NotImplemented", "501"}:
                raise self._error(key, exc, "put") from exc
        except BotoCoreError as exc:
            raise self._error(key, exc, "put") from exc
        # Server without conditional writes: check-then-put (racy only between concurrent writers).
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def get_bytes(self, key: str) -> bytes:
        buf = io.BytesIO()
        try:
            # download_fileobj retries interrupted body streams, which a bare get_object().read() does not.
            self.client.download_fileobj(self.bucket, self._key(key), buf, Config=self.transfer)
        except (ClientError, BotoCoreError, RetriesExceededError) as exc:
            raise self._error(key, exc, "get") from exc
        return buf.getvalue()

    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=self.transfer)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._error(key, exc, "upload") from exc

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, dest)
        except (ClientError, BotoCoreError, RetriesExceededError) as exc:
            raise self._error(key, exc, "download") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return False
            raise self._error(key, exc, "head") from exc
        except BotoCoreError as exc:
            raise self._error(key, exc, "head") from exc

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        rel_prefix = prefix.replace("\\", "/").lstrip("/")
        full = f"{self.prefix}/{rel_prefix}" if self.prefix else rel_prefix
        out: list[ObjectInfo] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                for obj in page.get("Contents", []):
                    out.append(
                        ObjectInfo(
                            key=self._rel(obj["Key"]),
                            size=int(obj["Size"]),
                            mtime=obj["LastModified"].timestamp(),
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(rel_prefix, exc, "list") from exc
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) not in _NOT_FOUND:
                raise self._error(key, exc, "delete") from exc
        except BotoCoreError as exc:
            raise self._error(key, exc, "delete") from exc

    def delete_prefix(self, prefix: str) -> int:
        # Batched DeleteObjects (1000 keys per request) instead of one request per object.
        objs = self.list(prefix.rstrip("/") + "/" if prefix.strip("/") else "")
        keys = [self._key(o.key) for o in objs]
        for i in range(0, len(keys), 1000):
            batch: dict[str, Any] = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete=batch)
            except (ClientError, BotoCoreError) as exc:
                raise self._error(prefix, exc, "delete prefix") from exc
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"delete under {self.uri(prefix)}: {len(resp['Errors'])} objects failed, "
                    f"first {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def uri(self, key: str = "") -> str:
        k = norm_key(key, allow_empty=True)
        path = "/".join(p for p in (self.prefix, k) if p)
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"
