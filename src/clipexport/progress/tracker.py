"""The tracker: events in, one `Snapshot` out, for every view.

`Tracker.feed(event)` aggregates; `Tracker.snapshot(now)` asks the estimator
for the remaining time at `now` and turns it into the overall fraction:

    fraction = elapsed / (elapsed + remaining)

which is the time-weighted sum over phases: each phase's share of the bar is
its predicted share of the job's time (what it took so far plus what the
estimator gives it), and within a phase the bar moves with time spent there.
The shares are recomputed at every snapshot as evidence arrives. The shown
fraction is clamped so it never decreases (a correction changes the bar's
speed, not its direction), stays below 1 until `done`, and starts at
`floor` (the last fraction shown before a resume).

The tracker reads no clock and starts no thread: `now` is explicit. Its
methods hold one lock, so a worker thread may feed it while another asks for
a snapshot.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from .estimator import Estimate, Estimator
from .model import TimingModel
from .state import JobState, PhaseState, _num
from .text import EtaWords

MAX_RUNNING_FRACTION = 0.999


@dataclass(frozen=True)
class PhaseRow:
    """One phase as shown: work done in its own unit."""

    phase: str
    unit: str | None
    done: float
    total: float | None
    state: str  # "pending" | "running" | "waiting" | "done"
    rate: float | None  # unit per second while running
    detail: str | None
    skipped: int = 0  # parts served from earlier work (cached segments, uploads already stored)
    parts: int = 0  # parts seen so far

    @property
    def fraction(self) -> float | None:
        if self.state == "done":
            return 1.0
        if self.total is None or self.total <= 0:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)


@dataclass(frozen=True)
class JobInfo:
    """What the job is, for a header and a summary: the plan's facts and, at
    the end, what came out. A field the events do not carry is None."""

    inputs: tuple[str, ...] = ()
    output: str | None = None
    in_size: tuple[int, int] | None = None
    out_size: tuple[int, int] | None = None
    model: str | None = None
    device: str | None = None
    precision: str | None = None
    backend: str | None = None
    frames: int | None = None
    duration_s: float | None = None  # of the output video
    segments: int | None = None
    output_bytes: float | None = None  # once finalized
    cost_usd: float | None = None  # when the terminal event carries it (cloud)
    gpu_s: float | None = None  # container time billed, start to scale-down (cloud)


@dataclass(frozen=True)
class Snapshot:
    """Everything a view draws, at one instant."""

    job: str | None
    state: str  # "running" | "done" | "error" | "cancelled"
    fraction: float  # shown fraction: never decreases, 1.0 only at done
    elapsed: float
    remaining_s: float | None
    eta_text: str
    phases: tuple[PhaseRow, ...]  # in plan order
    message: str | None = None  # the error message, or the output path when done
    info: JobInfo = JobInfo()
    remaining_lo_s: float | None = None  # the 80 % range of remaining_s (None when there is no estimate)
    remaining_hi_s: float | None = None


class Tracker:
    """Aggregates events of one job and snapshots its progress."""

    def __init__(self, model: TimingModel | None = None, *, floor: float = 0.0, reuse_s: float = 0.0) -> None:
        """`reuse_s`: a live view's snapshots within that many seconds of the last estimate count
        it down instead of estimating again (0: every snapshot estimates, as a replay must)."""
        self.model = model or TimingModel.default()
        self.state = JobState()
        self.estimator = Estimator(self.model)
        self._shown = min(max(float(floor), 0.0), MAX_RUNNING_FRACTION)
        self._words = EtaWords()
        self._lock = threading.RLock()
        self._reuse_s = reuse_s
        self._last: tuple[float, Estimate] | None = None  # (when, what) the estimator said last

    def feed(self, event: dict) -> None:
        """Apply any contract event (it must carry `t`). Anything but progress is news no kept
        estimate knows of (the plan, a phase that starts or ends): the next snapshot estimates."""
        with self._lock:
            self.state.feed(event)
            if event.get("type") not in ("progress", "heartbeat"):
                self._last = None

    @property
    def fraction(self) -> float:
        """The last fraction shown."""
        return self._shown

    def snapshot(self, now: float) -> Snapshot:
        with self._lock:
            return self._snapshot(now)

    def _snapshot(self, now: float) -> Snapshot:
        st = self.state
        t0 = st.t0 if st.t0 is not None else now
        end = st.terminal_t if st.terminal is not None and st.terminal_t is not None else now
        elapsed = st.active(t0, end)  # a resumed job's dead time is not part of it
        message = None
        lo = hi = None
        if st.terminal == "done":
            self._shown = 1.0
            remaining: float | None = 0.0
            message = _str(st.terminal_event, "output")
        elif st.terminal in ("error", "cancelled"):
            remaining = None
            message = _str(st.terminal_event, "message")
        else:
            est = self._estimate(now)
            remaining, lo, hi = est.remaining_s, est.remaining_lo_s, est.remaining_hi_s
            raw = self._raw_fraction(elapsed, remaining)
            self._shown = max(self._shown, min(raw, MAX_RUNNING_FRACTION))
        state = st.state
        return Snapshot(
            job=st.job,
            state=state,
            fraction=self._shown,
            elapsed=elapsed,
            remaining_s=remaining,
            eta_text=self._words(remaining, state, lo, hi),
            phases=tuple(self._row(st.phases[name], now) for name in st.order),
            message=message,
            info=job_info(st),
            remaining_lo_s=lo,
            remaining_hi_s=hi,
        )

    def _estimate(self, now: float) -> Estimate:
        """The estimator's answer at `now`, or the last one counted down when it is under `reuse_s` old
        and only progress came since (`feed`).

        An estimate walks every segment of the job: 20 ms at 900 segments on
        this machine's CPU, where a live view asks four times a second while
        the CPU renders. Between two estimates a second apart, the time left
        runs down with the clock, as the estimator's would until a stall.
        """
        last = self._last
        if last is not None and 0.0 <= now - last[0] < self._reuse_s:
            return last[1].counted_down(now - last[0], self.estimator.settings.min_remaining_s)
        est = self.estimator.estimate(self.state, now)
        self._last = (now, est)
        return est

    def _raw_fraction(self, elapsed: float, remaining: float | None) -> float:
        if remaining is not None and math.isfinite(remaining):
            total = elapsed + remaining
            return elapsed / total if total > 0 else 0.0
        # nothing to estimate with: the mean work fraction of counted phases
        fracs = []
        for ph in self.state.phases.values():
            total = ph.known_total
            if ph.ended:
                fracs.append(1.0)
            elif total:
                fracs.append(min(ph.done / total, 1.0))
        return sum(fracs) / len(fracs) if fracs else 0.0

    def _row(self, ph: PhaseState, now: float) -> PhaseRow:
        st = self.state
        total = ph.known_total
        if total is None and ph.ended and ph.parts:
            totals = [p.total for p in ph.parts.values()]
            if all(t is not None for t in totals):
                total = float(sum(totals))  # type: ignore[arg-type]
        done = ph.peak  # never less than shown before: a part restarted by a resume catches up unseen
        finished = ph.ended or st.terminal == "done"
        if finished:
            state = "done"
            if total is not None:
                done = max(done, total)
        elif ph.started:
            state = "running" if ph.unit else "waiting"
        else:
            state = "pending"
        rate = None
        if state == "running" and ph.start_t is not None and ph.done > ph.base_done:
            span = now - ph.start_t  # since this run started it: work done before a resume is not its rate
            rate = (ph.done - ph.base_done) / span if span > 0 else None
        detail = None
        if state in ("running", "waiting"):
            detail = ph.detail
            if ph.redo > 0 and ph.unit:
                detail = f"redoing {ph.redo:g} {ph.unit} cut short by the stop"
            if ph.parts and ph.unit is None:
                waiting = sum(1 for p in ph.parts.values() if p.started and not p.ended)
                if waiting > 1:
                    detail = f"{detail} ({waiting})" if detail else f"{waiting} waiting"
        return PhaseRow(ph.name, ph.unit, float(done), total, state, rate, detail, ph.skipped, len(ph.parts))


def job_info(st: JobState) -> JobInfo:
    """The header and summary facts of a job, from its plan and its last events."""
    plan, f = st.plan or {}, st.features
    inputs = plan.get("inputs")
    finalize = st.phases.get("finalize")
    size = _size(f, "in_width", "in_height")
    return JobInfo(
        inputs=tuple(str(i) for i in inputs) if isinstance(inputs, list) else (),
        output=_str(st.terminal_event, "output") or _str(plan, "output"),
        in_size=size,
        out_size=_size(f, "out_width", "out_height") or _scaled(size, f.get("scale")),
        model=_str(f, "model"),
        device=_str(f, "gpu"),
        precision=_str(f, "precision"),
        backend=_str(f, "backend"),
        frames=_int(f.get("frames")),
        duration_s=_num(f.get("duration_s")),
        segments=_int(f.get("segments")),
        output_bytes=finalize.whole.out_bytes if finalize is not None else None,
        cost_usd=_num((st.terminal_event or {}).get("cost_usd")),
        gpu_s=_num((st.terminal_event or {}).get("gpu_s")),
    )


def _int(value: object) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def _size(f: dict, w: str, h: str) -> tuple[int, int] | None:
    width, height = _int(f.get(w)), _int(f.get(h))
    return None if width is None or height is None else (width, height)


def _scaled(size: tuple[int, int] | None, scale: object) -> tuple[int, int] | None:
    factor = _int(scale)
    return None if size is None or factor is None else (size[0] * factor, size[1] * factor)


def _str(event: dict | None, key: str) -> str | None:
    if not event:
        return None
    value = event.get(key)
    return value if isinstance(value, str) else None
