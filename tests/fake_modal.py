"""An in-process Modal for tests: `FakeModal` (the service) and its `client()`.

It keeps the documented semantics of spawned calls in modal 1.x:

- `spawn` returns an id at once; the call runs in a thread (a "container")
  whatever becomes of the client that spawned it, so a test can abandon a
  `ModalBackend` mid-run and follow the same calls from a new one;
- `get(id, timeout)` returns the result, raises the builtin `TimeoutError`
  while the call runs, `CallExpired` once the output has "expired", and
  `CallFailed` for a call that raised or was cancelled;
- `cancel(id)` stops the call at its next frame (Modal raises
  `InputCancellation` in the container);
- a preempted input is restarted on a fresh container, with the same
  arguments, as Modal does: nothing tells the body it is a restart.

Containers run the real container body, `clipexport.remote.run_remote`,
with the real worker and model on CPU, against the storage URL the client
passes. A container stays warm after a call and takes the next one; a new
one waits `cold_start_s`, then loads the model (once per service).

Knobs: `cold_start_s`; `frame_delay_s` (slows each frame, so tests can act
mid-segment); `preempt` (parts whose first run is preempted after
`preempt_after` frames); `crash` (parts whose first run raises in the
container: the call fails); `fail` (part -> a clipexport error its first run
raises, which the body returns as the call's result); `gate` (containers wait
for it before running).
`log` holds every phase start and end seen in a container.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipexport import remote
from clipexport.backends.modal import CallExpired, CallFailed


class Preempted(BaseException):
    """The fake's stand-in for a container taken away mid-input."""


class Cancelled(BaseException):
    """The fake's stand-in for modal.exception.InputCancellation."""


@dataclass
class FakeCall:
    id: str
    task_dicts: list[dict[str, Any]]
    storage_url: str
    endpoint_url: str | None
    model: str
    scale: int
    gpu: str | None
    warm_up: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    expired: bool = False
    runs: int = 0  # how many times a container started it
    thread: threading.Thread | None = None


@dataclass
class FakeContainer:
    name: str
    info: remote.Container
    cache: Path


class _Guard:
    """Wraps the upscaler: slows frames, preempts, crashes, cancels."""

    def __init__(self, inner: Any, service: FakeModal, call: FakeCall) -> None:
        self.inner, self.service, self.call = inner, service, call
        self.scale = inner.scale
        self.part: str | None = None

    def stream(self, frames: Iterable[Any], *, batch: int = 4) -> Iterator[Any]:
        svc, part = self.service, self.part
        for n, frame in enumerate(self.inner.stream(frames, batch=batch), start=1):
            if self.call.cancelled.is_set():
                raise Cancelled()
            if svc.frame_delay_s:
                time.sleep(svc.frame_delay_s)
            if n >= svc.preempt_after and svc._first_time(part, svc.preempt, "preempted"):
                raise Preempted()
            if n >= svc.preempt_after and svc._first_time(part, svc.crash, "crashed"):
                raise RuntimeError(f"injected crash in {part}")
            if n >= svc.preempt_after and svc._first_time(part, set(svc.fail), "failed"):
                raise svc.fail[part]
            yield frame


