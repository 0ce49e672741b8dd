"""A stored clip that PyAV reads in byte ranges, so a container fetches only its segment's bytes.

A Modal container rendering one segment of a long clip needs the index (an
MP4's `moov`) and the packets from the keyframe before its first frame to its
last frame: a small part of the file. `StoredClip` stands where a clip's path
would (`ClipInfo.path`); media opens it through `open_stream()`, a seekable
file object whose reads become ranged GETs (`Storage.read_range`) through the
store's own client: its credentials, TLS checks, retries and error
translation, and no credential in a URL that an error message could show.

Reads go ahead in blocks that double while the reads stay sequential (from
`block`, up to `max_block`) and start small again after a seek, so a demuxer
hopping through the index costs little and a long sequential read costs few
requests. The last few blocks are kept for every stream of the clip: the
decoder opens it more than once (timestamps, then frames), and the header
and index it reads each time are fetched once. The bytes fetched are counted
(`fetched`) for the logs and tests.
"""

from __future__ import annotations

import io
import threading

from clipexport.storage.base import Storage

BLOCK = 256 << 10
MAX_BLOCK = 1 << 20
KEPT = 8  # blocks kept (8 MiB at most): what opening the clip reads (header, index, first packets), and more


class StoredClip:
    """The clip `key` of `size` bytes in `storage`, opened by media as a stream of ranged reads."""

    def __init__(self, storage: Storage, key: str, size: int, *, block: int = BLOCK, max_block: int = MAX_BLOCK):
        self.storage, self.key, self.size = storage, key, size
        self.block, self.max_block = block, max(block, max_block)
        self.fetched = 0  # bytes received, over every stream opened
        self._blocks: dict[int, bytes] = {}  # start -> bytes, oldest first
        self._lock = threading.Lock()

    def __str__(self) -> str:
        """What an error message names: the store's URL and the key (never a credential)."""
        return f"{self.storage.url}/{self.key}"

    def open_stream(self) -> RangeReader:
        return RangeReader(self)

    def kept(self, pos: int) -> tuple[int, bytes] | None:
        """The kept block holding byte `pos`, as (start, bytes)."""
        with self._lock:
            for at, block in self._blocks.items():
                if at <= pos < at + len(block):
                    return at, block
        return None

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) from the store, kept as a block (the oldest kept one goes)."""
        data = self.storage.read_range(self.key, start, end)
        with self._lock:
            self.fetched += len(data)
            self._blocks[start] = data
            while len(self._blocks) > KEPT:
                del self._blocks[next(iter(self._blocks))]
        return data


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over a `StoredClip`, reading ahead in blocks."""

    def __init__(self, clip: StoredClip) -> None:
        super().__init__()
        self._clip = clip
        self._pos = 0
        self._next = -1  # where the last block fetched ends: a read there is sequential
        self._ahead = clip.block  # the next block's size: doubles while reads stay sequential

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._clip.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Up to len(buffer) bytes at the position, from one block (a short read is a read, not the end)."""
        view = memoryview(buffer).cast("B")
        size = min(len(view), self._clip.size - self._pos)
        if size <= 0:
            return 0
        at, block = self._block()
        offset = self._pos - at
        n = min(size, len(block) - offset)
        view[:n] = block[offset : offset + n]
        self._pos += n
        return n

    def _block(self) -> tuple[int, bytes]:
        """The kept block holding the position, else a new one fetched there."""
        found = self._clip.kept(self._pos)
        if found is not None:
            return found
        sequential = self._pos == self._next
        self._ahead = min(self._ahead * 2, self._clip.max_block) if sequential else self._clip.block
        self._next = min(self._clip.size, self._pos + self._ahead)
        return self._pos, self._clip.fetch(self._pos, self._next)
