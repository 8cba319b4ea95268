"""The S3 backend of greenrun.storage: boto3 against AWS, MinIO, R2 or any S3-compatible endpoint.

Every write is all-or-nothing: one PUT, or a multipart upload with fixed-size parts that is aborted on any
failure (including a 412 on completion). Credentials come only from boto3's default chain; SDK loggers stay
above DEBUG because debug logs can carry signed headers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import RetriesExceededError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
)

from greenrun.core.fs import TMP_PREFIX
from greenrun.storage.base import (
    ACCESS_CODES,
    BACKENDS,
    CONNECT_TIMEOUT_S,
    MAX_PARTS,
    MIB,
    READ_TIMEOUT_S,
    SDK_LOGGERS,
    CommitConflict,
    Data,
    ObjectNotFound,
    StorageAccessError,
    StorageConfig,
    StorageError,
    StorageUnreachable,
    check_key,
    check_prefix,
)
from greenrun.storage.parts import Parts, check_cancel, code_of, multipart_etag, status_of, was_retried

log = logging.getLogger(__name__)

# Every class S3 accepts for an object (AWS's names; S3-compatible stores accept a subset).
STORAGE_CLASSES = (
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
)
COPY_OBJECT_LIMIT = 5 * 1024**3  # CopyObject's largest source; beyond it only a multipart copy works
_BIG_COPY = TransferConfig(multipart_chunksize=512 * 1024**2)  # 10,000 parts of 8 MiB would cap at 80 GiB
_CANCEL_GRACE_S = 0.25  # after a cancel: a moment for in-flight parts to end before the second abort
# Codes that mean "this endpoint/region does not serve this bucket": storage.region or storage.endpoint_url.
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}


def quiet_sdk_loggers() -> None:
    """Cap AWS SDK loggers at WARNING: their DEBUG output includes signed request headers."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:  # NOTSET (0) would inherit a DEBUG root
            logger.setLevel(logging.WARNING)


