"""Object storage: one interface, a directory or an S3-compatible bucket.

    open_storage(None)                      -> LocalStorage(<user data dir>/store)
    open_storage("file:///some/dir")        -> LocalStorage(/some/dir)
    open_storage("s3://bucket/prefix")      -> S3Storage (AWS, or --endpoint-url)
    open_storage("r2://bucket/prefix")      -> S3Storage (R2_ACCOUNT_ID or --endpoint-url)

See `base.py` for the semantics both implementations keep, `s3.py` for the
resumable multipart upload, `channel.py` for the progress channel.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from clipexport.errors import UsageError
from clipexport.storage.base import (
    CountingReader,
    HighWater,
    JsonFileTransferState,
    MemoryTransferState,
    ObjectInfo,
    Progress,
    Reporter,
    Storage,
    TransferState,
    content_key,
    hash_file,
)
from clipexport.storage.channel import ProgressChannel
from clipexport.storage.local import LocalStorage

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def default_root() -> Path:
    """The embedded store: `store/` in the user data dir (CLIPEXPORT_HOME moves it)."""
    from clipexport.config import data_dir

    return data_dir() / "store"


def open_storage(
    url: str | None,
    *,
    endpoint_url: str | None = None,
    root: Path | None = None,
    **options: Any,
) -> Storage:
    """The store a `--storage` value names; UsageError for a bad one.

    `options` go to `S3Storage` (part_size, max_concurrency, ...) or, when
    named like an `S3Settings` field (verify, connect_timeout, max_attempts,
    profile, ...), to its settings.
    """
    if url is None or url == "":
        return LocalStorage(root or default_root())
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UsageError(f"--storage: not a URL: {url!r}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise UsageError(f"--storage: file URLs are file:///absolute/dir, not {url!r}")
        return LocalStorage(Path(unquote(parts.path)))
    if scheme in ("s3", "r2"):
        return _open_s3(scheme, parts, url, endpoint_url, options)
    raise UsageError(f"--storage: expected r2://bucket/prefix, s3://bucket/prefix or file:///dir, not {url!r}")


def _open_s3(scheme: str, parts: Any, url: str, endpoint_url: str | None, options: dict[str, Any]) -> Storage:
    bucket = parts.netloc
    if "@" in bucket or ":" in bucket:
        raise UsageError(f"--storage: {scheme}:// URLs carry no credentials or port; use --endpoint-url")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(f"--storage: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    if parts.query or parts.fragment:
        raise UsageError(f"--storage: no query or fragment allowed in {scheme}://{bucket}{parts.path}")
    prefix = unquote(parts.path).strip("/")
    try:
        from clipexport.storage.config import S3Settings, resolve
        from clipexport.storage.s3 import S3Storage
    except ImportError as exc:  # boto3 is the `s3` extra
        raise UsageError(f"--storage {scheme}:// needs boto3: pip install 'clipexport[s3]' ({exc.name})") from None
    fields = set(S3Settings.__dataclass_fields__) - {"endpoint_url", "region"}
    settings = resolve(scheme, endpoint_url=endpoint_url, **{k: options.pop(k) for k in list(options) if k in fields})
    if prefix:
        from clipexport.storage.base import check_key

        check_key(prefix + "/", prefix=True)
    return S3Storage(bucket, prefix, settings=settings, scheme=scheme, **options)


__all__ = [
    "CountingReader",
    "HighWater",
    "JsonFileTransferState",
    "LocalStorage",
    "MemoryTransferState",
    "ObjectInfo",
    "Progress",
    "ProgressChannel",
    "Reporter",
    "Storage",
    "TransferState",
    "content_key",
    "default_root",
    "hash_file",
    "open_storage",
]
