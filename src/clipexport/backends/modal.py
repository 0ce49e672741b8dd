"""The Modal backend: segments run on Modal GPUs as spawned calls.

Modal is reached through `ModalClient`, four calls wide (spawn, warm_up, get,
cancel); `RealModalClient` is that client on the `modal` package, with every
one of Modal's exceptions translated here (the tests fake Modal's own objects
below it: `tests/fake_modal.py`). Generator calls cannot be spawned or
re-attached, and die with their consumer (modal-client #4125), so each
segment is a plain spawned call whose body drives the worker generator in the
container and publishes its progress to the store's progress channel
(`clipexport.remote`). The client:

1. records every call id in the job store (`call:<seg-name>` -> {"id",
   "attempt", "lane"}) before it shows anything about the call;
2. follows progress through the channel and completion through `get`, both
   off the follow loop: Modal is asked on worker threads (`_Net`), so the
   display and Ctrl-C never wait on the network;
3. on `resume`, re-attaches to the recorded calls instead of spawning again:
   a finished call whose segment is stored is done; a failed or expired call
   whose segment is not stored is spawned again as attempt + 1;
4. on stop, returns without cancelling: the calls go on, `resume` finds them.

At most `parallel` calls run at once; each runs in a *lane* (`ctr-01`, ...),
which is what the progress contract calls a container: the queue phase has
one part per lane, from its first spawn to its first progress, and segment
events carry the lane as `worker`.

What `get` can say (docs/modal.md has the source lines):

- `CallRunning`: Modal's bare builtin `TimeoutError()`; a `TimeoutError` with
  arguments came from inside a container and is a failure;
- `CallFailed` (`CallTimedOut`, `CallCancelled`): the call raised, crashed,
  ran past its limit or was cancelled; a crash is spawned once more, a
  timeout is not (it would likely time out again, at full price);
- `CallExpired`: Modal no longer keeps the output (7 days) or the call;
- `ModalBusy`: a transport error (ServiceError, InternalError,
  ResourceExhaustedError, ClientClosed, a retry deadline): it says nothing of
  the call, so it is asked again later, with backoff, and never respawned;
  past `busy_cap_s` the run stops resumably (exit 75);
- `ModalUnreachable`: only modal's own `ConnectionError`; the run stops
  resumably at once.

A spawn that fails on a transport error (`ModalBusy`) is asked again, with
the same backoff and cap as `get`; any other failed spawn stops the run
(resumably unless Modal refused it). Either way the call may exist all the
same, and is then a *stranger*: a snapshot naming a call this job never
recorded is how this run or the next finds it, and cancels it.

There is one retry layer, this one: `modal_app.py` sets no `retries=`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from clipexport import cost
from clipexport.backends.base import EmitFn
from clipexport.backends.offloop import Asker, Backoff
from clipexport.errors import BackendError, ClipexportError, Interrupted, UsageError
from clipexport.facts import JobFacts
from clipexport.jobs import JobStore
from clipexport.remote import channel_prefix, task_to_dict
from clipexport.storage import ProgressChannel, Storage
from clipexport.worker import SegmentTask

logger = logging.getLogger("clipexport.backends.modal")

APP_NAME = "clipexport"
CLASS_NAME = "Upscaler"
NO_TOKEN = "no Modal token: run `modal token new` or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
NOT_DEPLOYED = f"app {APP_NAME} is not deployed: run `modal deploy modal_app.py`"
NO_MODAL = "--backend modal needs the modal package: pip install 'clipexport[modal]'"

PHASES = ("upscale", "encode")
CHECK_S = 5.0  # a running call's `get` is asked at most this often
FINAL_CHECK_S = 1.0  # ... and at most this often once its channel says it finished
MAX_RESPAWNS = 1  # per segment and run: a crashed call is spawned again (Modal retries nothing)
BUSY_MAX_DELAY_S = 60.0  # the longest pause between questions while Modal's transport fails
BUSY_CAP_S = 600.0  # transport failures for this long stop the run, resumably
NET_DEADLINE_S = 90.0  # a question unanswered this long counts as a transport failure
WARM_ANSWER_S = 2.0  # at the start of a run, how long the warm-ups' answers may take before anything shows
STOP_GRACE_S = 5.0  # on a failure that ends the job, how long cancelling the other calls may take


class CallRunning(Exception):  # noqa: N818 - a state, not an error
    """The call has no output yet (Modal's bare builtin `TimeoutError()`)."""


class CallFailed(BackendError):
    """A call raised, crashed, timed out or was cancelled (the job can be resumed)."""


class CallTimedOut(CallFailed):
    """A call ran past its time limit: not spawned again in this run."""


class CallCancelled(CallFailed):
    """A call was cancelled (Modal answers `get` with an empty `RemoteError`)."""


class CallExpired(BackendError):
    """Modal no longer keeps the call's output (7 days), or does not know the call."""


class ModalBusy(BackendError):
    """Modal's transport failed (after its own retries): ask again later; the call may still run."""


class ModalUnreachable(BackendError):
    """Modal's own `ConnectionError`: this machine cannot reach Modal."""


class ModalClient(Protocol):
    """What the backend needs of Modal; `RealModalClient` is Modal itself."""

    def spawn(
        self,
        task_dicts: list[dict[str, Any]],
        storage_url: str,
        endpoint_url: str | None,
        *,
        model: str,
        scale: int,
        gpu: str | None,
    ) -> str:
        """Spawn one call running `task_dicts` in order; return its id."""
        ...

    def warm_up(self, *, model: str, scale: int, gpu: str | None) -> str:
        """Spawn a call that only starts a container (loads the model); return its id."""
        ...

    def get(self, call_id: str, timeout: float) -> Any:
        """The call's result; raises CallRunning, CallFailed, CallExpired, ModalBusy, ModalUnreachable."""
        ...

    def cancel(self, call_id: str) -> None:
        """Cancel the call and stop the containers running it."""
        ...


# -- Modal itself -------------------------------------------------------------


def has_modal_token() -> bool:
    """Whether Modal has credentials to use, read from its config: no network."""
    try:
        from modal.config import config
    except ImportError:
        raise BackendError(NO_MODAL, resumable=False) from None
    except Exception as exc:  # modal.exception.InvalidError: an unreadable ~/.modal.toml
        raise BackendError(f"Modal's configuration is unreadable: {_one_line(str(exc))}", resumable=False) from None
    if config.get("token_id") and config.get("token_secret"):
        return True
    return bool(config.get("oauth_refresh_token") and config.get("oauth_client_id"))


def check_storage(storage_url: str | None) -> None:
    """A Modal container must reach the store: an S3/R2 bucket, not a local directory."""
    if not storage_url or storage_url.split(":", 1)[0].lower() not in ("s3", "r2"):
        shown = storage_url or "the default local store"
        raise UsageError(
            f"--backend modal needs --storage r2://bucket/prefix or s3://bucket/prefix "
            f"(a Modal container cannot read {shown})"
        )


class RealModalClient:
    """`ModalClient` on the deployed app `clipexport` (see `modal_app.py`).

    Constructing it checks, without a network round trip, that modal is
    installed and has a token, so a missing token fails in milliseconds
    instead of a minute-long hang. `modal` replaces the package (the tests'
    fake of its objects); no token is checked then.
    """

    def __init__(self, *, environment: str | None = None, app_name: str = APP_NAME, modal: Any = None) -> None:
        if modal is None:
            if not has_modal_token():
                raise BackendError(NO_TOKEN, resumable=False)
            import modal
        self._modal = modal
        self._environment = environment
        self._app_name = app_name
        self._classes: dict[tuple[str, int, str | None], Any] = {}

    def _instance(self, model: str, scale: int, gpu: str | None) -> Any:
        """One parameterized object per variant: Modal keeps one container pool per variant."""
        key = (model, scale, gpu)
        obj = self._classes.get(key)
        if obj is None:
            check_gpu(gpu)
            cls = self._modal.Cls.from_name(self._app_name, CLASS_NAME, environment_name=self._environment)
            if gpu:
                cls = cls.with_options(gpu=gpu)
            obj = self._classes[key] = cls(model=model, scale=scale)
        return obj

    def spawn(self, task_dicts, storage_url, endpoint_url, *, model, scale, gpu):  # noqa: ANN001, ANN201
        with _translated(deploying=True):
            call = self._instance(model, scale, gpu).run.spawn(list(task_dicts), storage_url, endpoint_url)
            return call.object_id

    def warm_up(self, *, model, scale, gpu):  # noqa: ANN001, ANN201
        with _translated(deploying=True):
            return self._instance(model, scale, gpu).warm_up.spawn().object_id

    def get(self, call_id: str, timeout: float) -> Any:
        with _translated(deploying=False):
            return self._modal.FunctionCall.from_id(call_id).get(timeout=timeout)

    def cancel(self, call_id: str) -> None:
        with _translated(deploying=False):
            self._modal.FunctionCall.from_id(call_id).cancel(terminate_containers=True)


@contextmanager
def _translated(*, deploying: bool) -> Iterator[None]:
    """Modal's exceptions (and a container's, re-raised by `get`) become clipexport's."""
    try:
        yield
    except TimeoutError as exc:  # the builtin; modal's own TimeoutError is no subclass of it
        if not exc.args:
            raise CallRunning() from None
        raise CallFailed(f"TimeoutError: {_one_line(str(exc))}") from exc
    except ClipexportError as exc:
        if deploying:  # ours (a bad --gpu)
            raise
        raise CallFailed(str(exc), resumable=exc.resumable) from exc  # raised in a container, re-raised by `get`
    except Exception as exc:
        raise translate_error(exc, deploying=deploying) from exc


def _transport_errors(mx: Any) -> tuple[type[BaseException], ...]:
    """Modal's exceptions that say the request failed, not the call."""
    kinds: list[type[BaseException]] = [mx.ServiceError, mx.InternalError, mx.ResourceExhaustedError, mx.ClientClosed]
    try:
        from modal._utils.grpc_utils import RetryTimeoutError  # its retry loop's total deadline

        kinds.append(RetryTimeoutError)
    except ImportError:
        pass
    return tuple(kinds)


def translate_error(exc: BaseException, *, deploying: bool) -> BackendError:
    """The BackendError a Modal (or remote) exception stands for."""
    from modal import exception as mx

    message = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, mx.AuthError):
        return BackendError(f"Modal rejected the token ({message}): run `modal token new`", resumable=False)
    if isinstance(exc, mx.NotFoundError):
        if deploying:
            return BackendError(NOT_DEPLOYED, resumable=False)
        return CallExpired(f"Modal does not know the call ({message})")
    if isinstance(exc, mx.OutputExpiredError):
        return CallExpired("the call's output has expired (Modal keeps it 7 days)")
    if isinstance(exc, mx.FunctionTimeoutError):
        return CallTimedOut(f"the call ran past its time limit ({message})")
    if isinstance(exc, mx.ConnectionError):
        return ModalUnreachable(f"cannot reach Modal: {message}", resumable=True)
    if isinstance(exc, _transport_errors(mx)):
        return ModalBusy(f"Modal did not answer ({type(exc).__name__}: {message})", resumable=True)
    if isinstance(exc, mx.RemoteError) and type(exc) is mx.RemoteError and not str(exc).strip():
        return CallCancelled("the call was cancelled")
    if isinstance(exc, mx.InvalidError) and deploying:
        return BackendError(f"Modal refused the call: {message}", resumable=False)
    return CallFailed(f"{type(exc).__name__}: {message}")


