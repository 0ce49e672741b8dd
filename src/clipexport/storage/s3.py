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

Every botocore/boto3 error is translated at this boundary
(`s3errors.S3Errors`) into the `StorageError` tree; messages name the
endpoint, bucket and key, never a credential. Retries and the pool of parts
are the engine both stores share (`transfer`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
from botocore.exceptions import ClientError

from clipexport.errors import StorageError, StorageNotFoundError, UsageError
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
from clipexport.storage.config import S3Settings
from clipexport.storage.download import fetch
from clipexport.storage.s3errors import BOTO_ERRORS, CREDENTIAL_ERRORS, NETWORK_ERRORS, S3Errors, code, codes, transient
from clipexport.storage.transfer import Workers, retried

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

# The ClientErrors that mean "not there" to the request that meets them.
_NO_BUCKET = codes(statuses=(404,))  # HeadBucket: a HEAD has no body, only its status
_NO_OBJECT = codes("404", "NoSuchKey", "NotFound", statuses=(404,))
_NO_KEY = codes("NoSuchKey", "404", "NotFound")  # a GET: NoSuchBucket (404 too) is an error
_NO_UPLOAD = codes("NoSuchUpload", "404")
_UPLOAD_GONE = codes("NoSuchUpload", "404", statuses=(404,))


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
        self.errors = S3Errors(bucket, self.prefix, self.settings.endpoint_label, self.settings.max_attempts)
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
        except CREDENTIAL_ERRORS as exc:
            raise self.errors.auth_error(exc) from None
        except (bce.BotoCoreError, ValueError) as exc:
            raise StorageError(f"cannot set up the S3 client for {s.endpoint_label}: {type(exc).__name__}") from None
        creds = session.get_credentials()
        if creds is not None:
            try:
                frozen = creds.get_frozen_credentials()
                self.errors.secrets = [x for x in (frozen.secret_key, frozen.token) if x]
            except Exception:  # noqa: BLE001 - only used to scrub messages
                self.errors.secrets = []
        return client

    # -- names and errors ---------------------------------------------------

    def _full(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def _state_key(self, key: str) -> str:
        return f"{self.url}/{key}"

    # -- small objects and metadata -----------------------------------------

    def check(self) -> None:
        """Fail now, with a clear error, if the bucket cannot be reached or used."""
        if self.errors.call("open", None, self.client.head_bucket, Bucket=self.bucket, expected=_NO_BUCKET) is None:
            raise StorageNotFoundError(f"open {self.errors.where()}: bucket {self.bucket!r} does not exist")

    def stat(self, key: str) -> ObjectInfo | None:
        head = self.errors.call("stat", key, self.client.head_object, Bucket=self.bucket, Key=self._full(key),
                                expected=_NO_OBJECT)
        if head is None:
            return None
        return ObjectInfo(
            key=key,
            size=int(head["ContentLength"]),
            sha256=(head.get("Metadata") or {}).get(META_SHA256),
            etag=head.get("ETag"),
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put_object("put", key, data, data, hashlib.sha256(data).hexdigest())

    def _put_object(self, op: str, key: str, data: bytes, body: Any, sha: str) -> None:
        """One PutObject of `data`, sent as `body` (a counting reader, for progress), checked by MD5."""
        self.errors.call(
            op,
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._full(key),
            Body=body,
            ContentLength=len(data),
            ContentMD5=_md5(data)[1],
            Metadata={META_SHA256: sha},
        )

    def get_bytes(self, key: str) -> bytes | None:
        def read() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()

        return self.errors.call("get", key, read, expected=_NO_KEY)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """One ranged GET, tried again on transient errors like a part."""

        def read() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key), Range=f"bytes={start}-{end - 1}")
            return response["Body"].read()

        data = self.errors.call("read", key, retried, read, policy=self.part_retry, transient=transient,
                                label=f"read {key}")
        if len(data) != end - start:
            raise StorageError(f"read {self.errors.where(key)}: got {len(data)} of bytes {start}-{end}")
        return data

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under `prefix`; listings carry no metadata, so sha256 is None."""
        check_key(prefix, prefix=True)
        found = [
            ObjectInfo(key=item["Key"][len(self.prefix) :], size=int(item["Size"]), sha256=None, etag=item.get("ETag"))
            for item in self.errors.call("list", prefix, self._pages, "list_objects_v2", "Contents",
                                         Prefix=self.prefix + prefix)
        ]
        return sorted(found, key=lambda i: i.key)

    def _pages(self, operation: str, field: str, **params: Any) -> list[dict]:
        """Every item (`field` of each page) of a paginated listing of the bucket (call it through `errors.call`)."""
        pages = self.client.get_paginator(operation).paginate(Bucket=self.bucket, **params)
        return [item for page in pages for item in page.get(field, ())]

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` and abort its unfinished uploads."""
        if not prefix:
            raise UsageError("refusing to delete a whole store: give a non-empty prefix")
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            # DeleteObjects needs a request checksum some servers reject;
            # single deletes work everywhere and these sets are small.
            self.errors.call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._full(key))
        uploads = self.errors.call("list uploads", prefix, self._pages, "list_multipart_uploads", "Uploads",
                                   Prefix=self.prefix + prefix, expected=codes("NotImplemented", "501"))
        for upload in uploads or ():
            self._abort(upload["Key"], upload["UploadId"])
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
                if transient(exc):
                    raise _Transient() from exc
                raise self.errors.translate(exc, "download", key) from exc
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
                transient=(*NETWORK_ERRORS, _Transient),
                retry=self.part_retry,
                label=self.errors.where(key),
                chunk_size=self.part_size,
                concurrency=self.max_concurrency,
            )
        except _Transient as exc:
            raise self.errors.translate(exc.__cause__ or exc, "download", key) from exc
        except BOTO_ERRORS as exc:
            raise self.errors.translate(exc, "download", key) from exc
        except OSError as exc:
            raise StorageError(f"download {self.errors.where(key)} to {path}: {exc.strerror or exc}") from exc

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
            self.errors.call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._full(key))
            raise StorageError(f"{path}: changed while being uploaded to {self.errors.where(key)}; run again")
        stored = self.stat(key)
        if stored is None or stored.size != size or stored.sha256 != sha:
            raise StorageError(f"upload {self.errors.where(key)}: stored object does not match {path} (size or sha256)")
        report.flush(size)
        return stored

    def _put_single(self, key: str, path: Path, size: int, sha: str, report: Reporter) -> None:
        data = path.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise StorageError(f"{path}: its sha256 is not {sha} (changed since hashed?); run again")
        self._put_object("upload", key, data, CountingReader(io.BytesIO(data), report), sha)

    def _forget(self, state: TransferState, skey: str) -> None:
        """Abort and forget an upload the state still records."""
        record = state.load(skey)
        if record and record.get("upload_id"):
            self._abort(record["key"], record["upload_id"])
        if record is not None:
            state.clear(skey)

    def _abort(self, full_key: str, upload_id: str) -> None:
        self.errors.call("abort upload", full_key[len(self.prefix) :], self.client.abort_multipart_upload,
                         Bucket=self.bucket, Key=full_key, UploadId=upload_id, expected=_NO_UPLOAD)

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
        self.workers: Workers[int, str] = Workers(store.max_concurrency, name="s3part", poll_s=0.1)

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
            logger.info("%s: %d of %d parts to send", self.s.errors.where(self.key), len(missing), count)
            self._send(record, missing, part_size, progress)
        if _changed(self.path, self.before):
            self.s._forget(self.state, self.skey)
            raise StorageError(f"{self.path}: changed while being uploaded to {self.s.errors.where(self.key)}; run again")
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
        created = self.s.errors.call(
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
            logger.info("%s: recorded upload is gone; starting over", self.s.errors.where(self.key))
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
            "%s: resuming upload, %d of %d parts already stored", self.s.errors.where(self.key), len(verified), count
        )
        return record, verified

    def _list_parts(self, upload_id: str) -> dict[int, list[tuple[str, int]]] | None:
        """{part number: [(etag, size), ...]} the server holds, or None if no such upload.

        A list, because SeaweedFS lists every version of a re-sent part
        number (and completes with the one whose etag is named).
        """
        listed = self.s.errors.call("list parts", self.key, self.s._pages, "list_parts", "Parts", Key=self.full,
                                    UploadId=upload_id, expected=_UPLOAD_GONE)
        if listed is None:
            return None
        parts: dict[int, list[tuple[str, int]]] = {}
        for p in listed:
            parts.setdefault(int(p["PartNumber"]), []).append((p["ETag"], int(p["Size"])))
        return parts

    def _send(self, record: dict, missing: list[int], part_size: int, progress: HighWater) -> None:
        """Send the missing parts on a thread pool; record each as it lands.

        The caller's thread waits, saves the state and reports progress, so
        the TransferState and the progress callback are only ever touched
        here. Any failure stops the other parts at their next read.
        """
        fd = os.open(self.path, os.O_RDONLY)

        def landed(number: int, etag: str) -> None:
            record["parts"][str(number)] = etag
            self.state.save(self.skey, record)

        try:
            self.workers.run(missing, lambda number: self._send_part(fd, record["upload_id"], number, part_size,
                                                                      progress),
                             landed, lambda: self.report(progress.total))
        finally:
            os.close(fd)
        self.report.flush(progress.total)

    def _send_part(self, fd: int, upload_id: str, number: int, part_size: int, progress: HighWater) -> str:
        """Read, checksum and send one part, trying again on transient errors."""
        self.workers.check()
        offset = (number - 1) * part_size
        length = self._length(number, part_size)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise StorageError(f"{self.path}: shorter than when its upload began; run again")
        _, md5_b64 = _md5(data)
        on_position = progress.slot(number - 1)

        def watch(pos: int) -> None:
            self.workers.check()
            on_position(pos)

        def send() -> dict:
            return self.client.upload_part(
                Bucket=self.s.bucket,
                Key=self.full,
                UploadId=upload_id,
                PartNumber=number,
                Body=CountingReader(io.BytesIO(data), watch),
                ContentLength=length,
                ContentMD5=md5_b64,
            )

        try:
            response = retried(send, policy=self.s.part_retry, transient=transient, cancel=self.workers.cancel,
                               label=f"part {number} of {self.key}")
        except BOTO_ERRORS as exc:
            if isinstance(exc, ClientError) and code(exc) == "NoSuchUpload":
                raise StorageError(
                    f"upload {self.s.errors.where(self.key)}: the multipart upload was aborted meanwhile; run again"
                ) from exc
            raise self.s.errors.translate(exc, f"upload part {number} of", self.key) from exc
        # The server checked the bytes against ContentMD5 (BadDigest otherwise);
        # its etag is not always their MD5 (SSE-KMS), so it is recorded, not judged.
        return response["ETag"]

    def _complete(self, record: dict, count: int, part_size: int) -> None:
        """Check the parts against R2's rules, then complete the upload."""
        upload_id = record["upload_id"]
        listed = self._list_parts(upload_id)
        if listed is None:
            raise StorageError(f"upload {self.s.errors.where(self.key)}: the multipart upload was aborted meanwhile; run again")
        parts = []
        for number in range(1, count + 1):
            etag = record["parts"].get(str(number))
            sizes = [size for tag, size in listed.get(number, ()) if _plain_etag(tag) == _plain_etag(etag)]
            if etag is None or not sizes:
                raise StorageError(f"upload {self.s.errors.where(self.key)}: part {number} is missing on the server")
            if sizes[0] != self._length(number, part_size):
                raise StorageError(
                    f"upload {self.s.errors.where(self.key)}: part {number} has {sizes[0]} bytes, not "
                    f"{self._length(number, part_size)} (R2 needs one part size)"
                )
            parts.append({"PartNumber": number, "ETag": etag})
        try:
            retried(lambda: self.client.complete_multipart_upload(
                Bucket=self.s.bucket, Key=self.full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ), policy=self.s.part_retry, transient=transient, label=f"complete {self.key}")
        except BOTO_ERRORS as exc:
            if isinstance(exc, ClientError) and code(exc) == "NoSuchUpload":
                # An earlier try may have completed it before its answer was lost.
                found = self.s.stat(self.key)
                if found is not None and found.size == self.size and found.sha256 == self.sha:
                    return
            raise self.s.errors.translate(exc, "complete upload", self.key) from exc