@BACKENDS.register("s3")
class S3Storage:
    """Objects in an S3-compatible bucket under cfg.prefix.

    Multipart uploads are driven here, not by boto3's transfer manager: that one cannot send IfNoneMatch
    and swallows a failed abort at DEBUG level, leaving the upload and its billed parts behind silently.
    """

    list_page_size = 1000  # keys per ListObjectsV2 page (S3's maximum); tests lower it to exercise paging

    def __init__(self, cfg: StorageConfig) -> None:
        if cfg.part_size_mb < 5:
            raise ValueError(f"storage.part_size_mb={cfg.part_size_mb} is below S3's 5 MiB minimum part")
        quiet_sdk_loggers()
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix.strip("/")
        self.endpoint = cfg.endpoint_url or "AWS S3"
        self.part_size = cfg.part_size_mb * MIB
        self.max_concurrency = cfg.max_concurrency
        config = Config(
            retries={"mode": cfg.retry_mode, "total_max_attempts": cfg.max_attempts},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            max_pool_connections=max(10, 2 * cfg.max_concurrency),
        )
        session = boto3.session.Session()  # private: the default session is process-wide, not thread-safe
        self.client = session.client(
            "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=config
        )
        # check_access() must answer in seconds: two tries, not storage.max_attempts with backoff.
        quick = config.merge(Config(retries={"mode": cfg.retry_mode, "total_max_attempts": 2}))
        self._quick_client = lambda: session.client(
            "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=quick
        )
        self._download_config = TransferConfig(
            multipart_threshold=self.part_size,
            multipart_chunksize=self.part_size,
            max_concurrency=cfg.max_concurrency,
            preferred_transfer_client="classic",  # CRT (auto-picked on some instances) has its own retries
        )

    @classmethod
    def from_config(cls, cfg: StorageConfig, local_root: Path) -> S3Storage:
        return cls(cfg)

    @staticmethod
    def config_problems(cfg: StorageConfig) -> list[str]:
        if cfg.bucket in ("", "???"):
            return ["storage.bucket is required for storage=s3 (e.g. storage.bucket=my-bucket)"]
        return []

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def _full_prefix(self, prefix: str) -> str:
        return f"{self.prefix}/{check_prefix(prefix)}" if self.prefix else check_prefix(prefix)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def check_access(self) -> None:
        """One ListObjectsV2 of at most one key under the prefix: the bucket exists, the credentials sign and
        may list there (every run lists its checkpoints), and the endpoint answers."""
        full_prefix = f"{self.prefix}/" if self.prefix else ""
        with self._failing("list", full_prefix):
            self._quick_client().list_objects_v2(Bucket=self.bucket, Prefix=full_prefix, MaxKeys=1)

    def put(
        self, key: str, src: Path, *, if_none_match: bool = False, cancel: threading.Event | None = None
    ) -> None:
        full, size = self._full(key), os.path.getsize(src)
        check_cancel(cancel, full)
        if size <= self.part_size:
            self._put_object(full, Path(src).read_bytes(), if_none_match)
            return

        def read_part(number: int) -> bytes:
            with open(src, "rb") as f:
                f.seek((number - 1) * self.part_size)
                return f.read(self.part_size)

        self._put_multipart(full, read_part, size, if_none_match, cancel, str(src))

    def put_bytes(
        self, key: str, data: Data, *, if_none_match: bool = False, cancel: threading.Event | None = None
    ) -> None:
        full, view = self._full(key), memoryview(data).cast("B")
        check_cancel(cancel, full)
        if len(view) <= self.part_size:
            self._put_object(full, bytes(view), if_none_match)
            return

        def read_part(number: int) -> bytes:
            return bytes(view[(number - 1) * self.part_size : number * self.part_size])

        self._put_multipart(full, read_part, len(view), if_none_match, cancel, f"{len(view)} bytes")

    def _put_object(self, full: str, data: bytes, if_none_match: bool) -> None:
        condition = {"IfNoneMatch": "*"} if if_none_match else {}
        for attempt in range(1, 4):
            with self._failing("write", full):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **condition)
                    return
                except ClientError as e:
                    if if_none_match and status_of(e) == 412:
                        if was_retried(e) and self._etag_or_none(full) == hashlib.md5(data).hexdigest():
                            return  # our first attempt landed but its answer was lost; the retry saw it
                        raise CommitConflict(f"s3://{self.bucket}/{full} already exists") from None
                    if code_of(e) != "ConditionalRequestConflict" or attempt == 3:
                        raise
                    time.sleep(0.5 * attempt)  # a concurrent conditional write to this key is in flight

    def _put_multipart(
        self,
        full: str,
        read_part: Callable[[int], bytes],
        size: int,
        if_none_match: bool,
        cancel: threading.Event | None,
        what: str,
    ) -> None:
        count = -(-size // self.part_size)
        if count > MAX_PARTS:
            raise StorageError(
                f"{what} needs {count} parts, S3 allows {MAX_PARTS}: raise storage.part_size_mb"
            )
        with self._failing("start an upload to", full):
            created = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32"
            )
        upload_id, completed = created["UploadId"], False
        try:
            with self._failing("upload", full):
                parts = self._upload_parts(full, upload_id, read_part, count, cancel)
                check_cancel(cancel, full)
                self._complete(full, upload_id, parts, if_none_match)
            completed = True
        finally:
            if not completed:  # any failure, also KeyboardInterrupt/SystemExit from a signal handler
                self._abort(full, upload_id)

    def _upload_parts(
        self,
        full: str,
        upload_id: str,
        read_part: Callable[[int], bytes],
        count: int,
        cancel: threading.Event | None,
    ) -> list[dict]:
        def send(number: int) -> dict:
            body = read_part(number)
            args = {"Bucket": self.bucket, "Key": full, "UploadId": upload_id, "PartNumber": number}
            response = self.client.upload_part(**args, Body=body, ChecksumAlgorithm="CRC32")
            # Some S3-compatible stores do not echo the checksum; completion then goes without it.
            checksum = {"ChecksumCRC32": response["ChecksumCRC32"]} if "ChecksumCRC32" in response else {}
            return {"PartNumber": number, "ETag": response["ETag"], **checksum}

        parts = Parts(send, count, self.max_concurrency, cancel)
        urgent = True  # until the wait returns normally: a signal's exception is as urgent as a cancel
        try:
            parts.wait()
            urgent = cancel is not None and cancel.is_set()
        finally:
            parts.stop()
            if urgent:
                # Abort at once (the process may be about to end), give in-flight parts a moment, and let
                # the caller abort once more: a part that lands after an abort can leave the upload billed.
                self._abort(full, upload_id)
                parts.drain(_CANCEL_GRACE_S)
            else:
                parts.drain(None)  # a part still in flight during the abort could outlive it: drain first
        check_cancel(cancel, full)
        if parts.error is not None:
            raise parts.error
        return [parts.results[number] for number in range(1, count + 1)]

    def _complete(self, full: str, upload_id: str, parts: list[dict], if_none_match: bool) -> None:
        condition = {"IfNoneMatch": "*"} if if_none_match else {}
        args = {"Bucket": self.bucket, "Key": full, "UploadId": upload_id}
        try:
            self.client.complete_multipart_upload(**args, MultipartUpload={"Parts": parts}, **condition)
        except ClientError as e:
            if was_retried(e) and self._etag_or_none(full) == multipart_etag(parts):
                return  # the first completion landed, its answer was lost, and the retry was refused
            if if_none_match and status_of(e) == 412:
                raise CommitConflict(f"s3://{self.bucket}/{full} already exists") from None
            raise

    def _abort(self, full: str, upload_id: str) -> bool:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (ClientError, BotoCoreError) as e:
            if code_of(e) != "NoSuchUpload":
                what = f"multipart upload {upload_id} of s3://{self.bucket}/{full}"
                log.warning(
                    "could not abort %s (%s); its parts stay billed until abort_stale_uploads() "
                    "or a bucket lifecycle rule removes them",
                    what,
                    code_of(e) or type(e).__name__,
                )
                return False
        return True

    def abort_stale_uploads(self, prefix: str) -> int:
        """Abort every in-progress multipart upload under prefix; only safe when no writer is active there."""
        full_prefix, aborted = self._full_prefix(prefix), 0
        with self._failing("list uploads under", full_prefix):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                aborted += sum(self._abort(u["Key"], u["UploadId"]) for u in page.get("Uploads", []))
        return aborted

    def get(self, key: str, dst: Path) -> None:
        full, dst = self._full(key), Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=TMP_PREFIX)
        os.close(fd)
        try:
            with self._failing("read", full):
                self.client.download_file(self.bucket, full, tmp, Config=self._download_config)
            os.replace(tmp, dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes:
        with self._failing("read", self._full(key)):
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()

    def list(self, prefix: str) -> list[str]:
        full_prefix, keys = self._full_prefix(prefix), []
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._failing("list", full_prefix):
            paging = {"PageSize": self.list_page_size}
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix, PaginationConfig=paging
            )
            for page in pages:
                keys += [item["Key"][strip:] for item in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._failing("delete", self._full(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))  # 204 for a missing key too

    def exists(self, key: str) -> bool:
        with self._failing("check", self._full(key)):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as e:
                if status_of(e) == 404:
                    return False
                raise
        return True

    def storage_classes(self) -> tuple[str, ...]:
        return STORAGE_CLASSES

    def set_storage_class(self, key: str, storage_class: str) -> bool:
        """Rewrite the object in place under storage_class; False when it already has that class."""
        if storage_class not in STORAGE_CLASSES:
            raise ValueError(f"storage class {storage_class!r} is not one of {', '.join(STORAGE_CLASSES)}")
        full = self._full(key)
        with self._failing("change the storage class of", full):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
            if head.get("StorageClass", "STANDARD") == storage_class:  # S3 omits the field for STANDARD
                return False
            _copy_in_place(self.client, self.bucket, full, head["ContentLength"], storage_class)
        return True

    def _etag_or_none(self, full: str) -> str | None:
        with contextlib.suppress(ClientError, BotoCoreError):
            return self.client.head_object(Bucket=self.bucket, Key=full)["ETag"].strip('"')
        return None

    @contextlib.contextmanager
    def _failing(self, action: str, full: str) -> Iterator[None]:
        """Turn SDK exceptions raised inside into a StorageError saying what failed where."""
        try:
            yield
        except (ClientError, BotoCoreError, RetriesExceededError) as e:
            raise self._error(e, action, full) from e

    def _error(self, e: Exception, action: str, full: str) -> StorageError:
        """A StorageError that says what failed where; botocore's text carries no credentials."""
        where = f"s3://{self.bucket}/{full} (endpoint: {self.endpoint})"
        code = code_of(e)
        if isinstance(e, EndpointConnectionError | ConnectTimeoutError):
            return StorageUnreachable(
                f"could not connect to {self.endpoint} to {action} s3://{self.bucket}/{full}: {e} "
                "(check the network and storage.endpoint_url)"
            )
        if isinstance(e, NoCredentialsError) or code in ACCESS_CODES:
            return StorageAccessError(
                f"could not {action} {where}: {code or e}. Credentials come only from boto3's default chain "
                f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY env vars, AWS_PROFILE and ~/.aws, SSO, or the "
                f"instance/container role); make sure they grant access to bucket {self.bucket!r} "
                "(storage.bucket)"
            )
        if code == "NoSuchBucket":
            return StorageAccessError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint} (set storage.bucket)"
            )
        if code in _REGION_CODES:
            return StorageAccessError(
                f"could not {action} {where}: {code}; bucket {self.bucket!r} lives in another region or "
                "behind another endpoint (set storage.region or storage.endpoint_url)"
            )
        if code in ("NoSuchKey", "404"):
            return ObjectNotFound(f"no object at {where}")
        return StorageError(f"could not {action} {where}: {e}")


def _copy_in_place(client: Any, bucket: str, full: str, size: int, storage_class: str) -> None:
    source = {"Bucket": bucket, "Key": full}
    args = {"StorageClass": storage_class, "MetadataDirective": "COPY"}
    if size <= COPY_OBJECT_LIMIT:
        client.copy_object(CopySource=source, Bucket=bucket, Key=full, **args)
    else:  # the managed copy goes multipart; s3transfer aborts the upload itself if a part fails
        client.copy(source, bucket, full, ExtraArgs=args, Config=_BIG_COPY)
