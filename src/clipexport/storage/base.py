"""What every store offers, and the pieces the stores share.

A store holds objects under `/`-separated keys, relative to its own root
(a directory, or a bucket and prefix). Both implementations, `local` and
`s3`, keep the same semantics:

- `put_file` skips an object that already exists with the same size and
  sha256, otherwise uploads it, resuming what a killed run left behind;
- `get_file` downloads into `<path>.part`, resumes from it, checks size and
  sha256, then renames into place: `path` only ever holds a whole object;
- progress callbacks get *cumulative* bytes, never decreasing, and are only
  ever called on the caller's thread.

Bytes are counted by wrapping streams (`CountingReader`), never by counters
sprinkled in loops; `HighWater` turns positions that can move back (a
retried request rewinds its body) into a total that cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from clipexport.errors import StorageError, UsageError

Progress = Callable[[int], None]

#: Bytes read per chunk when hashing or copying files.
CHUNK = 1 << 20
#: A progress callback is called at most this often while bytes move
#: (and always once at the end); s3transfer batches its callbacks likewise.
PROGRESS_INTERVAL_S = 0.1

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. `sha256` is None when the store does not know it."""

    key: str
    size: int
    sha256: str | None
    etag: str | None


@runtime_checkable
class TransferState(Protocol):
    """Durable notes of unfinished transfers, one JSON-ready dict per key.

    The job store implements it (SQLite); `MemoryTransferState` is the
    in-memory one for tests and for jobs that do not persist. `keys()` lets
    a cancel find every unfinished upload of a job.
    """

    def load(self, key: str) -> dict | None: ...

    def save(self, key: str, value: dict) -> None: ...

    def clear(self, key: str) -> None: ...

    def keys(self) -> list[str]: ...


class MemoryTransferState:
    """A dict-backed TransferState. Values are copied in and out."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    def load(self, key: str) -> dict | None:
        raw = self._data.get(key)
        return None if raw is None else json.loads(raw)

    def save(self, key: str, value: dict) -> None:
        self._data[key] = json.dumps(value)

    def clear(self, key: str) -> None:
        self._data.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._data)


class JsonFileTransferState(MemoryTransferState):
    """A TransferState kept in one JSON file, rewritten atomically on save.

    For a worker or script with no job store; fine for a handful of keys.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        if self.path.exists():
            self._data = {k: json.dumps(v) for k, v in json.loads(self.path.read_text()).items()}

    def save(self, key: str, value: dict) -> None:
        super().save(key, value)
        self._write()

    def clear(self, key: str) -> None:
        super().clear(key)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({k: json.loads(v) for k, v in self._data.items()}))
        os.replace(tmp, self.path)


