"""The client's transfers: inputs up to the store, finished segments down.

Both speak the event contract (`upload` and `download` phases, one `part`
per file) and lean on the store for resume: an upload records its multipart
state in the job's TransferState and skips an object already there; a
download continues from its `.part` file. Segments download in a thread
while others are still being upscaled, so the download overlaps the work.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clipexport.events import Throttle
from clipexport.storage import Storage, TransferState, content_key

Emit = Callable[[dict[str, Any]], None]


def upload_inputs(
    storage: Storage,
    paths: Sequence[Path],
    hashes: Sequence[str],
    emit: Emit,
    state: TransferState,
) -> list[str]:
    """Put each input under its content key; return the keys."""
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes)
    emit({"type": "phase_start", "phase": "upload", "unit": "bytes", "total": total})
    started, keys = time.monotonic(), []
    for index, (path, sha, size) in enumerate(zip(paths, hashes, sizes), 1):
        key = content_key(sha, path.suffix.lower())
        found = storage.stat(key)
        stored = found is not None and found.size == size and found.sha256 == sha  # put_file will skip it
        _transfer(emit, "upload", f"clip-{index:02d}", size,
                  lambda progress: storage.put_file(key, path, progress=progress, state=state, sha256=sha),
                  skipped=stored)
        keys.append(key)
    emit({"type": "phase_end", "phase": "upload", "unit": "bytes", "done": total, "total": total,
          "elapsed": round(time.monotonic() - started, 3)})
    return keys


def _transfer(emit: Emit, phase: str, part: str, size: int, run: Callable[[Callable[[int], None]], Any],
              *, skipped: bool = False) -> None:
    """Run one transfer with throttled, cumulative progress for its part.

    `skipped` (the object is already there) goes on every event of the part,
    so the display can say so instead of showing an instant transfer.
    """
    common = {"phase": phase, "part": part, "unit": "bytes", "total": size, "attempt": 1,
              **({"skipped": True} if skipped else {})}
    emit({"type": "phase_start", **common})
    started, throttle = time.monotonic(), Throttle()

    def progress(done: int) -> None:
        if throttle.ready():
            emit({"type": "progress", **common, "done": done})

    run(progress)
    emit({"type": "progress", **common, "done": size})
    emit({"type": "phase_end", **common, "done": size, "elapsed": round(time.monotonic() - started, 3)})


class SegmentDownloader:
    """Downloads finished segments in a background thread, in arrival order.

    `add` is called as segments finish; `finish` waits for every download
    and re-raises the first failure in the caller's thread.
    """

    def __init__(self, storage: Storage, root: Path, emit: Emit) -> None:
        self._storage, self._root, self._emit = storage, root, emit
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._started: float | None = None
        self._done_bytes = 0
        self._thread = threading.Thread(target=self._loop, name="segment-downloads", daemon=True)
        self._thread.start()

    def add(self, part: str, key: str) -> None:
        if self._started is None:
            self._started = time.monotonic()
            self._emit({"type": "phase_start", "phase": "download", "unit": "bytes", "total": None})
        self._queue.put((part, key))

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._started is not None:
            self._emit({"type": "phase_end", "phase": "download", "unit": "bytes", "done": self._done_bytes,
                        "total": self._done_bytes, "elapsed": round(time.monotonic() - self._started, 3)})

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            part, key = item
            try:
                self._download(part, key)
            except BaseException as exc:  # handed to the caller's thread by finish()
                self._error = exc

    def _download(self, part: str, key: str) -> None:
        dest = self._root / key
        info = self._storage.stat(key)
        if info is None:
            raise FileNotFoundError(f"segment {part} is missing from {self._storage.url} ({key})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _transfer(self._emit, "download", part, info.size,
                  lambda progress: self._storage.get_file(key, dest, progress=progress, sha256=info.sha256))
        self._done_bytes += info.size
