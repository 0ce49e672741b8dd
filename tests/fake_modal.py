"""An in-process Modal for tests, faked at Modal's own objects: `FakeModal`.

`RealModalClient` runs unchanged on top of it (`FakeModal.client()`), so its
error translation, the backend's retry policy and its follow loop all run in
tests. What is faked, and how it keeps Modal 1.6.4's semantics (docs/modal.md):

- `Cls.from_name(app, name).with_options(gpu=...)(model=..., scale=...)`:
  lazy like Modal's (an app that is not deployed fails at the first spawn with
  `modal.exception.NotFoundError`); every (model, scale, gpu) is a variant
  with its own pool of containers; `.run.spawn(...)`/`.warm_up.spawn()`
  return a call with an `object_id` at once;
- `FunctionCall` is modal's real class: `from_id(id).get(timeout=)` and
  `.cancel(terminate_containers=)` run modal's own code down to the gRPC
  stub, which this fake answers (`FunctionGetOutputs`, `FunctionCallCancel`)
  with the results a server sends: pickled results and exceptions, an empty
  TERMINATED result for a cancelled call, a TIMEOUT result past the call's
  time limit, no output while running, no output and no unfinished input once
  expired. `transport` holds modal exceptions the stub raises next (what
  modal's gRPC layer raises after its own retries); `spawn_transport` holds
  (exception, started) for the next spawns: the spawn raises it, after
  starting the call when `started` (its answer was lost on the way back);
  `get_gate` holds every `get` until set;
- a call runs in a thread (a "container") whatever becomes of the client
  that spawned it; a preempted input is restarted on a fresh container, with
  the same arguments and the same call id, as Modal does; `retries` re-runs a
  crashed or timed-out call (Modal's `Retries`; the app sets none);
- a container stays warm after a call and takes the next call of its
  variant; idle for longer than `scaledown_window_s`, it is gone. `containers`
  keeps when each started and stopped (billed time).

Containers run the real container body, `clipexport.remote.run_remote`,
with the real worker and model on CPU, against the storage URL the client
passes. A new container waits `cold_start_s`, then loads the model (once
per service).

Knobs: `cold_start_s`; `frame_delay_s` (slows each frame, so tests can act
mid-segment); `preempt` (parts whose first run is preempted after
`preempt_after` frames); `crash` (parts whose first run raises in the
container); `fail` (part -> a clipexport error its first run raises, which
the body returns as the call's result); `gate` (containers wait for it before
running); `timeout_s` (a call's time limit); `deployed`.
`log` holds every phase start and end seen in a container; `upscaled`
counts the frames upscaled per part over all its runs.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import modal
from modal import exception as mx
from modal._serialization import serialize
from modal.client import _Client
from modal_proto import api_pb2

from clipexport import remote
from clipexport.backends.modal import RealModalClient

Status = api_pb2.GenericResult


class Preempted(BaseException):
    """The fake's stand-in for a container taken away mid-input."""


class Cancelled(BaseException):
    """The fake's stand-in for modal.exception.InputCancellation."""


class TimedOut(BaseException):
    """The call ran past its time limit: Modal stops the input."""


@dataclass
class FakeCall:
    id: str
    task_dicts: list[dict[str, Any]]
    storage_url: str
    endpoint_url: str | None
    variant: tuple[str, int, str | None]  # (model, scale, gpu): its container pool
    warm_up: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    terminate_containers: bool = False
    output: api_pb2.GenericResult | None = None  # what the server answers once it finished
    result: Any = None
    error: BaseException | None = None  # what the body raised (None if it returned)
    status: str = "running"  # running | success | failure | terminated | timeout
    expired: bool = False
    runs: int = 0  # how many times a container started it
    started: float = 0.0  # when a container last took it
    thread: threading.Thread | None = None

    @property
    def model(self) -> str:
        return self.variant[0]

    @property
    def scale(self) -> int:
        return self.variant[1]

    @property
    def gpu(self) -> str | None:
        return self.variant[2]


@dataclass
class FakeContainer:
    name: str
    info: remote.Container
    cache: Path
    variant: tuple[str, int, str | None]
    started: float
    idle_since: float | None = None
    stopped: float | None = None


