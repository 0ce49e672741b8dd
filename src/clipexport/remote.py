"""The body of a remote segment call, shared by `modal_app.py` and the test fake.

A remote worker (a Modal container) gets plain task dicts and a storage URL.
For each task it:

1. skips it when the segment is already stored under `task.key` (a finished
   segment is never redone, whoever finished it);
2. opens the input clip in the store for reading in byte ranges
   (`storage.reader`): the decoder fetches the clip's index and its
   segment's packets, not the whole clip (a raw stream or a crowded clip,
   read from its start for every segment, is downloaded whole, once per
   container);
3. runs `worker.run_segment`, the very generator the local backend runs,
   with each whole fragment of the segment put in the store as it ends
   (`StoredFragments`), so that a restarted input continues after the last;
4. publishes the segment's cumulative state to the job's progress channel
   (throttled to about one write a second, always on phase starts and ends);
5. puts the finished file in the store under `task.key`, then publishes the
   segment as stored and drops its fragments.

A part restarted on the same input (a preempted container, a retry) finds its
own earlier snapshot in the channel and runs as `attempt + 1`, so the client
sees the restart as the contract says. Nothing here imports Modal.

No exception other than clipexport's leaves a container (`contained`):
Modal hands the container's exception object to the client as-is, where a
bare `TimeoutError` means "still running" (docs/modal.md).

The channel snapshot of a segment (one object per part)::

    {"part": "seg-0002", "attempt": 1, "state": "running",   # running | stored | failed
     "call": "fc-01H...",                                    # the Modal call running it
     "container_started": 1764000000.0, "t": 1764000042.5,   # Unix times: container start, this snapshot
     "container": "ta-01H...", "gpu": "NVIDIA L4",           # where it runs
     "cold": true, "load_s": 4.2,                            # the first input after the model load
     "key": "segments/....mp4", "skipped": false,
     "phases": {"upscale": {"done": 120, "total": 240, "ended": false, "elapsed": null},
                "encode":  {"done": 120, "total": 240, "ended": false, "elapsed": null, "bytes": null,
                            "damaged": [7, 8]}},                 # only when frames could not be decoded
     "error": null}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipexport.errors import BackendError, ClipexportError, RemoteFailure, StorageError, StorageNotFoundError
from clipexport.media import ClipPlan, Segment
from clipexport.storage import ProgressChannel, Storage, open_storage
from clipexport.storage.reader import StoredClip
from clipexport.worker import FragmentDir, FrameUpscaler, SegmentTask, fragment_prefix, run_segment

logger = logging.getLogger("clipexport.remote")

ENV_WORK_DIR = "CLIPEXPORT_WORK_DIR"
PUBLISH_INTERVAL_S = 1.0
PHASES = ("upscale", "encode")
_SHA_IN_KEY = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.[A-Za-z0-9]+)?$")

Observer = Callable[[dict[str, Any]], None]


# -- tasks as plain data ------------------------------------------------------


def task_to_dict(task: SegmentTask) -> dict[str, Any]:
    """A JSON-ready form of a task, for a call argument or a job-store fact."""
    return {
        "job": task.job,
        "segment": dataclasses.asdict(task.segment),
        "clip": task.clip.to_dict(),
        "key": task.key,
        "codec": task.codec,
        "crf": task.crf,
        "attempt": task.attempt,
        "input_key": task.input_key,
        "overlays": list(task.overlays),
    }


def task_from_dict(data: dict[str, Any]) -> SegmentTask:
    return SegmentTask(
        job=str(data["job"]),
        segment=Segment(**{k: int(v) for k, v in data["segment"].items()}),
        clip=ClipPlan.from_dict(data["clip"]),
        key=str(data["key"]),
        codec=str(data.get("codec") or "h264"),
        crf=None if data.get("crf") is None else int(data["crf"]),
        attempt=int(data.get("attempt") or 1),
        input_key=data.get("input_key"),
        overlays=tuple(data.get("overlays") or ()),
    )


def channel_prefix(job: str) -> str:
    """Where a job's progress channel lives in the store (both ends use it)."""
    return f"jobs/{job}/progress/"


# -- the container ------------------------------------------------------------


