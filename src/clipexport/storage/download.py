"""Resumable, verified downloads, shared by both stores.

An object is fetched in fixed chunks (ranged reads, several at once for a
remote store) into `<path>.part`, each written at its own offset. The note
`<path>.part.json` names the object (key, etag, size, chunk size), the
chunks already complete and how far the others got; a rerun keeps those
bytes and fetches the rest, asking the store for the same etag (S3:
`IfMatch`), so a partial is never completed with bytes of another version.
The sha256 is computed in order as the bytes arrive, while later chunks
still stream (bytes a previous run left are read back); size and hash are
checked, the file is fsynced and only then renamed onto `path`. Each
chunk's writeback starts as soon as it is hashed, so that the fsync is short.

Progress is the bytes in complete or partly received chunks, a high-water
mark per chunk, reported on the caller's thread: it never decreases, even
when a chunk is retried or the object changed and the download starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from clipexport.errors import PreconditionFailedError, StorageError, StorageNotFoundError
from clipexport.storage.base import HighWater, ObjectInfo, Progress, Reporter, Retry
from clipexport.storage.transfer import Workers, retried

logger = logging.getLogger("clipexport.storage")

#: `open_range(start, end, etag)` yields the object's bytes in [start, end),
#: or raises `PreconditionFailedError` when its etag is no longer `etag`.
OpenRange = Callable[[int, int, "str | None"], Iterator[bytes]]

CHUNK_SIZE = 8 << 20
NOTE_INTERVAL_S = 0.5
HASH_BLOCK = 256 << 10  # read back in pieces that stay in cache


def _sync_file_range() -> Callable[[int, int, int], None]:
    """Start writing a range of a file to disk without waiting (Linux), else nothing.

    Done for each chunk as it completes, so the fsync before the rename
    finds little left to write: durability without a long stall at the end.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
        call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError, ImportError):
        return lambda fd, offset, length: None
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, write)  # advisory: its errors are not ours to raise

    return start


start_writeback = _sync_file_range()


class _CorruptPartial(Exception):
    """A resumed partial did not hash to the object's sha256."""


def sidecar(path: Path) -> tuple[Path, Path]:
    """`<path>.part` (the bytes so far) and `<path>.part.json` (whose, which chunks)."""
    return path.with_name(path.name + ".part"), path.with_name(path.name + ".part.json")


def discard_partial(path: Path) -> None:
    for p in sidecar(path):
        p.unlink(missing_ok=True)


def fetch(
    path: Path,
    stat: Callable[[], ObjectInfo | None],
    open_range: OpenRange,
    *,
    sha256: str | None,
    progress: Progress | None,
    label: str,
    transient: tuple[type[BaseException], ...] = (),
    retry: Retry = Retry(),
    chunk_size: int = CHUNK_SIZE,
    concurrency: int = 1,
) -> ObjectInfo:
    """Download an object into `path`, resuming `<path>.part`.

    `stat()` describes the object now (None: missing). If it changes under
    the download (412) or a resumed partial turns out corrupt, the partial is
    dropped and the download starts over, once. `sha256` (else the stored
    one) must match. Streams cut by an exception in `transient` are resumed
    where they stopped, within `retry`, per chunk.
    """
    report = Reporter(progress)
    for last in (False, True):
        info = stat()
        if info is None:
            raise StorageNotFoundError(f"{label}: no such object")
        if sha256 and info.sha256 and info.sha256 != sha256:
            raise StorageError(f"{label}: stored sha256 {info.sha256} is not the expected {sha256}")
        job = _Download(
            Path(path), info, open_range, sha256 or info.sha256, report, label, transient, retry,
            chunk_size, concurrency,
        )
        try:
            job.run()
            return info
        except PreconditionFailedError:
            discard_partial(Path(path))
            if last:
                raise
            logger.warning("%s changed since its download began; starting it over", label)
        except _CorruptPartial as exc:
            discard_partial(Path(path))
            if last:
                raise StorageError(str(exc)) from None
            logger.warning("%s; downloading it again", exc)
    raise AssertionError("unreachable")