class _Guard:
    """Wraps the upscaler: slows frames, preempts, crashes, cancels, times out."""

    def __init__(self, inner: Any, service: FakeModal, call: FakeCall) -> None:
        self.inner, self.service, self.call = inner, service, call
        self.scale = inner.scale
        self.part: str | None = None
        self.frames: Counter = Counter()  # frames upscaled per part in this run, over its fragments' streams

    def stream(self, frames: Iterable[Any], *, batch: int | None = None) -> Iterator[Any]:
        svc, part = self.service, self.part
        for frame in self.inner.stream(frames, batch=batch):
            self.frames[part] += 1
            n = self.frames[part]
            with svc._lock:
                svc.upscaled[part] += 1
            if self.call.cancelled.is_set():
                raise Cancelled()
            if svc.frame_delay_s:
                time.sleep(svc.frame_delay_s)
            if svc.timeout_s is not None and time.monotonic() - self.call.started > svc.timeout_s:
                raise TimedOut()
            if n >= svc.preempt_after and svc._first_time(part, svc.preempt, "preempted"):
                raise Preempted()
            if n >= svc.preempt_after and svc._first_time(part, svc.crash, "crashed"):
                raise RuntimeError(f"injected crash in {part}")
            if n >= svc.preempt_after and svc._first_time(part, set(svc.fail), "failed"):
                raise svc.fail[part]
            yield frame