@dataclass
class Container:
    """What a worker knows of the container it runs in.

    `cold` is true from the model load (`@modal.enter`) until the first input
    takes it: that input reports the container as a cold start, with
    `load_s`, the seconds the load took; later inputs report it warm.
    """

    id: str
    cold: bool = False
    load_s: float | None = None
    gpu: str | None = None  # the device's name, e.g. "NVIDIA L4"
    started_at: float | None = None  # Unix time the container started (billing starts there)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @classmethod
    def loaded(cls, load_s: float, id: str | None = None, gpu: str | None = None) -> Container:
        """A container whose model just loaded in `load_s` seconds."""
        return cls(id=id or container_id(), cold=True, load_s=round(load_s, 3), gpu=gpu,
                   started_at=round(time.time() - load_s, 3))

    def take_cold(self) -> tuple[bool, float | None]:
        """(cold, load_s) for the next input; only the first one is cold."""
        with self._lock:
            cold, self.cold = self.cold, False
            return cold, (self.load_s if cold else None)


def container_id() -> str:
    """Modal's task id inside a container, else this process's id."""
    return os.environ.get("MODAL_TASK_ID") or f"pid-{os.getpid()}"


def work_dir() -> Path:
    """Scratch space for segments being written, their fragments, and inputs downloaded whole."""
    root = os.environ.get(ENV_WORK_DIR) or os.path.join(tempfile.gettempdir(), "clipexport-remote")
    return Path(root)


_stores: dict[tuple[str, str | None], Storage] = {}
_stores_lock = threading.Lock()


def storage_for(url: str, endpoint_url: str | None) -> Storage:
    """One Storage per (url, endpoint) per process: clients are reused."""
    with _stores_lock:
        store = _stores.get((url, endpoint_url))
        if store is None:
            store = _stores[(url, endpoint_url)] = open_storage(url, endpoint_url=endpoint_url)
        return store


#: Raw elementary streams: no index and no timestamps to seek by, so a segment is decoded from the clip's start.
WHOLE_FILE_SUFFIXES = (".h264", ".264", ".h265", ".265", ".hevc")

_fetch_locks: dict[str, threading.Lock] = {}
_fetch_guard = threading.Lock()


def stored_input(storage: Storage, key: str, cache: Path, *, from_start: bool = False) -> StoredClip | Path:
    """The input object `key`, for the decoder to read in byte ranges: only its segment's, not the whole clip.

    A clip whose segments are all read from its start (`from_start`: a
    crowded clip's frame times; a raw stream, by its suffix) is downloaded
    whole instead, once per container, into `cache`. Its key names its
    sha256 (content-addressed): the stored object must say the same.
    """
    whole = from_start or key.lower().endswith(WHOLE_FILE_SUFFIXES)
    path = cache / "inputs" / key.replace("/", "_")
    if whole and path.is_file():
        return path  # downloaded by an earlier segment of this container, sha256-checked then
    info = storage.stat(key)
    if info is None:
        raise StorageNotFoundError(f"{storage.url}/{key}: the input is not in the store; run `resume` to upload it")
    match = _SHA_IN_KEY.search(key)
    sha = match.group(1) if match else None
    if sha and info.sha256 and info.sha256 != sha:
        raise StorageError(f"{storage.url}/{key}: stored sha256 {info.sha256} is not the one its key names")
    if not whole:
        return StoredClip(storage, key, info.size)
    with _fetch_guard:
        lock = _fetch_locks.setdefault(str(path), threading.Lock())
    with lock:
        if not path.is_file():
            storage.get_file(key, path, sha256=sha)
    return path


class StoredFragments(FragmentDir):
    """A segment's whole fragments, put in the store as each one ends.

    A container that takes the input after a preemption (a fresh one, with
    an empty cache) finds them under `<segment key>.partial/<job>/` and
    continues after the last; the files under `cache` are a local copy.
    """

    def __init__(self, storage: Storage, key: str, job: str, cache: Path) -> None:
        self.prefix = fragment_prefix(key, job)
        super().__init__(cache / self.prefix)
        self.storage = storage

    def _key(self, index: int) -> str:
        return self.prefix + self.path(index).name

    def count(self) -> int:
        stored = {info.key for info in self.storage.list(self.prefix)}
        index = 0
        while self._key(index) in stored:
            index += 1
        return index

    def add(self, index: int, written: Path, damaged: Sequence[int] = ()) -> None:
        super().add(index, written, damaged)
        if damaged:  # before the fragment, as on disk: a stored fragment has its damage stored
            self.storage.put_bytes(self.prefix + self.note(index).name, json.dumps(list(damaged)).encode())
        self.storage.put_file(self._key(index), self.path(index))

    def damaged(self, count: int) -> list[int]:
        stored = {info.key for info in self.storage.list(self.prefix)}
        found: list[int] = []
        for index in range(count):
            key = self.prefix + self.note(index).name
            raw = self.storage.get_bytes(key) if key in stored else None
            found += json.loads(raw) if raw else []
        return found

    def paths(self, count: int) -> list[Path]:
        paths = super().paths(count)
        for index, path in enumerate(paths):
            if not path.is_file():
                self.storage.get_file(self._key(index), path)
        return paths

    def clear(self) -> None:
        self.storage.delete_prefix(self.prefix)
        super().clear()