def _one_line(text: str) -> str:
    """A remote traceback's last line (the exception), else the first line, clipped."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line[:300]


def preflight(storage_url: str | None, *, weights: str | None = None, gpu: str | None = None) -> RealModalClient:
    """Everything that can be checked before a job exists: the flags, then the token."""
    check_storage(storage_url)
    if weights is not None:
        raise UsageError("--weights is not supported with --backend modal (the image carries the official weights)")
    check_gpu(gpu)
    return RealModalClient()


def check_gpu(gpu: str | None) -> None:
    """`--gpu` names one GPU type (a fallback list is set when deploying)."""
    if gpu is not None and (not gpu.strip() or "," in gpu or any(c.isspace() for c in gpu)):
        raise UsageError(
            f"--gpu takes one GPU type such as L4, A10G, A100 or H100, not {gpu!r} "
            "(a fallback list is set at deploy time: CLIPEXPORT_MODAL_GPUS)"
        )


def recorded_calls(store: JobStore, job_id: str) -> set[str]:
    """Every call id a job recorded: segments (current and past attempts) and warm-ups."""
    return JobFacts(store, job_id).remote_call_ids()


def cancel_calls(client: ModalClient, store: JobStore, job_id: str) -> int:
    """Cancel every call a job recorded (segments and warm-ups); return how many were asked."""
    ids = recorded_calls(store, job_id)
    for call_id in sorted(ids):
        try:
            client.cancel(call_id)
        except (CallExpired, CallFailed):
            continue  # finished or forgotten: nothing left to stop
        except ModalBusy as exc:
            logger.warning("could not cancel %s: %s", call_id, exc)
    return len(ids)


# -- the backend --------------------------------------------------------------


@dataclass
class _Call:
    id: str
    tasks: list[SegmentTask]
    attempt: int
    lane: _Lane
    spawned: float  # on the backend's clock
    started: bool = False
    checked: float = -math.inf
    waited: float = 0.0  # seconds it had been waiting when this run attached to it


@dataclass
class _Lane:
    name: str
    call: _Call | None = None
    queue_since: float | None = None  # its queue part is open since then
    used: bool = False  # its queue part was opened in this run


@dataclass
class _PartView:
    """What the client has shown of one segment, to turn snapshots into events."""

    name: str
    attempt: int = 0
    started: set[str] = field(default_factory=set)
    done: dict[str, int] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    state: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return "encode" in self.ended

    def apply(self, snap: dict[str, Any], lane: str | None) -> list[dict[str, Any]]:
        """Events for what `snap` shows that was not shown yet (none for a stale attempt)."""
        attempt = snap.get("attempt")
        attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt > 0 else 1
        if attempt < self.attempt:
            return []
        if attempt > self.attempt:
            self.attempt, self.started, self.done, self.ended = attempt, set(), {}, set()
        self.state, self.error = snap.get("state"), snap.get("error")
        stored = self.state == "stored"
        extra = {"skipped": True} if snap.get("skipped") else {}
        phases = snap.get("phases") or {}
        out: list[dict[str, Any]] = []
        for phase in PHASES:
            p = phases.get(phase)
            if not isinstance(p, dict) or phase in self.ended:
                continue
            common = {"phase": phase, "part": self.name, "unit": "frames", "total": p.get("total"), "attempt": attempt}
            if phase not in self.started:
                # Where the attempt is: the frames an earlier one kept, as the local backend says.
                start = {"type": "phase_start", **common, "done": int(p.get("done") or 0)}
                if lane:
                    start["worker"] = lane
                for extra_field in ("container", "gpu"):
                    if snap.get(extra_field):
                        start[extra_field] = snap[extra_field]
                out.append(start)
                self.started.add(phase)
            done = int(p.get("done") or 0)
            ends = bool(p.get("ended")) and (phase == "upscale" or stored)
            if done > self.done.get(phase, 0) or (ends and phase not in self.done):
                out.append({"type": "progress", **common, "done": done, **extra})
                self.done[phase] = done
            if ends:
                end = {"type": "phase_end", **common, "done": done, "elapsed": p.get("elapsed"), **extra}
                if phase == "encode":
                    end["bytes"] = p.get("bytes")
                    end["key"] = snap.get("key")
                    if p.get("damaged"):  # output frames of the clip that repeat an undecodable one
                        end["damaged"] = p["damaged"]
                out.append(end)
                self.ended.add(phase)
        return out


def _finished_snapshot(task: SegmentTask, attempt: int, *, size: int | None, elapsed: float | None,
                       skipped: bool, damaged: Any = None) -> dict[str, Any]:
    """A snapshot of a stored segment, for when the channel did not say it."""
    total = task.segment.count
    phases = {p: {"done": total, "total": total, "ended": True, "elapsed": elapsed} for p in PHASES}
    phases["encode"]["bytes"] = size
    if isinstance(damaged, list) and damaged:
        phases["encode"]["damaged"] = damaged
    return {"part": task.segment.name, "attempt": attempt, "state": "stored", "skipped": skipped,
            "key": task.key, "phases": phases}


class ModalBackend:
    """Runs segment tasks as spawned Modal calls and follows them (see the module doc)."""

    name = "modal"

    def __init__(
        self,
        client: ModalClient,
        storage: Storage,
        *,
        store: JobStore,
        job_id: str,
        model: str,
        scale: int,
        parallel: int = 1,
        gpu: str | None = None,
        endpoint_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 1.0,
        check_s: float = CHECK_S,
        max_respawns: int = MAX_RESPAWNS,
        busy_cap_s: float = BUSY_CAP_S,
        net_deadline_s: float = NET_DEADLINE_S,
        prices: dict[str, float] | None = None,
    ) -> None:
        if parallel < 1:
            raise UsageError(f"--parallel must be at least 1, not {parallel}")
        self.client, self.storage = client, storage
        self.store, self.job = store, job_id
        self.facts = JobFacts(store, job_id)
        self.model, self.scale, self.gpu = model, scale, gpu
        self.parallel = parallel
        settings = getattr(storage, "settings", None)
        self.endpoint_url = endpoint_url or getattr(settings, "endpoint_url", None)
        self._clock, self.poll_s, self.check_s, self.max_respawns = clock, poll_s, check_s, max_respawns
        self.busy_cap_s, self.net_deadline_s = busy_cap_s, net_deadline_s
        self.prices = prices
        self.spans: dict[str, tuple[float, float]] = {}  # container -> (started, last worked), Unix times
        self._device: str | None = None  # the GPU a container reported
        self._warmups: list[str] = []
        self._warm_known = False

    # -- warm-up ---------------------------------------------------------------

    def warm_up(self, count: int | None = None) -> None:
        """Start `count` containers (default `parallel`) now, e.g. while inputs upload.

        Returns at once; the calls only load the model. An app that is not
        deployed, or a token Modal rejects, fails here, before the upload.
        """
        for i in range(max(1, count or self.parallel)):
            call_id = self.client.warm_up(model=self.model, scale=self.scale, gpu=self.gpu)
            self.facts.set_warmup(i, call_id)
            self._warmups.append(call_id)

    # -- run -------------------------------------------------------------------

    def run(self, tasks: Sequence[SegmentTask], emit: EmitFn, stop: threading.Event) -> None:
        if not tasks:
            return
        missing = [t.segment.name for t in tasks if not t.input_key]
        if missing:
            raise BackendError(f"{missing[0]}: no input_key; upload the inputs before running on Modal",
                               resumable=False)
        _Run(self, list(tasks), emit, stop).run()

    def cancel(self) -> int:
        """Cancel every call this job recorded."""
        return cancel_calls(self.client, self.store, self.job)

    def bill(self) -> dict[str, Any] | None:
        """What the containers seen in this run cost (`cost.Cost.to_json`), None if none was seen."""
        if not self.spans:
            return None
        rate = cost.rate(self.gpu or cost.gpu_type(self._device), self.prices)
        return cost.billed(self.spans, rate, cost.scaledown_s()).to_json()

    def _saw(self, snap: dict[str, Any]) -> None:
        """A container's start and its latest work, from a snapshot (what Modal bills, less the idle tail)."""
        started, t, ctr = snap.get("container_started"), snap.get("t"), snap.get("container")
        if not (isinstance(started, (int, float)) and isinstance(t, (int, float)) and isinstance(ctr, str)):
            return
        old = self.spans.get(ctr, (started, t))
        self.spans[ctr] = (min(old[0], started), max(old[1], t))
        self._device = self._device or snap.get("gpu")