class FakeModal:
    """The service side: calls, containers per variant, the model, a log, the gRPC stub."""

    GPU = "FAKE GPU"  # what its containers report as their device when no GPU type is asked

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
        scaledown_window_s: float = 120.0,
        timeout_s: float | None = None,
        retries: int = 0,
        deployed: bool = True,
    ) -> None:
        self.root = Path(root)
        self.cold_start_s, self.frame_delay_s = cold_start_s, frame_delay_s
        self.preempt, self.preempt_after, self.crash = set(preempt), preempt_after, set(crash)
        self.fail = dict(fail or {})
        self.gate, self.publish_s = gate, publish_s
        self.scaledown_window_s, self.timeout_s, self.retries = scaledown_window_s, timeout_s, retries
        self.deployed = deployed
        self.calls: dict[str, FakeCall] = {}
        self.log: list[dict[str, Any]] = []
        self.events: list[str] = []  # "preempted seg-0002", "crashed ...", "cancelled fc-..."
        self.containers: list[FakeContainer] = []
        self.transport: deque[BaseException] = deque()  # raised by the next `get`s, one each
        self.spawn_transport: deque[tuple[BaseException, bool]] = deque()  # raised by the next spawns
        self.get_gate: threading.Event | None = None  # while set to an unset event, `get` waits
        self.gets = 0  # how many `get`s reached the server
        self.upscaled: Counter = Counter()  # frames upscaled per part, over all runs
        self._upscalers: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._names = itertools.count(1)
        self._done_once: set[tuple[str, str]] = set()
        self.install()

    # -- Modal's objects ---------------------------------------------------------

    def client(self) -> RealModalClient:
        """A `RealModalClient` on this service; a new one stands for a new client process.

        `client.spawned` lists the calls it spawned (not warm-ups).
        """
        spawned: list[str] = []
        namespace = SimpleNamespace(Cls=_ClsFactory(self, spawned), FunctionCall=modal.FunctionCall, exception=mx)
        client = RealModalClient(modal=namespace)
        client.spawned = spawned  # type: ignore[attr-defined]
        return client

    def install(self) -> None:
        """Make this service the one modal's own `FunctionCall` talks to (its env client's stub)."""
        client = _Client("https://fake-modal.invalid", api_pb2.CLIENT_TYPE_CLIENT, ("ak-fake", "as-fake"))
        client._control_plane_stub = _Stub(self)
        _Client._set_env_client(client)

    @staticmethod
    def uninstall() -> None:
        _Client._set_env_client(None)

    # -- calls ------------------------------------------------------------------

    def spawn(self, task_dicts, storage_url, endpoint_url, *, variant, warm_up=False) -> str:  # noqa: ANN001
        if not self.deployed:
            raise mx.NotFoundError("Lookup failed for Cls 'Upscaler' from the 'clipexport' app")
        failure, started = None, False
        if not warm_up:
            with self._lock:
                failure, started = self.spawn_transport.popleft() if self.spawn_transport else (None, False)
        if failure is not None and not started:
            raise failure
        call = FakeCall(f"fc-{next(self._ids):04d}", list(task_dicts), storage_url, endpoint_url, variant,
                        warm_up=warm_up)
        call.thread = threading.Thread(target=self._serve, args=(call,), name=call.id, daemon=True)
        with self._lock:
            self.calls[call.id] = call
        call.thread.start()
        if failure is not None:
            raise failure
        return call.id

    def outputs(self, call_id: str) -> api_pb2.FunctionGetOutputsResponse:
        """What the server answers `FunctionGetOutputs` for a call."""
        call = self.calls.get(call_id)
        if call is None:
            raise mx.NotFoundError(f"Function call {call_id} not found")
        if call.expired:
            return api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=0)
        if not call.finished.is_set() or call.output is None:
            return api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=1)
        item = api_pb2.FunctionGetOutputsItem(result=call.output, data_format=api_pb2.DATA_FORMAT_PICKLE)
        return api_pb2.FunctionGetOutputsResponse(outputs=[item], num_unfinished_inputs=0)

    def cancel(self, call_id: str, terminate_containers: bool) -> None:
        call = self.calls.get(call_id)
        if call is None:
            raise mx.NotFoundError(f"Function call {call_id} not found")
        call.terminate_containers = terminate_containers
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

    def _warm(self, variant: tuple[str, int, str | None]) -> FakeContainer | None:
        """An idle container of this variant, if one has not scaled down yet."""
        now = time.monotonic()
        with self._lock:
            for ctr in self.containers:
                if ctr.stopped is None and ctr.idle_since is not None and now - ctr.idle_since > self.scaledown_window_s:
                    ctr.stopped = ctr.idle_since + self.scaledown_window_s
            for ctr in self.containers:
                if ctr.variant == variant and ctr.stopped is None and ctr.idle_since is not None:
                    ctr.idle_since = None
                    return ctr
        return None

    def _container(self, call: FakeCall) -> FakeContainer | None:
        found = self._warm(call.variant)
        if found is not None:
            return found
        started = time.monotonic()
        if call.cancelled.wait(self.cold_start_s):
            return None
        self._upscaler(call.model, call.scale)
        name = f"ta-fake{next(self._names):03d}"
        info = remote.Container.loaded(time.monotonic() - started, id=name, gpu=call.gpu or self.GPU)
        ctr = FakeContainer(name, info, self.root / name, call.variant, started)
        with self._lock:
            self.containers.append(ctr)
        return ctr

    def _release(self, ctr: FakeContainer, *, terminate: bool) -> None:
        with self._lock:
            if terminate:
                ctr.stopped = time.monotonic()
            else:
                ctr.idle_since = time.monotonic()

    def _upscaler(self, model: str, scale: int) -> Any:
        with self._lock:
            found = self._upscalers.get((model, scale))
            if found is None:
                from clipexport.upscale import load_upscaler

                found = self._upscalers[(model, scale)] = load_upscaler(model, scale=scale, device="cpu")
            return found

    def _serve(self, call: FakeCall) -> None:
        tries = 0
        while True:
            status, value = self._run_once(call)
            if status in ("failure", "timeout") and tries < self.retries:
                tries += 1  # Modal's Retries: the same call id, a fresh time limit
                continue
            break
        call.status = status
        if status == "success":
            call.result = value
            call.output = Status(status=Status.GENERIC_STATUS_SUCCESS, data=serialize(value))
        elif status == "failure":
            call.error = value
            call.output = Status(status=Status.GENERIC_STATUS_FAILURE, data=serialize(value), exception=repr(value))
        elif status == "timeout":
            call.output = Status(status=Status.GENERIC_STATUS_TIMEOUT,
                                 exception=f"Function call timed out after {self.timeout_s}s")
        else:  # a cancelled input: no data, no message
            call.output = Status(status=Status.GENERIC_STATUS_TERMINATED)
        call.finished.set()

    def _run_once(self, call: FakeCall) -> tuple[str, Any]:
        """One try of a call, through preemptions: (status, result or exception)."""
        container = None
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
                call.started = time.monotonic()
                if call.warm_up:
                    cold, load_s = container.info.take_cold()
                    result: Any = {"container": container.name, "cold": cold, "load_s": load_s, "call": call.id}
                    break
                guard = _Guard(self._upscaler(call.model, call.scale), self, call)
                try:
                    result = remote.run_remote(
                        call.task_dicts, call.storage_url, call.endpoint_url, guard, container.info,
                        cache=container.cache, interval=self.publish_s, call_id=call.id,
                        observer=lambda event, guard=guard, c=container: self._observe(call, c, guard, event),
                    )
                except Preempted:
                    self._release(container, terminate=True)  # the container is gone
                    container = None
                    continue  # Modal restarts the input on a fresh one
                break
            self._release(container, terminate=False)
            return "success", result
        except Cancelled:
            with self._lock:
                self.events.append(f"cancelled {call.id}")
            if container is not None:
                self._release(container, terminate=call.terminate_containers)
            return "terminated", None
        except TimedOut:
            self._release(container, terminate=True)
            return "timeout", None
        except Exception as exc:  # what the body raised: pickled back to the client as it is
            if container is not None:
                self._release(container, terminate=False)
            return "failure", exc

    def _observe(self, call: FakeCall, container: FakeContainer, guard: _Guard, event: dict[str, Any]) -> None:
        if event.get("type") == "phase_start" and event.get("phase") == "upscale":
            guard.part = event.get("part")
        if event.get("type") in ("phase_start", "phase_end"):
            with self._lock:
                self.log.append({"call": call.id, "container": container.name, "type": event["type"],
                                 "phase": event.get("phase"), "part": event.get("part"),
                                 "attempt": event.get("attempt")})