class _Download:
    """One attempt at one object: resume, fetch the missing chunks, verify, rename."""

    def __init__(
        self,
        path: Path,
        info: ObjectInfo,
        open_range: OpenRange,
        sha256: str | None,
        report: Reporter,
        label: str,
        transient: tuple[type[BaseException], ...],
        retry: Retry,
        chunk_size: int,
        concurrency: int,
    ) -> None:
        self.path, self.info, self.open_range, self.sha256 = path, info, open_range, sha256
        self.report, self.label, self.transient, self.retry = report, label, transient, retry
        self.chunk = max(1, chunk_size)
        self.concurrency = max(1, concurrency)
        self.count = math.ceil(info.size / self.chunk)
        self.part, self.note = sidecar(path)
        # One stream at a time (a local store, or one chunk) runs on the caller's thread.
        self.workers: Workers[int, None] = Workers(concurrency, name="s3get", poll_s=0.01, inline=True)

    def _span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk
        return start, min(self.info.size, start + self.chunk)

    # -- the note -------------------------------------------------------------

    def _identity(self) -> dict:
        return {"key": self.info.key, "etag": self.info.etag, "size": self.info.size, "chunk": self.chunk}

    def _resume(self, water: HighWater) -> set[int]:
        """Chunks (and bytes of chunks) a previous run got of this very object.

        Complete chunks are returned; the bytes received of the others go
        into `water`. Anything else about the partial means a clean start.
        """
        try:
            noted = json.loads(self.note.read_text())
            if {k: noted.get(k) for k in ("key", "etag", "size", "chunk")} == self._identity() and self.part.exists():
                done = {int(i) for i in noted.get("done", ()) if 0 <= int(i) < self.count}
                for index, got in noted.get("have", {}).items():
                    index, got = int(index), int(got)
                    if 0 <= index < self.count and got > 0:
                        start, end = self._span(index)
                        if got >= end - start:
                            done.add(index)
                        else:
                            water.fill(index, got)
                for index in done:
                    start, end = self._span(index)
                    water.fill(index, end - start)
                return done
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        self.part.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_note(set(), None)
        return set()

    def _write_note(self, done: set[int], water: HighWater | None) -> None:
        have = {}
        if water is not None:
            have = {str(i): water[i] for i in range(self.count) if i not in done and water[i] > 0}
        tmp = self.note.with_name(self.note.name + ".tmp")
        tmp.write_text(json.dumps({**self._identity(), "done": sorted(done), "have": have}))
        os.replace(tmp, self.note)

    # -- the run ----------------------------------------------------------------

    def run(self) -> None:
        water = HighWater(max(self.count, 1))
        done = self._resume(water)
        resumed = water.total > 0
        self.report.flush(water.total)
        digest = hashlib.sha256()
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._fetch(fd, done, water, digest)
            os.ftruncate(fd, self.info.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        got = digest.hexdigest()
        if self.sha256 and got != self.sha256:
            if resumed:
                raise _CorruptPartial(f"{self.label}: resumed partial does not hash to {self.sha256}")
            discard_partial(self.path)
            raise StorageError(f"{self.label}: downloaded sha256 {got}, expected {self.sha256}")
        os.replace(self.part, self.path)
        self.note.unlink(missing_ok=True)
        self.report.flush(self.info.size)

    def _fetch(self, fd: int, done: set[int], water: HighWater, digest) -> None:
        """Fetch the missing chunks; the caller's thread hashes, notes, reports.

        Chunks go to a pool (or run on this thread when there is one worker).
        Their bytes are hashed as they arrive, in order, while later chunks
        still stream; at most `2 x workers` chunks past the one being hashed
        are started, so bytes waiting for their turn stay bounded.
        """
        todo = [i for i in range(self.count) if i not in done]
        window = 2 * min(self.concurrency, max(len(todo), 1))
        held: dict[int, list[bytes] | None] = {}  # blocks as they arrive (None: read back when done)
        where = [0, 0]  # the chunk being hashed, and how many of its blocks are
        noted_at = time.monotonic()

        def start(index: int) -> list[bytes] | None:
            fresh = self.sha256 is not None and water[index] == 0
            held[index] = [] if fresh else None
            return held[index]

        def finish(index: int, _: None) -> None:
            nonlocal noted_at
            done.add(index)
            if time.monotonic() - noted_at >= NOTE_INTERVAL_S:
                self._write_note(done, water)
                noted_at = time.monotonic()

        def tick() -> None:
            self._hash_some(fd, done, held, where, digest)
            self.report(water.total)

        # Inline, the one stream reports as it goes: no tick comes until the chunk is whole.
        inline = (lambda: self.report(water.total)) if self.workers.inline_for(len(todo)) else None
        self._hash_some(fd, done, held, where, digest)  # what a previous run left
        if not todo:
            return
        try:
            self.workers.run(todo, lambda index: self._get_chunk(fd, index, water, start(index), report=inline),
                             finish, tick, ready=lambda index: index < where[0] + window)
        finally:
            self._write_note(done, water)  # what a rerun may keep

    def _hash_some(
        self, fd: int, done: set[int], held: dict[int, list[bytes] | None], where: list[int], digest
    ) -> None:
        """Hash what has arrived, in order, and start the writeback of whole chunks.

        `where` is [chunk, blocks of it hashed]. A chunk fetched whole by
        this run is hashed block by block from memory as its worker appends
        them (each block is dropped once hashed); a chunk a previous run
        began or finished is read back from the partial once complete.
        """
        while where[0] < self.count:
            index = where[0]
            blocks = held.get(index)
            if blocks is not None:
                while where[1] < len(blocks):  # the worker may still be appending
                    digest.update(blocks[where[1]])
                    blocks[where[1]] = b""
                    where[1] += 1
                if index not in done or where[1] < len(blocks):
                    return
            elif index not in done:
                return
            elif self.sha256:
                self._hash_back(fd, *self._span(index), digest)
            start, end = self._span(index)
            start_writeback(fd, start, end - start)
            held.pop(index, None)
            where[0], where[1] = index + 1, 0

    def _hash_back(self, fd: int, start: int, end: int, digest) -> None:
        buffer = bytearray(HASH_BLOCK)
        view = memoryview(buffer)
        while start < end:
            n = os.preadv(fd, [view[: min(HASH_BLOCK, end - start)]], start)
            if not n:
                raise StorageError(f"{self.label}: partial file is shorter than noted")
            digest.update(view[:n])
            start += n

    def _get_chunk(
        self, fd: int, index: int, water: HighWater, blocks: list[bytes] | None, report=None
    ) -> None:
        """Write chunk `index` at its offset, from where it got to, resuming on transient errors.

        Bytes are written before they are counted, so the count (kept in the
        note) never claims bytes that are not in the file; they are also
        appended to `blocks`, if given, for the caller to hash.
        """
        start, end = self._span(index)
        on_position = water.slot(index)
        pos = start + water[index]

        def stream_rest() -> None:
            nonlocal pos
            if pos >= end:  # a stream that failed after its last byte: nothing is missing
                return
            stream = self.open_range(pos, end, self.info.etag)
            try:
                for data in stream:
                    self.workers.check()
                    if len(data) > end - pos:
                        data = data[: end - pos]
                    os.pwrite(fd, data, pos)
                    if blocks is not None:
                        blocks.append(data)
                    pos += len(data)
                    on_position(pos - start)
                    if report is not None:
                        report()
            finally:
                stream.close()  # now, not when the traceback is freed: it holds a connection
            if pos < end:
                raise StorageError(f"{self.label}: stream ended at byte {pos} of {self.info.size}")

        retried(stream_rest, policy=self.retry, transient=lambda exc: isinstance(exc, self.transient),
                cancel=self.workers.cancel, label=f"{self.label}: chunk {index}")