@dataclass
class _Spawning:
    """A spawn asked of Modal, not answered yet; the lane is held for it."""

    tasks: list[SegmentTask]
    attempt: int
    lane: _Lane
    asked: float  # on the backend's clock


class _Run:
    """One `ModalBackend.run`: lanes, calls, part views and the follow loop.

    The loop never calls Modal itself: spawns and `get`s go to `self.asker`
    (worker threads) and their answers are read on a later pass.
    """

    def __init__(self, backend: ModalBackend, tasks: list[SegmentTask], emit: EmitFn, stop: threading.Event):
        self.b, self.emit, self.stop = backend, emit, stop
        self.tasks = {t.segment.name: t for t in tasks}
        self.views = {name: _PartView(name) for name in self.tasks}
        self.channel = ProgressChannel(backend.storage, channel_prefix(backend.job))
        self.calls: dict[str, _Call] = {}  # active calls by id
        self.call_of: dict[str, _Call] = {}  # active call by part
        self.lanes: list[_Lane] = []
        self.queued: deque[tuple[SegmentTask, int]] = deque()  # (task, attempt) to spawn
        self.spawning: dict[int, _Spawning] = {}  # by ask key
        self._spawn_keys = iter(range(1, 1 << 62))
        self.respawns: dict[str, int] = {}
        self.queue_since: float | None = None  # the whole queue phase is open since then
        self.loaded: list[float] = []  # load times of the lanes that ended their queue cold
        self.asker = Asker(backend._clock, name="modal")
        self.backoff = Backoff(backend.check_s, BUSY_MAX_DELAY_S, backend.busy_cap_s)
        self.known: set[str] = recorded_calls(backend.store, backend.job) | set(backend._warmups)
        self.strangers: set[str] = set()  # unknown calls found running and cancelled
        self._warm_checked: dict[str, float] = {}
        self.deferred: dict[str, dict[str, Any]] = {}  # snapshots of parts whose spawn is in flight

    @property
    def now(self) -> float:
        return self.b._clock()

    # -- set-up ----------------------------------------------------------------

    def run(self) -> None:
        self._reattach()
        self._follow_channel()
        self._first_warm_answers()
        for call in self.calls.values():  # re-attached and still waiting: the wait goes on
            if not call.started:
                self._open_queue(call.lane, waited=call.waited)
        while True:
            if self.stop.is_set():
                self._stopped()
            self._collect()
            self._follow_channel()
            self._ask()
            self._fill_lanes()
            if not self.calls and not self.queued and not self.spawning:
                self._close_queue()
                return
            self._heartbeat()
            if self.stop.wait(self.b.poll_s):
                self._stopped()

    def _stopped(self) -> None:
        running = len(self.calls) + len(self.spawning)
        raise Interrupted(
            f"stopped; {running} Modal call(s) keep running: `clipexport resume {self.b.job}` re-attaches"
            if running else "stopped before all segments were done"
        )

    def _reattach(self) -> None:
        """Follow the calls a previous client recorded; queue the rest."""
        recorded: dict[str, dict[str, Any]] = {}
        for name, value in self.b.facts.calls().items():
            if name in self.tasks:
                recorded[name] = value
        by_id: dict[str, list[str]] = {}
        for name, value in sorted(recorded.items(), key=lambda item: -float(item[1].get("t") or 0)):
            by_id.setdefault(value["id"], []).append(name)  # the newest call of a lane is the one running there
        self._number_lanes()
        for call_id, names in by_id.items():
            first = recorded[names[0]]
            lane = self._recorded_lane(first.get("lane"))
            spawned_t = first.get("t")
            waited = max(0.0, time.time() - spawned_t) if isinstance(spawned_t, (int, float)) else 0.0
            call = _Call(call_id, [self.tasks[n] for n in names], int(first.get("attempt") or 1), lane,
                         self.now - waited, waited=waited)
            self._attach(call)
        for name, task in self.tasks.items():
            if name in self.call_of:
                continue
            found = self.b.storage.stat(task.key)
            if found is not None:  # stored by a call the job store no longer knows of
                self._show(name, _finished_snapshot(task, task.attempt, size=found.size, elapsed=0.0, skipped=True))
                continue
            self.queued.append((task, task.attempt))

    def _number_lanes(self) -> None:
        self._lane_count = self.b.facts.lanes()

    def _recorded_lane(self, name: Any) -> _Lane:
        """The lane a recorded call ran in (its older, finished calls share it)."""
        if not isinstance(name, str) or not name:
            return self._lane()
        for lane in self.lanes:
            if lane.name == name:
                return lane
        lane = _Lane(name)
        self.lanes.append(lane)
        return lane

    def _lane(self) -> _Lane:
        """A new lane, numbered across runs."""
        self._lane_count += 1
        self.b.facts.set_lanes(self._lane_count)
        lane = _Lane(f"ctr-{self._lane_count:02d}")
        self.lanes.append(lane)
        return lane

    def _attach(self, call: _Call) -> None:
        if call.lane.call is None:
            call.lane.call = call
        self.calls[call.id] = call
        self.known.add(call.id)
        for task in call.tasks:
            self.call_of[task.segment.name] = call

    # -- spawning --------------------------------------------------------------

    def _fill_lanes(self) -> None:
        if not self.backoff.may_ask(self.now):
            return  # Modal's transport is failing: a spawn waits with the other questions
        while self.queued and len(self.calls) + len(self.spawning) < self.b.parallel:
            task, attempt = self.queued.popleft()
            held = {s.lane.name for s in self.spawning.values()}
            free = [lane for lane in self.lanes if lane.call is None and lane.name not in held]
            lane = free[0] if free else self._lane()
            self._spawn([task], attempt, lane)

    def _spawn(self, tasks: list[SegmentTask], attempt: int, lane: _Lane) -> None:
        """Ask Modal for a call; the asking thread records it durably the moment its id is known."""
        dicts = [task_to_dict(dataclasses.replace(t, attempt=attempt)) for t in tasks]
        b = self.b

        def spawn_and_record() -> str:
            call_id = b.client.spawn(dicts, b.storage.url, b.endpoint_url, model=b.model, scale=b.scale, gpu=b.gpu)
            record = {"id": call_id, "attempt": attempt, "lane": lane.name, "t": round(time.time(), 3)}
            for task in tasks:  # durable before anything is shown, even if this client dies now
                previous = b.facts.call(task.segment.name) or {}
                past = [*previous.get("past", []), previous["id"]] if previous.get("id") else []
                b.facts.set_call(task.segment.name, {**record, "past": past})
            return call_id

        key = next(self._spawn_keys)
        self.spawning[key] = _Spawning(tasks, attempt, lane, self.now)
        self.asker.ask(("spawn", key), spawn_and_record)

    def _spawn_answered(self, key: int, future: Future[str]) -> None:
        """A spawn's answer: a call to follow; a transport error queues its tasks again; anything else stops the run.

        A failed spawn may have started its call all the same: if it runs, its
        snapshots name a call this job never recorded, which is then cancelled.
        """
        try:
            call_id = future.result()
        except ModalBusy as exc:
            spawning = self.spawning.pop(key)
            self.queued.extendleft((task, spawning.attempt) for task in reversed(spawning.tasks))
            self._busy(exc)
            return
        self.backoff.succeeded()
        self._spawned(key, call_id)

    def _spawned(self, key: int, call_id: str) -> None:
        spawning = self.spawning.pop(key)
        call = _Call(call_id, spawning.tasks, spawning.attempt, spawning.lane, spawning.asked)
        self._attach(call)
        self._open_queue(spawning.lane, waited=self.now - spawning.asked)  # the wait began with the asking
        for task in spawning.tasks:
            snap = self.deferred.pop(task.segment.name, None)
            if snap is not None:
                self._on_snapshot(task.segment.name, snap)

    # -- asking Modal ------------------------------------------------------------

    def _ask(self) -> None:
        """Ask `get` of the calls that are due, unless Modal's transport is backing off."""
        now = self.now
        if not self.backoff.may_ask(now):
            return
        if self.asker.oldest_pending_s() > self.b.net_deadline_s:
            self._busy(ModalBusy(f"Modal has not answered for {self.b.net_deadline_s:.0f} s"))
            return
        for call in self.calls.values():
            states = {self.views[t.segment.name].state for t in call.tasks}
            every = min(self.b.check_s, FINAL_CHECK_S) if states <= {"stored", "failed"} else self.b.check_s
            if now - call.checked >= every and not self.asker.pending(("get", call.id)):
                call.checked = now
                self.asker.ask(("get", call.id), lambda cid=call.id: self.b.client.get(cid, timeout=0))
        for call_id in self.b._warmups:
            if now - self._warm_checked.get(call_id, -math.inf) >= self.b.check_s:
                self._warm_checked[call_id] = now
                self.asker.ask(("warm", call_id), lambda cid=call_id: self.b.client.get(cid, timeout=0))

    def _first_warm_answers(self) -> None:
        """Ask the warm-ups once, waiting a bounded moment, so the first heartbeat knows what it waits for."""
        asked = [self.asker.ask(("warm", cid), lambda cid=cid: self.b.client.get(cid, timeout=0))
                 for cid in self.b._warmups]
        self._warm_checked.update((cid, self.now) for cid in self.b._warmups)
        wait_futures(asked, timeout=WARM_ANSWER_S)
        for call_id in list(self.b._warmups):
            future = self.asker.answered(("warm", call_id))
            if future is not None:
                self._warm_answered(call_id, future)

    def _collect(self) -> None:
        """Act on the answers that have arrived since the last pass."""
        for key in list(self.spawning):
            future = self.asker.answered(("spawn", key))
            if future is not None:
                self._spawn_answered(key, future)
        for call in list(self.calls.values()):
            future = self.asker.answered(("get", call.id))
            if future is not None:
                self._answered(call, future)
        for call_id in list(self.b._warmups):
            future = self.asker.answered(("warm", call_id))
            if future is not None:
                self._warm_answered(call_id, future)

    def _answered(self, call: _Call, future: Future[Any]) -> None:
        try:
            result = future.result()
        except CallRunning:
            self.backoff.succeeded()
            return
        except ModalBusy as exc:
            self._busy(exc)
            return
        except (CallFailed, CallExpired) as exc:
            self.backoff.succeeded()
            self._lost(call, exc)
            return
        self.backoff.succeeded()
        self._completed(call, result)

    def _busy(self, exc: ModalBusy) -> None:
        """A transport failure: ask again later; past the cap, stop resumably (the calls go on)."""
        if self.backoff.failed(self.now):
            raise ModalBusy(
                f"{exc}; still failing after {self.backoff.failing_s(self.now):.0f} s. "
                f"The calls go on: `clipexport resume {self.b.job}` re-attaches", resumable=True)
        logger.warning("%s; asking again in %.0f s", exc, self.backoff.delay_s)

    def _warm_answered(self, call_id: str, future: Future[Any]) -> None:
        try:
            future.result()
        except CallRunning:
            return
        except ModalBusy as exc:
            self._busy(exc)
            return
        except BackendError as exc:
            logger.info("warm-up call %s failed: %s", call_id, exc)
        else:
            self.b._warm_known = True
        self.b._warmups.remove(call_id)

    # -- the queue phase -------------------------------------------------------

    def _open_queue(self, lane: _Lane, *, waited: float = 0.0) -> None:
        """The lane's first call waits for its container; `waited`: since before this run."""
        if lane.used:
            return
        lane.used, lane.queue_since = True, self.now - waited
        if self.queue_since is None:
            self.queue_since = lane.queue_since
            self.emit({"type": "phase_start", "phase": "queue"})
        self.emit({"type": "phase_start", "phase": "queue", "part": lane.name})

    def _call_started(self, call: _Call, snap: dict[str, Any]) -> None:
        if call.started:
            return
        call.started = True
        lane = call.lane
        if lane.queue_since is None:
            return
        cold = bool(snap.get("cold"))
        if not cold:
            self._warm_known_now()
        self.emit({"type": "phase_end", "phase": "queue", "part": lane.name,
                   "elapsed": round(self.now - lane.queue_since, 3), "detail": "cold start" if cold else "warm"})
        lane.queue_since = None
        load_s = snap.get("load_s")
        if cold and isinstance(load_s, (int, float)):
            # the container reports its model load when its first input starts
            self.emit({"type": "phase_end", "phase": "load_model", "part": lane.name, "elapsed": load_s})
            self.loaded.append(float(load_s))
        if all(ln.queue_since is None for ln in self.lanes):
            self._close_queue()

    def _warm_known_now(self) -> None:
        self.b._warm_known = True

    def _close_queue(self) -> None:
        """The whole queue phase ends when no lane waits, nor will: a lane whose first spawn is in flight will."""
        if self.queue_since is None or any(ln.queue_since is not None for ln in self.lanes):
            return
        if any(not s.lane.used for s in self.spawning.values()):
            return
        self.emit({"type": "phase_end", "phase": "queue", "elapsed": round(self.now - self.queue_since, 3)})
        self.queue_since = None
        if self.loaded:
            self.emit({"type": "phase_end", "phase": "load_model", "elapsed": round(max(self.loaded), 3)})
            self.loaded = []

    def _heartbeat(self) -> None:
        since = [c.spawned for c in self.calls.values() if not c.started]
        since += [s.asked for s in self.spawning.values()]  # a spawn in flight waits too
        if not since:
            return
        detail = "waiting for GPU" if self.b._warm_known else "cold start"
        self.emit({"type": "heartbeat", "phase": "queue", "detail": detail, "waiting": len(since),
                   "elapsed": round(self.now - min(since), 1)})

    # -- following -------------------------------------------------------------

    def _follow_channel(self) -> None:
        try:
            snapshots = self.channel.poll()
        except ClipexportError as exc:  # progress is best effort; completion comes from `get`
            logger.warning("progress channel unreadable: %s", exc)
            return
        spawning = {t.segment.name for s in self.spawning.values() for t in s.tasks}
        for snap in snapshots:
            name = snap.get("part")
            if name in spawning:
                self.deferred[name] = snap  # its call's id is not back yet: shown once it is
            elif name in self.tasks:
                self._on_snapshot(name, snap)

    def _on_snapshot(self, name: str, snap: dict[str, Any]) -> None:
        if self._stranger(snap):
            return
        self.b._saw(snap)
        call = self.call_of.get(name)
        caller = snap.get("call")
        if call is not None and caller and caller != call.id:
            call = None  # an earlier call of ours left this snapshot: nothing about the current one
        attempt = snap.get("attempt") if isinstance(snap.get("attempt"), int) else 1
        if call is not None and attempt >= call.attempt:
            if attempt > call.attempt:  # the container restarted it: a later respawn goes higher
                call.attempt = attempt
                record = self.b.facts.call(name) or {"id": call.id, "lane": call.lane.name}
                self.b.facts.set_call(name, {**record, "attempt": attempt})
            self._call_started(call, snap)
        self._show(name, snap, call.lane.name if call is not None else None)

    def _stranger(self, snap: dict[str, Any]) -> bool:
        """A running call this job never recorded (spawned by a client that died before it could): cancel it."""
        caller = snap.get("call")
        if not isinstance(caller, str) or not caller or caller in self.known:
            return False
        self.known |= recorded_calls(self.b.store, self.b.job)  # a spawn recorded since the last look
        if caller in self.known or self.spawning:
            return False  # ours, or perhaps a spawn whose id is not known yet: judged once none is in flight
        if snap.get("state") == "running" and caller not in self.strangers:
            self.strangers.add(caller)
            logger.warning("%s runs in call %s, which this job never recorded: cancelling it", snap.get("part"), caller)
            self.asker.ask(("cancel", caller), lambda: self.b.client.cancel(caller))
        return True

    def _show(self, name: str, snap: dict[str, Any], lane: str | None = None) -> None:
        for event in self.views[name].apply(snap, lane):
            self.emit(event)

    def _release(self, call: _Call) -> None:
        self.calls.pop(call.id, None)
        if call.lane.call is call:
            call.lane.call = None
        for task in call.tasks:
            if self.call_of.get(task.segment.name) is call:
                del self.call_of[task.segment.name]

    def _completed(self, call: _Call, result: Any) -> None:
        """The call returned: show what the channel missed; raise its error."""
        self._follow_channel()  # the last snapshots, if written after the last poll
        self._call_started(call, {})  # ends its lane's wait if no snapshot did
        self._release(call)
        result = result if isinstance(result, dict) else {}
        done = {}
        for seg in result.get("segments") or []:
            if isinstance(seg, dict) and seg.get("part") in self.tasks:
                done[seg["part"]] = seg
        for task in call.tasks:
            name = task.segment.name
            seg = done.get(name)
            if seg is not None and not self.views[name].finished:
                attempt = max(int(seg.get("attempt") or call.attempt), self.views[name].attempt)
                self._show(name, _finished_snapshot(task, attempt, size=seg.get("bytes"),
                                                     elapsed=seg.get("elapsed"), skipped=bool(seg.get("skipped")),
                                                     damaged=seg.get("damaged")),
                           call.lane.name)
        if result.get("error") and not result.get("resumable", True):
            self._fail(BackendError(str(result["error"]), resumable=False))
        unfinished = [t for t in call.tasks if not self.views[t.segment.name].finished]
        if unfinished:
            why = result.get("error") or f"the call returned without {unfinished[0].segment.name}"
            self._lost(call, CallFailed(str(why)), released=True)

    def _lost(self, call: _Call, exc: BackendError, *, released: bool = False) -> None:
        """A call failed or expired: what is stored is done, the rest runs again."""
        if not released:
            self._release(call)
        for task in call.tasks:
            name = task.segment.name
            view = self.views[name]
            if view.finished:
                continue
            found = self.b.storage.stat(task.key)
            if found is not None:
                self._show(name, _finished_snapshot(task, max(view.attempt, call.attempt), size=found.size,
                                                    elapsed=None, skipped=False), call.lane.name)
                continue
            message = str(exc) if str(exc).startswith(f"{name}: ") else f"{name}: {view.error or exc}"
            if not exc.resumable:
                self._fail(BackendError(message, resumable=False))
            tries = self.respawns.get(name, 0)
            if tries >= self.b.max_respawns or isinstance(exc, (CallTimedOut, CallCancelled)):
                raise BackendError(message, resumable=True)
            self.respawns[name] = tries + 1
            logger.warning("%s; running it again", message)
            self.queued.appendleft((task, max(view.attempt, call.attempt) + 1))

    def _fail(self, exc: BackendError) -> None:
        """The job cannot succeed: cancel the other calls (asked, not awaited) to stop paying for them."""
        asked = [self.asker.ask(("cancel", call.id), lambda cid=call.id: self.b.client.cancel(cid))
                 for call in self.calls.values()]
        wait_futures(asked, timeout=STOP_GRACE_S)  # bounded: a failing run still ends promptly
        raise exc
