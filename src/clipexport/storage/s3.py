"""A Storage in an S3-compatible bucket (Cloudflare R2, AWS S3, SeaweedFS, ...).

Uploads are our own multipart loop on the classic boto3 client, not
`upload_file`, because a resumable upload needs what s3transfer hides: the
upload id, one fixed part size, and the parts already stored. The upload id
and part size are kept in the job's TransferState under the object's URL,
with the etag of every part as it is confirmed; a rerun lists the parts the
server has, accepts those whose size and etag it can check (the etag it was
given, or the MD5 of the local bytes), and sends only the others. A part
already verified is never sent again: on R2 a failed re-send of a part
number loses the part that was there.

Downloads (`download.fetch`) are ranged GETs of part-size chunks, up to
`max_concurrency` at once, each pinned to the object's etag with `IfMatch`
(412 when it changed), resumable from `<path>.part`, verified against the
size and the `x-amz-meta-sha256` the upload stored.

R2's rules are checked here, since local servers do not enforce them: one
part size for the whole upload (only the last part smaller), 5 MiB to
5 GiB, at most 10,000 parts, `ContentMD5` on every part and object.

Every botocore/boto3 error is translated at this boundary into the
`StorageError` tree; messages name the endpoint, bucket and key, never a
credential.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
from botocore.exceptions import ClientError

from clipexport.errors import (
    PreconditionFailedError,
    StorageAuthError,
    StorageError,
    StorageNotFoundError,
    StorageUnreachableError,
    UsageError,
)
from clipexport.storage.base import (
    CountingReader,
    HighWater,
    MemoryTransferState,
    ObjectInfo,
    Progress,
    Reporter,
    Retry,
    TransferState,
    check_key,
    hash_file,
)
from clipexport.storage.download import fetch
from clipexport.storage.config import S3Settings

logger = logging.getLogger("clipexport.storage")

MiB = 1 << 20
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
DEFAULT_PART = 8 * MiB
DEFAULT_THRESHOLD = 8 * MiB
DEFAULT_CONCURRENCY = 10  # as s3transfer
DOWNLOAD_CHUNK = 1 * MiB
META_SHA256 = "sha256"  # sent as x-amz-meta-sha256

_AUTH_CODES = {
    "401",
    "403",
    "AccessDenied",
    "AuthorizationHeaderMalformed",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "Unauthorized",
}
_NOT_FOUND_CODES = {"404", "NoSuchBucket", "NoSuchKey", "NotFound"}
_PRECONDITION_CODES = {"412", "PreconditionFailed"}
#: Network failures that leave nothing to conclude: try again later.
_NETWORK_ERRORS = (
    bce.EndpointConnectionError,
    bce.ConnectionClosedError,
    bce.ConnectTimeoutError,
    bce.ReadTimeoutError,
    bce.ResponseStreamingError,
    bce.IncompleteReadError,
    bce.HTTPClientError,
)
_CREDENTIAL_ERRORS = (
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
    bce.ProfileNotFound,
)


class _Cancelled(BaseException):
    """Raised inside a part's body read to stop its request at once.

    A BaseException, so that botocore neither wraps nor retries it.
    """


class _Transient(Exception):
    """A failed ranged GET worth resuming (5xx, throttling); wraps the cause."""


def _md5(data: bytes | memoryview) -> tuple[str, str]:
    """(hex, base64) MD5 of `data`, for an etag check and ContentMD5."""
    digest = hashlib.md5(data)
    return digest.hexdigest(), base64.b64encode(digest.digest()).decode()


def _plain_etag(etag: str | None) -> str:
    return (etag or "").strip().strip('"').lower()


def _is_md5(etag: str) -> bool:
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)


def _changed(path: Path, before: os.stat_result) -> bool:
    """Whether `path` is no longer the file `before` described (size, mtime)."""
    try:
        now = path.stat()
    except OSError:
        return True
    return (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class S3Storage:
    """A Storage in `bucket` under `prefix`, through one boto3 client."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        settings: S3Settings | None = None,
        scheme: str = "s3",
        part_size: int = DEFAULT_PART,
        multipart_threshold: int = DEFAULT_THRESHOLD,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        part_retry: Retry = Retry(attempts=4, deadline_s=60.0, backoff_s=1.0),
        session: Any = None,
        client: Any = None,
    ) -> None:
        if not MIN_PART <= part_size <= MAX_PART:
            raise UsageError(f"part size must be 5 MiB to 5 GiB, not {part_size} bytes")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        check_key(self.prefix, prefix=True)
        self.settings = settings or S3Settings()
        self.url = f"{scheme}://{bucket}/{self.prefix}".rstrip("/")
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, 1)
        self.max_concurrency = max(1, max_concurrency)
        self.part_retry = part_retry
        self._secrets: list[str] = []
        self.client = client if client is not None else self._make_client(session)

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.settings.endpoint_label!r})"

    def _make_client(self, session: Any = None) -> Any:
        """One client for every call (boto3 clients are thread-safe).

        `session` (a boto3 Session) is for callers that hold credentials
        themselves, like the test server; by default the standard chain.
        """
        s = self.settings
        try:
            session = session or boto3.session.Session(profile_name=s.profile)
            client = session.client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region,
                config=s.botocore_config(),
                verify=s.verify,
            )
        except _CREDENTIAL_ERRORS as exc:
            raise self._auth_error(exc) from None
        except (bce.BotoCoreError, ValueError) as exc:
            raise StorageError(f"cannot set up the S3 client for {s.endpoint_label}: {type(exc).__name__}") from None
        creds = session.get_credentials()
        if creds is not None:
            try:
                frozen = creds.get_frozen_credentials()
                self._secrets = [x for x in (frozen.secret_key, frozen.token) if x]
            except Exception:  # noqa: BLE001 - only used to scrub messages
                self._secrets = []
        return client

    # -- names and errors ---------------------------------------------------

    def _full(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def _where(self, key: str | None = None) -> str:
        name = f"s3://{self.bucket}/{self.prefix}{key or ''}" if key is not None else f"bucket {self.bucket!r}"
        return f"{name} at {self.settings.endpoint_label}"

    def _state_key(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _auth_error(self, exc: Exception) -> StorageAuthError:
        if isinstance(exc, bce.ProfileNotFound):
            return StorageAuthError(f"AWS profile {exc.kwargs.get('profile')!r} not found (for {self.settings.endpoint_label})")
        return StorageAuthError(
            f"no usable S3 credentials for {self.settings.endpoint_label}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE ({type(exc).__name__})"
        )

    def _translate(self, exc: BaseException, op: str, key: str | None = None) -> StorageError:
        """The StorageError for a botocore error during `op` on `key`."""
        where = self._where(key)
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code in _AUTH_CODES or status in (401, 403):
                what = "access denied" if code == "AccessDenied" else "credentials rejected"
                return StorageAuthError(f"{op} {where}: {what} ({code or status}); check the access key, secret and endpoint")
            if code == "NoSuchBucket":
                return StorageNotFoundError(f"{op} {where}: bucket {self.bucket!r} does not exist")
            if code in _NOT_FOUND_CODES or status == 404:
                return StorageNotFoundError(f"{op} {where}: not found ({code or status})")
            if code in _PRECONDITION_CODES or status == 412:
                return PreconditionFailedError(f"{op} {where}: the object changed (412 {code})")
            message = self._scrub(str(exc.response.get("Error", {}).get("Message") or ""))[:200]
            return StorageError(f"{op} {where}: {code or status}{': ' + message if message else ''}")
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return self._auth_error(exc)
        if isinstance(exc, bce.SSLError):
            return StorageUnreachableError(f"{op} {where}: TLS failed ({self._scrub(str(exc))[:200]})")
        if isinstance(exc, _NETWORK_ERRORS):
            return StorageUnreachableError(
                f"{op} {where}: endpoint did not answer ({type(exc).__name__}) after "
                f"{self.settings.max_attempts} tries"
            )
        if isinstance(exc, bce.BotoCoreError):
            return StorageError(f"{op} {where}: {type(exc).__name__}: {self._scrub(str(exc))[:200]}")
        return StorageError(f"{op} {where}: {type(exc).__name__}: {self._scrub(str(exc))[:200]}")

    def _call(self, op: str, key: str | None, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Call a client method, translating its errors."""
        try:
            return fn(**kwargs)
        except (ClientError, bce.BotoCoreError) as exc:
            raise self._translate(exc, op, key) from exc

    @staticmethod
    def _transient(exc: BaseException) -> bool:
        """Worth another try after botocore's own: network, 5xx, throttling."""
        if isinstance(exc, ClientError):
            return _status(exc) >= 500 or _code(exc) in ("SlowDown", "RequestTimeout", "InternalError")
        return isinstance(exc, _NETWORK_ERRORS)

    # -- small objects and metadata -----------------------------------------

    def check(self) -> None:
        """Fail now, with a clear error, if the bucket cannot be reached or used."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) == 404:
                raise StorageNotFoundError(f"open {self._where()}: bucket {self.bucket!r} does not exist") from exc
            raise self._translate(exc, "open", None) from exc
        except bce.BotoCoreError as exc:
            raise self._translate(exc, "open", None) from exc

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._translate(exc, "stat", key) from exc
        except bce.BotoCoreError as exc:
            raise self._translate(exc, "stat", key) from exc
        return ObjectInfo(
            key=key,
            size=int(head["ContentLength"]),
            sha256=(head.get("Metadata") or {}).get(META_SHA256),
            etag=head.get("ETag"),
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        _, md5 = _md5(data)
        self._call(
            "put",
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._full(key),
            Body=data,
            ContentMD5=md5,
            Metadata={META_SHA256: hashlib.sha256(data).hexdigest()},
        )

    def get_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            return response["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._translate(exc, "get", key) from exc
        except bce.BotoCoreError as exc:
            raise self._translate(exc, "get", key) from exc

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under `prefix`; listings carry no metadata, so sha256 is None."""
        check_key(prefix, prefix=True)
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    found.append(
                        ObjectInfo(
                            key=item["Key"][len(self.prefix) :],
                            size=int(item["Size"]),
                            sha256=None,
                            etag=item.get("ETag"),
                        )
                    )
        except (ClientError, bce.BotoCoreError) as exc:
            raise self._translate(exc, "list", prefix) from exc
        return sorted(found, key=lambda i: i.key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` and abort its unfinished uploads."""
        if not prefix:
            raise UsageError("refusing to delete a whole store: give a non-empty prefix")
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            # DeleteObjects needs a request checksum some servers reject;
            # single deletes work everywhere and these sets are small.
            self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._full(key))
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for upload in page.get("Uploads", ()):
                    self._abort(upload["Key"], upload["UploadId"])
        except ClientError as exc:
            if _code(exc) not in ("NotImplemented", "501"):
                raise self._translate(exc, "list uploads", prefix) from exc
        except bce.BotoCoreError as exc:
            raise self._translate(exc, "list uploads", prefix) from exc
        return len(keys)

    # -- downloads ----------------------------------------------------------

    def get_file(
        self, key: str, path: Path, *, progress: Progress | None = None, sha256: str | None = None
    ) -> ObjectInfo:
        """Download `key` to `path` by ranged GETs pinned to its etag (`IfMatch`)."""
        full = self._full(key)

        def open_range(start: int, end: int, etag: str | None) -> Iterator[bytes]:
            extra = {"IfMatch": etag} if etag else {}
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}", **extra
                )
            except ClientError as exc:
                if self._transient(exc):
                    raise _Transient() from exc
                raise self._translate(exc, "download", key) from exc
            body = response["Body"]
            try:
                yield from body.iter_chunks(DOWNLOAD_CHUNK)
            finally:
                body.close()

        try:
            return fetch(
                Path(path),
                lambda: self.stat(key),
                open_range,
                sha256=sha256,
                progress=progress,
                transient=(*_NETWORK_ERRORS, _Transient),
                retry=self.part_retry,
                label=self._where(key),
                chunk_size=self.part_size,
                concurrency=self.max_concurrency,
            )
        except _Transient as exc:
            raise self._translate(exc.__cause__ or exc, "download", key) from exc
        except (ClientError, bce.BotoCoreError) as exc:
            raise self._translate(exc, "download", key) from exc
        except OSError as exc:
            raise StorageError(f"download {self._where(key)} to {path}: {exc.strerror or exc}") from exc

    # -- uploads ------------------------------------------------------------

    def put_file(
        self,
        key: str,
        path: Path,
        *,
        progress: Progress | None = None,
        state: TransferState | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Upload `path` as `key`, skipping it if stored, resuming it if begun."""
        path = Path(path)
        report = Reporter(progress)
        try:
            before = path.stat()
        except OSError as exc:
            raise StorageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        size = before.st_size
        sha = sha256 or hash_file(path)
        state = state if state is not None else MemoryTransferState()
        skey = self._state_key(key)
        found = self.stat(key)
        if found is not None and found.size == size and found.sha256 == sha:
            self._forget(state, skey)
            report.flush(size)
            return found
        if size < self.multipart_threshold:
            self._put_single(key, path, size, sha, report)
        else:
            _Multipart(self, key, path, size, sha, report, state, skey, before).run()
        if _changed(path, before):
            # Too late to stop it: do not leave other bytes under this content's name.
            self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._full(key))
            raise StorageError(f"{path}: changed while being uploaded to {self._where(key)}; run again")
        stored = self.stat(key)
        if stored is None or stored.size != size or stored.sha256 != sha:
            raise StorageError(f"upload {self._where(key)}: stored object does not match {path} (size or sha256)")
        report.flush(size)
        return stored

    def _put_single(self, key: str, path: Path, size: int, sha: str, report: Reporter) -> None:
        data = path.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise StorageError(f"{path}: its sha256 is not {sha} (changed since hashed?); run again")
        _, md5 = _md5(data)
        body = CountingReader(io.BytesIO(data), report)
        self._call(
            "upload",
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._full(key),
            Body=body,
            ContentLength=size,
            ContentMD5=md5,
            Metadata={META_SHA256: sha},
        )

    def _forget(self, state: TransferState, skey: str) -> None:
        """Abort and forget an upload the state still records."""
        record = state.load(skey)
        if record and record.get("upload_id"):
            self._abort(record["key"], record["upload_id"])
        if record is not None:
            state.clear(skey)

    def _abort(self, full_key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except ClientError as exc:
            if _code(exc) not in ("NoSuchUpload", "404"):
                raise self._translate(exc, "abort upload", full_key[len(self.prefix) :]) from exc
        except bce.BotoCoreError as exc:
            raise self._translate(exc, "abort upload", full_key[len(self.prefix) :]) from exc

    def abort_uploads(self, state: TransferState) -> None:
        """Cancel: abort every multipart upload `state` records for this store."""
        mine = self._state_key("")
        for skey in state.keys():
            if skey.startswith(mine):
                record = state.load(skey) or {}
                if record.get("bucket") == self.bucket and record.get("upload_id"):
                    self._abort(record["key"], record["upload_id"])
                state.clear(skey)


class _Multipart:
    """One resumable multipart upload: plan, resume, send, check, complete."""

    def __init__(
        self,
        store: S3Storage,
        key: str,
        path: Path,
        size: int,
        sha: str,
        report: Reporter,
        state: TransferState,
        skey: str,
        before: os.stat_result,
    ) -> None:
        self.s, self.key, self.path, self.size, self.sha = store, key, path, size, sha
        self.before = before
        self.full = store._full(key)
        self.report, self.state, self.skey = report, state, skey
        self.client = store.client
        self.cancel = threading.Event()

    # The record kept in the TransferState, one per object:
    # {"v": 1, "bucket", "key" (full), "upload_id", "part_size", "size",
    #  "sha256", "parts": {"<n>": "<etag>"}} -- parts confirmed so far.

    def run(self) -> None:
        record, stored = self._resume() or self._begin()
        part_size = record["part_size"]
        count = max(1, math.ceil(self.size / part_size))
        progress = HighWater(count)
        for number, etag in stored.items():
            progress.fill(number - 1, self._length(number, part_size))
        self.report.flush(progress.total)
        missing = [n for n in range(1, count + 1) if n not in stored]
        if missing:
            logger.info("%s: %d of %d parts to send", self.s._where(self.key), len(missing), count)
            self._send(record, missing, part_size, progress)
        if _changed(self.path, self.before):
            self.s._forget(self.state, self.skey)
            raise StorageError(f"{self.path}: changed while being uploaded to {self.s._where(self.key)}; run again")
        self._complete(record, count, part_size)
        self.state.clear(self.skey)

    def _length(self, number: int, part_size: int) -> int:
        return min(part_size, self.size - (number - 1) * part_size)

    def _part_size(self) -> int:
        size = self.s.part_size
        if math.ceil(self.size / size) > MAX_PARTS:
            size = math.ceil(self.size / MAX_PARTS / MiB) * MiB
        if size > MAX_PART:
            raise UsageError(f"{self.path}: too large for one S3 object ({self.size} bytes)")
        return size

    def _begin(self) -> tuple[dict, dict[int, str]]:
        part_size = self._part_size()
        created = self.s._call(
            "start upload",
            self.key,
            self.client.create_multipart_upload,
            Bucket=self.s.bucket,
            Key=self.full,
            Metadata={META_SHA256: self.sha},
        )
        record = {
            "v": 1,
            "bucket": self.s.bucket,
            "key": self.full,
            "upload_id": created["UploadId"],
            "part_size": part_size,
            "size": self.size,
            "sha256": self.sha,
            "parts": {},
        }
        self.state.save(self.skey, record)
        return record, {}

    def _resume(self) -> tuple[dict, dict[int, str]] | None:
        """The recorded upload and its verified parts, or None to start anew."""
        record = self.state.load(self.skey)
        if not record:
            return None
        same = (
            record.get("v") == 1
            and record.get("bucket") == self.s.bucket
            and record.get("key") == self.full
            and record.get("size") == self.size
            and record.get("sha256") == self.sha
            and MIN_PART <= int(record.get("part_size", 0)) <= MAX_PART
        )
        if not same:
            self.s._forget(self.state, self.skey)
            return None
        listed = self._list_parts(record["upload_id"])
        if listed is None:
            logger.info("%s: recorded upload is gone; starting over", self.s._where(self.key))
            self.state.clear(self.skey)
            return None
        part_size = record["part_size"]
        count = math.ceil(self.size / part_size)
        known = {int(n): _plain_etag(e) for n, e in record.get("parts", {}).items()}
        verified: dict[int, str] = {}
        with open(self.path, "rb") as f:
            for number, entries in sorted(listed.items()):
                length = self._length(number, part_size) if number <= count else -1
                fitting = [etag for etag, size in entries if size == length]
                local_md5 = None
                for etag in fitting:
                    plain = _plain_etag(etag)
                    if known.get(number) != plain and _is_md5(plain) and local_md5 is None:
                        f.seek((number - 1) * part_size)
                        local_md5 = _md5(f.read(length))[0]
                    if plain in (known.get(number), local_md5):
                        verified[number] = etag
                        break
        record["parts"] = {str(n): e for n, e in sorted(verified.items())}
        self.state.save(self.skey, record)
        logger.info(
            "%s: resuming upload, %d of %d parts already stored", self.s._where(self.key), len(verified), count
        )
        return record, verified

    def _list_parts(self, upload_id: str) -> dict[int, list[tuple[str, int]]] | None:
        """{part number: [(etag, size), ...]} the server holds, or None if no such upload.

        A list, because SeaweedFS lists every version of a re-sent part
        number (and completes with the one whose etag is named).
        """
        parts: dict[int, list[tuple[str, int]]] = {}
        try:
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.s.bucket, Key=self.full, UploadId=upload_id
            )
            for page in pages:
                for p in page.get("Parts", ()):
                    parts.setdefault(int(p["PartNumber"]), []).append((p["ETag"], int(p["Size"])))
        except ClientError as exc:
            if _code(exc) in ("NoSuchUpload", "404") or _status(exc) == 404:
                return None
            raise self.s._translate(exc, "list parts", self.key) from exc
        except bce.BotoCoreError as exc:
            raise self.s._translate(exc, "list parts", self.key) from exc
        return parts

    def _send(self, record: dict, missing: list[int], part_size: int, progress: HighWater) -> None:
        """Send the missing parts on a thread pool; record each as it lands.

        The caller's thread waits, saves the state and reports progress, so
        the TransferState and the progress callback are only ever touched
        here. Any failure stops the other parts at their next read.
        """
        fd = os.open(self.path, os.O_RDONLY)
        pool = ThreadPoolExecutor(max_workers=min(self.s.max_concurrency, len(missing)), thread_name_prefix="s3part")
        pending: dict[Future, int] = {}
        try:
            for number in missing:
                pending[pool.submit(self._send_part, fd, record["upload_id"], number, part_size, progress)] = number
            while pending:
                finished, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                for future in finished:
                    number = pending.pop(future)
                    record["parts"][str(number)] = future.result()
                    self.state.save(self.skey, record)
                self.report(progress.total)
        finally:
            self.cancel.set()
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            os.close(fd)
        self.report.flush(progress.total)

    def _send_part(self, fd: int, upload_id: str, number: int, part_size: int, progress: HighWater) -> str:
        """Read, checksum and send one part, trying again on transient errors."""
        if self.cancel.is_set():
            raise _Cancelled()
        offset = (number - 1) * part_size
        length = self._length(number, part_size)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise StorageError(f"{self.path}: shorter than when its upload began; run again")
        _, md5_b64 = _md5(data)
        on_position = progress.slot(number - 1)

        def watch(pos: int) -> None:
            if self.cancel.is_set():
                raise _Cancelled()
            on_position(pos)

        delays = self.s.part_retry.delays()
        while True:
            try:
                response = self.client.upload_part(
                    Bucket=self.s.bucket,
                    Key=self.full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=CountingReader(io.BytesIO(data), watch),
                    ContentLength=length,
                    ContentMD5=md5_b64,
                )
                break
            except (ClientError, bce.BotoCoreError) as exc:
                delay = next(delays, None) if self.s._transient(exc) else None
                if delay is None or self.cancel.is_set():
                    if isinstance(exc, ClientError) and _code(exc) == "NoSuchUpload":
                        raise StorageError(
                            f"upload {self.s._where(self.key)}: the multipart upload was aborted meanwhile; run again"
                        ) from exc
                    raise self.s._translate(exc, f"upload part {number} of", self.key) from exc
                logger.info("part %d of %s: %s; trying again", number, self.key, type(exc).__name__)
                time.sleep(delay)
        # The server checked the bytes against ContentMD5 (BadDigest otherwise);
        # its etag is not always their MD5 (SSE-KMS), so it is recorded, not judged.
        return response["ETag"]

    def _complete(self, record: dict, count: int, part_size: int) -> None:
        """Check the parts against R2's rules, then complete the upload."""
        upload_id = record["upload_id"]
        listed = self._list_parts(upload_id)
        if listed is None:
            raise StorageError(f"upload {self.s._where(self.key)}: the multipart upload was aborted meanwhile; run again")
        parts = []
        for number in range(1, count + 1):
            etag = record["parts"].get(str(number))
            sizes = [size for tag, size in listed.get(number, ()) if _plain_etag(tag) == _plain_etag(etag)]
            if etag is None or not sizes:
                raise StorageError(f"upload {self.s._where(self.key)}: part {number} is missing on the server")
            if sizes[0] != self._length(number, part_size):
                raise StorageError(
                    f"upload {self.s._where(self.key)}: part {number} has {sizes[0]} bytes, not "
                    f"{self._length(number, part_size)} (R2 needs one part size)"
                )
            parts.append({"PartNumber": number, "ETag": etag})
        delays = self.s.part_retry.delays()
        while True:
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.s.bucket, Key=self.full, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
                break
            except (ClientError, bce.BotoCoreError) as exc:
                if isinstance(exc, ClientError) and _code(exc) == "NoSuchUpload":
                    # An earlier try may have completed it before its answer was lost.
                    found = self.s.stat(self.key)
                    if found is not None and found.size == self.size and found.sha256 == self.sha:
                        return
                delay = next(delays, None) if self.s._transient(exc) else None
                if delay is None:
                    raise self.s._translate(exc, "complete upload", self.key) from exc
                time.sleep(delay)