# -- one call -----------------------------------------------------------------


@contextmanager
def contained() -> Iterator[None]:
    """Let only clipexport's errors out: anything else becomes a `RemoteFailure` (type and message)."""
    try:
        yield
    except ClipexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised as clipexport's own, by name and message
        raise RemoteFailure(type(exc).__name__, " ".join(str(exc).split())[:500]) from None


def run_remote(
    task_dicts: Sequence[dict[str, Any]],
    storage_url: str,
    endpoint_url: str | None,
    upscaler: FrameUpscaler,
    container: Container,
    **options: Any,
) -> dict[str, Any]:
    """What a Modal method body calls: open the store, then `run_segments`, `contained`."""
    with contained():
        return run_segments(task_dicts, storage_for(storage_url, endpoint_url), upscaler, container, **options)


def run_segments(
    task_dicts: Sequence[dict[str, Any]],
    storage: Storage,
    upscaler: FrameUpscaler,
    container: Container,
    *,
    cache: Path | None = None,
    interval: float = PUBLISH_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
    observer: Observer | None = None,
    call_id: str | None = None,
) -> dict[str, Any]:
    """Run the tasks one after the other; return what became of each.

    Returns ``{"container": id, "segments": [{"part", "key", "attempt",
    "frames", "bytes", "elapsed", "skipped"}, ...]}``. A clipexport error
    (a corrupt input, a store that refuses the credentials) is returned, not
    raised, as ``"error"`` and ``"resumable"`` next to the segments finished
    before it: retrying the input would fail the same way. Anything else
    propagates, so that the platform marks the call failed. `call_id` (Modal's
    `current_function_call_id()`) goes into every snapshot.
    """
    cache = cache or work_dir()
    tasks = [task_from_dict(d) for d in task_dicts]
    result: dict[str, Any] = {"container": container.id, "segments": []}
    if not tasks:
        return result
    channel = ProgressChannel(storage, channel_prefix(tasks[0].job), interval=interval, clock=clock)
    for task in tasks:
        run = _SegmentRun(task, storage, channel, container, clock, observer, call_id)
        try:
            result["segments"].append(run.execute(upscaler, cache))
        except ClipexportError as exc:
            run.failed(str(exc))
            result.update(error=f"{task.segment.name}: {exc}", resumable=bool(exc.resumable), part=task.segment.name)
            return result
        except Exception as exc:
            run.failed(f"{type(exc).__name__}: {exc}")
            raise
    return result