@runtime_checkable
class Storage(Protocol):
    """An object store: a directory (`local`) or a bucket (`s3`, `r2`)."""

    url: str  # printable, never holds a secret

    def put_file(
        self,
        key: str,
        path: Path,
        *,
        progress: Progress | None = None,
        state: TransferState | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_file(
        self, key: str, path: Path, *, progress: Progress | None = None, sha256: str | None = None
    ) -> ObjectInfo: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """The object's bytes [start, end), all of them (StorageNotFoundError if it is missing)."""
        ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def abort_uploads(self, state: TransferState) -> None: ...

    def check(self) -> None: ...  # fail now, clearly, if the store cannot be used


def content_key(sha256: str, suffix: str = "", *, prefix: str = "inputs/") -> str:
    """The key of content-addressed data: `inputs/<sha256><suffix>`."""
    if not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{prefix}{sha256}{suffix}"


def check_key(key: str, *, prefix: bool = False) -> str:
    """Refuse keys that could escape a store's root or mean two things.

    A key is `/`-separated, relative, with no empty, `.` or `..` parts; a
    prefix may be empty or end with `/`.
    """
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    parts = body.split("/")
    if (
        not body
        or body.startswith("/")
        or "\\" in body
        or "\x00" in body
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise UsageError(f"invalid storage key {key!r}")
    return key


# -- counting bytes ----------------------------------------------------------


class CountingReader:
    """Wraps a binary stream and reports its position after each read.

    `on_position(pos)` gets the absolute position: after a `seek(0)` (a
    retried request rewinds its body) it goes back, which `HighWater` turns
    into a total that does not. Seekable and sized, so botocore can compute
    the Content-Length and rewind on retry.
    """

    def __init__(self, raw: IO[bytes], on_position: Callable[[int], None], *, start: int = 0) -> None:
        self._raw = raw
        self._on_position = on_position
        self._pos = start

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._pos += len(data)
            self._on_position(self._pos)
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0
        if n:
            self._pos += n
            self._on_position(self._pos)
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._raw.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def __len__(self) -> int:
        here = self._raw.tell()
        end = self._raw.seek(0, os.SEEK_END)
        self._raw.seek(here)
        return end

    def close(self) -> None:
        self._raw.close()


class HighWater:
    """A cumulative byte count built from slots that may move back.

    Each slot (a multipart part, the one stream of a simple transfer) keeps
    the highest position it ever reported; the total is their sum, so it
    never decreases, even when a request is retried from its start. Slots
    are written by one thread each and read by the caller's thread.
    """

    def __init__(self, slots: int = 1, *, base: int = 0) -> None:
        self._high = [0] * slots
        self.base = base

    def slot(self, index: int) -> Callable[[int], None]:
        high = self._high

        def on_position(pos: int) -> None:
            if pos > high[index]:
                high[index] = pos

        return on_position

    def fill(self, index: int, size: int) -> None:
        """Mark a slot done (a part found already stored)."""
        if size > self._high[index]:
            self._high[index] = size

    def __getitem__(self, index: int) -> int:
        return self._high[index]

    @property
    def total(self) -> int:
        return self.base + sum(self._high)


class Reporter:
    """Calls a progress callback with a total that never decreases.

    Throttled to `PROGRESS_INTERVAL_S`, except for `flush()`; keeps the
    highest value sent, so a caller that restarts a stream cannot make the
    bar go back. The clock is injected for tests.
    """

    def __init__(
        self,
        progress: Progress | None,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress = progress
        self._interval = PROGRESS_INTERVAL_S if interval is None else interval
        self._clock = clock
        self._sent = -1
        self._last = float("-inf")

    def __call__(self, total: int, *, force: bool = False) -> None:
        if self._progress is None or total <= self._sent:
            return
        now = self._clock()
        if force or now - self._last >= self._interval:
            self._sent, self._last = total, now
            self._progress(total)

    def flush(self, total: int) -> None:
        self(total, force=True)


def hash_file(path: Path, progress: Progress | None = None) -> str:
    """sha256 of a file, reporting cumulative bytes hashed as it goes."""
    report = Reporter(progress)
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as raw:
            reader = CountingReader(raw, report)
            while n := reader.readinto(view):
                digest.update(view[:n])
            report.flush(reader.tell())
    except OSError as exc:
        raise StorageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()


# -- retries -------------------------------------------------------------------


logger = logging.getLogger("clipexport.storage")


@dataclass(frozen=True)
class Retry:
    """A bounded retry policy: at most `attempts` tries within `deadline_s`."""

    attempts: int = 5
    deadline_s: float = 120.0
    backoff_s: float = 0.5
    max_backoff_s: float = 4.0

    def delays(self) -> Iterator[float]:
        """Sleeps between tries; stops when tries or time run out."""
        started = time.monotonic()
        for failure in range(1, self.attempts):
            delay = min(self.backoff_s * 2 ** (failure - 1), self.max_backoff_s)
            if time.monotonic() + delay - started > self.deadline_s:
                return
            yield delay


__all__ = [
    "CHUNK",
    "CountingReader",
    "Retry",
    "HighWater",
    "JsonFileTransferState",
    "MemoryTransferState",
    "ObjectInfo",
    "Progress",
    "Reporter",
    "Storage",
    "TransferState",
    "check_key",
    "content_key",
    "hash_file",
]