class _Stub:
    """The gRPC stub modal's `FunctionCall` talks to: the two requests it sends for `get` and `cancel`."""

    def __init__(self, service: FakeModal) -> None:
        self.service = service

    async def FunctionGetOutputs(self, request: Any, **_: Any) -> api_pb2.FunctionGetOutputsResponse:  # noqa: N802
        svc = self.service
        svc.gets += 1
        while svc.get_gate is not None and not svc.get_gate.is_set():
            await asyncio.sleep(0.01)  # a server that does not answer
        if svc.transport:
            raise svc.transport.popleft()
        return svc.outputs(request.function_call_id)

    async def FunctionCallCancel(self, request: Any, **_: Any) -> None:  # noqa: N802
        self.service.cancel(request.function_call_id, request.terminate_containers)


class _ClsFactory:
    """`modal.Cls` as the client sees it: `from_name` only."""

    def __init__(self, service: FakeModal, spawned: list[str]) -> None:
        self.service, self.spawned = service, spawned

    def from_name(self, app_name: str, name: str, *, environment_name: str | None = None) -> _Cls:
        return _Cls(self, gpu=None)


class _Cls:
    def __init__(self, factory: _ClsFactory, gpu: str | None) -> None:
        self.factory, self.gpu = factory, gpu

    def with_options(self, *, gpu: str | None = None) -> _Cls:
        return _Cls(self.factory, gpu=gpu or self.gpu)

    def __call__(self, *, model: str, scale: int) -> SimpleNamespace:
        variant = (model, scale, self.gpu)
        return SimpleNamespace(run=_Method(self.factory, variant, warm_up=False),
                               warm_up=_Method(self.factory, variant, warm_up=True))


class _Method:
    def __init__(self, factory: _ClsFactory, variant: tuple[str, int, str | None], *, warm_up: bool) -> None:
        self.factory, self.variant, self.warm_up = factory, variant, warm_up

    def spawn(self, task_dicts: list[dict[str, Any]] | None = None, storage_url: str = "",
              endpoint_url: str | None = None) -> SimpleNamespace:
        call_id = self.factory.service.spawn(task_dicts or [], storage_url, endpoint_url, variant=self.variant,
                                             warm_up=self.warm_up)
        if not self.warm_up:
            self.factory.spawned.append(call_id)
        return SimpleNamespace(object_id=call_id)


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
             storage: Any = None, clip: Path | None = None) -> Job:
    """A 64x36 clip (or `clip`) cut into segments, uploaded (to a file:// store by default), tasks ready."""
    from clipexport.jobs import JobSpec, JobStore
    from clipexport.media import plan_clips, plan_segments, probe
    from clipexport.storage import content_key, hash_file, open_storage
    from clipexport.worker import SegmentTask, segment_key
    from tests.clips import make_clip

    clip = clip or make_clip(tmp_path / "in.mp4", frames=frames, width=64, height=36, fps=24)
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
                          codec="h264", crf=None, precision="fp16")
        tasks.append(SegmentTask(record.id, seg, plans[seg.clip], key, input_key=input_key))
    return Job(store, record.id, tasks, storage, clip)