class _SegmentRun:
    """One task in a container: its snapshot, its events, its result."""

    def __init__(
        self,
        task: SegmentTask,
        storage: Storage,
        channel: ProgressChannel,
        container: Container,
        clock: Callable[[], float],
        observer: Observer | None,
        call_id: str | None = None,
    ) -> None:
        self.task, self.storage, self.channel = task, storage, channel
        self.part = task.segment.name
        self.clock, self.observer = clock, observer
        self.container = container
        self.previous = self._previous()
        self.attempt = task.attempt
        cold, load_s = False, None
        total = task.segment.count
        self.snapshot: dict[str, Any] = {
            "part": self.part,
            "attempt": self.attempt,
            "state": "running",
            "call": call_id,
            "container_started": container.started_at,
            "container": container.id,
            "gpu": container.gpu,
            "cold": cold,
            "load_s": load_s,
            "key": task.key,
            "skipped": False,
            "phases": {p: {"done": 0, "total": total, "ended": False, "elapsed": None} for p in PHASES},
            "error": None,
        }
        self.snapshot["phases"]["encode"]["bytes"] = None

    def _previous(self) -> dict[str, Any]:
        """This part's latest snapshot in the channel, from an earlier run; {} if none."""
        try:
            raw = self.storage.get_bytes(self.channel.key(self.part))
            snapshot = json.loads(raw)["snapshot"] if raw else {}
        except (ClipexportError, ValueError, KeyError, TypeError):
            return {}  # unreadable: nothing to go on
        return snapshot if isinstance(snapshot, dict) else {}

    def execute(self, upscaler: FrameUpscaler, cache: Path) -> dict[str, Any]:
        task, previous = self.task, self.previous
        seen = previous.get("attempt")
        seen = seen if isinstance(seen, int) and not isinstance(seen, bool) else 0
        found = self.storage.stat(task.key)
        if found is not None:
            if previous.get("state") == "stored":  # its snapshot already says so
                self.attempt = max(seen, 1)
                return self._result(frames=task.segment.count, size=found.size, elapsed=0.0, skipped=True)
            return self._skip(found.size)
        if seen >= task.attempt:  # a run of this attempt began before: a preempted or retried input
            self.attempt = seen + 1
        self.snapshot["attempt"] = self.attempt
        cold, load_s = self.container.take_cold()
        self.snapshot.update(cold=cold, load_s=load_s)
        if not task.input_key:
            raise BackendError(f"task for {self.part} has no input_key: the client did not upload its input",
                               resumable=False)
        self._publish(force=True)  # the call has started: the client's wait is over
        source = stored_input(self.storage, task.input_key, cache, from_start=task.clip.info.crowded)
        plan = dataclasses.replace(task.clip, info=dataclasses.replace(task.clip.info, path=source))
        runnable = dataclasses.replace(task, clip=plan, attempt=self.attempt)
        out = cache / "segments" / f"{task.job}-{self.part}-{self.attempt}{Path(task.key).suffix}"
        fragments = StoredFragments(self.storage, task.key, task.job, cache)
        started = self.clock()
        try:
            for event in run_segment(runnable, upscaler, out, fragments=fragments):
                self._apply(event)
            if isinstance(source, StoredClip):
                logger.info("%s: read %d of the input's %d bytes", self.part, source.fetched, source.size)
            size = out.stat().st_size
            self.storage.put_file(task.key, out)
        finally:
            out.unlink(missing_ok=True)
        fragments.clear()
        elapsed = round(self.clock() - started, 3)
        self.snapshot["state"] = "stored"
        self.snapshot["phases"]["encode"]["elapsed"] = elapsed  # encode ends once the file is stored
        self._publish(force=True)
        frames = self.snapshot["phases"]["encode"]["done"]
        return self._result(frames=frames, size=size, elapsed=elapsed, skipped=False)

    def _skip(self, size: int) -> dict[str, Any]:
        total = self.task.segment.count
        for phase in PHASES:
            self.snapshot["phases"][phase].update(done=total, ended=True, elapsed=0.0)
        self.snapshot["phases"]["encode"]["bytes"] = size
        self.snapshot.update(state="stored", skipped=True)
        self._publish(force=True)
        return self._result(frames=total, size=size, elapsed=0.0, skipped=True)

    def _result(self, *, frames: int, size: int, elapsed: float, skipped: bool) -> dict[str, Any]:
        damaged = self.snapshot["phases"]["encode"].get("damaged") or self.previous_damage()
        return {"part": self.part, "key": self.task.key, "attempt": self.attempt, "frames": frames,
                "bytes": size, "elapsed": elapsed, "skipped": skipped, **({"damaged": damaged} if damaged else {})}

    def previous_damage(self) -> list[int]:
        """The damaged frames an earlier run of this part that stored the segment reported."""
        encode = (self.previous.get("phases") or {}).get("encode")
        damaged = encode.get("damaged") if isinstance(encode, dict) else None
        return damaged if isinstance(damaged, list) else []

    def _apply(self, event: dict[str, Any]) -> None:
        """Fold one worker event into the snapshot and publish it."""
        if self.observer is not None:
            self.observer({**event, "container": self.snapshot["container"]})
        phase = self.snapshot["phases"].get(event.get("phase"))
        if phase is None:
            return
        if isinstance(event.get("done"), int):
            phase["done"] = max(phase["done"], event["done"])
        if isinstance(event.get("total"), int):
            phase["total"] = event["total"]
        kind = event.get("type")
        if kind == "phase_end":
            phase["ended"] = True
            phase["elapsed"] = event.get("elapsed")
            if "bytes" in event:
                phase["bytes"] = event["bytes"]
            if event.get("damaged"):  # the client reports and remembers them as the local backend's
                phase["damaged"] = event["damaged"]
        self._publish(force=kind in ("phase_start", "phase_end"))

    def _publish(self, *, force: bool) -> None:
        self.snapshot["t"] = round(time.time(), 3)  # when the container last worked (billing ends a tail later)
        snapshot = json.loads(json.dumps(self.snapshot))  # a copy: a held snapshot must not change
        if force:
            self.channel.publish(self.part, snapshot, force=True)
        else:
            self.channel.publish(self.part, snapshot)

    def failed(self, message: str) -> None:
        """Say so in the channel (best effort: the call's own failure is what counts)."""
        self.snapshot.update(state="failed", error=message[:500])
        try:
            self._publish(force=True)
        except Exception:  # noqa: BLE001 - already failing; the client learns it from the call
            logger.warning("could not publish the failure of %s", self.part, exc_info=True)