class FakeModal:
    """The service side: calls, containers, the model, a log."""

    GPU = "FAKE GPU"  # what its containers report as their device

    def __init__(
        self,
        root: Path,
        *,
        cold_start_s: float = 0.0,
        frame_delay_s: float = 0.0,
        preempt: Iterable[str] = (),
        preempt_after: int = 3,
        crash: Iterable[str] = (),
        fail: dict[str, BaseException] | None = None,
        gate: threading.Event | None = None,
        publish_s: float = 0.2,
    ) -> None:
        self.root = Path(root)
        self.cold_start_s, self.frame_delay_s = cold_start_s, frame_delay_s
        self.preempt, self.preempt_after, self.crash = set(preempt), preempt_after, set(crash)
        self.fail = dict(fail or {})
        self.gate, self.publish_s = gate, publish_s
        self.calls: dict[str, FakeCall] = {}
        self.log: list[dict[str, Any]] = []
        self.events: list[str] = []  # "preempted seg-0002", "crashed ...", "cancelled fc-..."
        self._idle: list[FakeContainer] = []
        self._upscalers: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._containers = itertools.count(1)
        self._done_once: set[tuple[str, str]] = set()

    def client(self) -> FakeModalClient:
        return FakeModalClient(self)

    # -- calls ------------------------------------------------------------------

    def spawn(self, task_dicts, storage_url, endpoint_url, *, model, scale, gpu, warm_up=False) -> str:  # noqa: ANN001
        call = FakeCall(f"fc-{next(self._ids):04d}", list(task_dicts), storage_url, endpoint_url, model, scale, gpu,
                        warm_up=warm_up)
        call.thread = threading.Thread(target=self._serve, args=(call,), name=call.id, daemon=True)
        with self._lock:
            self.calls[call.id] = call
        call.thread.start()
        return call.id

    def get(self, call_id: str, timeout: float) -> Any:
        call = self.calls.get(call_id)
        if call is None:
            raise CallExpired(f"Modal does not know the call {call_id}")
        if not call.finished.wait(timeout):
            raise TimeoutError()
        if call.expired:
            raise CallExpired("the call's output has expired (Modal keeps it 7 days)")
        if call.error is not None:
            raise call.error
        return call.result

    def cancel(self, call_id: str) -> None:
        call = self.calls.get(call_id)
        if call is None:
            raise CallExpired(f"Modal does not know the call {call_id}")
        call.cancelled.set()

    def expire(self, call_id: str) -> None:
        """Make a finished call's output expire (what 7 days do)."""
        self.calls[call_id].finished.wait()
        self.calls[call_id].expired = True

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait for every call to finish (the tests' way to let the cloud work on)."""
        deadline = time.monotonic() + timeout
        for call in list(self.calls.values()):
            if not call.finished.wait(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"{call.id} still running after {timeout} s")

    # -- what happened ------------------------------------------------------------

    def starts(self, phase: str = "upscale") -> Counter:
        """How many times each part's `phase` started in a container."""
        return Counter(e["part"] for e in self.log if e["type"] == "phase_start" and e["phase"] == phase)

    def attempts(self, part: str) -> list[int]:
        return [e["attempt"] for e in self.log if e["type"] == "phase_start" and e["phase"] == "upscale"
                and e["part"] == part]

    # -- containers -----------------------------------------------------------------

    def _first_time(self, part: str | None, parts: set[str], what: str) -> bool:
        if part is None or part not in parts:
            return False
        with self._lock:
            if (what, part) in self._done_once:
                return False
            self._done_once.add((what, part))
            self.events.append(f"{what} {part}")
        return True

    def _container(self, call: FakeCall) -> FakeContainer | None:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if call.cancelled.wait(self.cold_start_s):
            return None
        started = time.monotonic()
        self._upscaler(call.model, call.scale)
        name = f"ta-fake{next(self._containers):03d}"
        info = remote.Container.loaded(time.monotonic() - started, id=name, gpu=self.GPU)
        return FakeContainer(name, info, self.root / name)

    def _upscaler(self, model: str, scale: int) -> Any:
        with self._lock:
            found = self._upscalers.get((model, scale))
            if found is None:
                from clipexport.upscale import load_upscaler

                found = self._upscalers[(model, scale)] = load_upscaler(model, scale=scale, device="cpu")
            return found

    def _serve(self, call: FakeCall) -> None:
        try:
            if self.gate is not None:
                while not self.gate.wait(0.05):
                    if call.cancelled.is_set():
                        raise Cancelled()
            while True:
                container = self._container(call)
                if container is None:
                    raise Cancelled()
                call.runs += 1
                if call.warm_up:
                    call.result = {"container": container.name, "cold": container.info.cold,
                                   "load_s": container.info.load_s}
                    container.info.take_cold()
                    break
                guard = _Guard(self._upscaler(call.model, call.scale), self, call)
                try:
                    call.result = remote.run_remote(
                        call.task_dicts, call.storage_url, call.endpoint_url, guard, container.info,
                        cache=container.cache, interval=self.publish_s,
                        observer=lambda event, guard=guard, c=container: self._observe(call, c, guard, event),
                    )
                except Preempted:
                    continue  # the container is gone; Modal restarts the input on a fresh one
                break
            with self._lock:
                self._idle.append(container)
        except Cancelled:
            with self._lock:
                self.events.append(f"cancelled {call.id}")
            call.error = CallFailed("the call was cancelled")
        except Exception as exc:  # a crash in the body: the call fails
            call.error = CallFailed(f"{type(exc).__name__}: {exc}")
        finally:
            call.finished.set()

    def _observe(self, call: FakeCall, container: FakeContainer, guard: _Guard, event: dict[str, Any]) -> None:
        if event.get("type") == "phase_start" and event.get("phase") == "upscale":
            guard.part = event.get("part")
        if event.get("type") in ("phase_start", "phase_end"):
            with self._lock:
                self.log.append({"call": call.id, "container": container.name, "type": event["type"],
                                 "phase": event.get("phase"), "part": event.get("part"),
                                 "attempt": event.get("attempt")})


class FakeModalClient:
    """`ModalClient` on a `FakeModal`; a new one stands for a new client process."""

    def __init__(self, service: FakeModal) -> None:
        self.service = service
        self.spawned: list[str] = []

    def spawn(self, task_dicts, storage_url, endpoint_url, *, model, scale, gpu) -> str:  # noqa: ANN001
        call_id = self.service.spawn(task_dicts, storage_url, endpoint_url, model=model, scale=scale, gpu=gpu)
        self.spawned.append(call_id)
        return call_id

    def warm_up(self, *, model: str, scale: int, gpu: str | None) -> str:
        return self.service.spawn([], "", None, model=model, scale=scale, gpu=gpu, warm_up=True)

    def get(self, call_id: str, timeout: float) -> Any:
        return self.service.get(call_id, timeout)

    def cancel(self, call_id: str) -> None:
        self.service.cancel(call_id)


# -- a job to run ---------------------------------------------------------------


MODEL = "realesr-animevideov3"
SCALE = 2


@dataclass
class Job:
    """A real job in a real job store, its input uploaded, its tasks built."""

    store: Any  # JobStore
    id: str
    tasks: list[Any]  # SegmentTask
    storage: Any  # LocalStorage
    clip: Path


def make_job(tmp_path: Path, *, frames: int = 30, segment_frames: int = 10, parallel: int = 2,
             storage: Any = None) -> Job:
    """A 64x36 clip cut into segments, uploaded (to a file:// store by default), tasks ready."""
    from clipexport.jobs import JobSpec, JobStore
    from clipexport.media import plan_clips, plan_segments, probe
    from clipexport.storage import content_key, hash_file, open_storage
    from clipexport.worker import SegmentTask, segment_key
    from tests.clips import make_clip

    clip = make_clip(tmp_path / "in.mp4", frames=frames, width=64, height=36, fps=24)
    storage = storage or open_storage((tmp_path / "bucket").as_uri())
    sha = hash_file(clip)
    input_key = content_key(sha, ".mp4")
    storage.put_file(input_key, clip)
    plans = plan_clips([probe(clip)], [None], [None])
    segments = plan_segments([p.frames for p in plans], segment_frames)
    store = JobStore(tmp_path / "state")
    spec = JobSpec(inputs=[str(clip)], output=str(tmp_path / "out.mp4"), model=MODEL, scale=SCALE,
                   segment_frames=segment_frames, backend="modal", storage=storage.url, parallel=parallel)
    record = store.create(spec)
    tasks = []
    for seg in segments:
        key = segment_key(sha, plans[seg.clip], seg, model=MODEL, weights_id="builtin", scale=SCALE,
                          codec="h264", crf=None)
        tasks.append(SegmentTask(record.id, seg, plans[seg.clip], key, input_key=input_key))
    return Job(store, record.id, tasks, storage, clip)
