"""Per-job progress state, aggregated from contract events in any order.

`JobState.feed` accepts every event of the contract (`docs/progress-events.md`)
and keeps, for each phase, the sum over its parts. It is tolerant by design:

- a repeated event (same `seq`) is ignored;
- `done` is cumulative per (`phase`, `part`): the event with the highest `seq`
  of the current attempt wins, so a late, older event changes nothing;
- a higher `attempt` restarts a part (its `done` may go down); what the earlier
  attempts did is kept apart as rate evidence (`lost_done`, `lost_time`);
- a lost event is harmless: the next cumulative one carries the same facts;
- after `error` or `cancelled`, a later event (higher `seq`) means the job was
  resumed; `done` is final.

No clock is read here: every time comes from the events' `t`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]
EARLY_SAMPLES = 24
RECENT_SAMPLES = 24


def _num(value: Any) -> float | None:
    """A finite number from an event field, else None (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _seq(event: Event) -> float:
    seq = event.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        return float(seq)
    return math.inf  # an unstamped event is taken as the newest


class _Span:
    """What starts and ends: `start_t` and `end_t` stay None until it does."""

    start_t: float | None
    end_t: float | None

    @property
    def started(self) -> bool:
        return self.start_t is not None

    @property
    def ended(self) -> bool:
        return self.end_t is not None


@dataclass
class PartState(_Span):
    """One `part` of a phase (a segment, a clip, a container), or the whole phase."""

    key: str | None
    attempt: int = 0
    done: float = 0.0
    total: float | None = None
    start_t: float | None = None  # start of the current attempt
    end_t: float | None = None  # end of the current attempt, None while running
    last_t: float | None = None  # latest progress of the current attempt
    first_t: float | None = None  # earliest progress of the current attempt
    first_done: float = 0.0  # `done` at that earliest progress
    # the first few (t, done) of the current attempt, in time order: lets an
    # estimator measure the rate after a warm-up rather than through it
    early: list[tuple[float, float]] = field(default_factory=list)
    # and the last few: the rate now, against the rate before (a machine that slowed down)
    recent: list[tuple[float, float]] = field(default_factory=list)
    updates: int = 0  # progress events of the current attempt (their cadence tells a stall from a pause)
    seq: float = -math.inf  # seq of the latest event applied to `done`
    worker: str | None = None
    detail: str | None = None  # detail given on phase_end ("warm", "cold start", "cancelled")
    lost_done: float = 0.0  # work done by earlier attempts (redone since)
    lost_time: float = 0.0  # time those attempts ran
    out_bytes: float | None = None  # size of what the part produced (encode's `bytes`)
    skipped: bool = False  # served from earlier work (`skipped: true`): a cached segment, an upload already stored
    # ... and none of that work was seen here (not a segment this job's events showed ending before a
    # resume): no time was spent on it, so it is no evidence of any rate
    served: bool = False

    @property
    def cadence(self) -> float | None:
        """Mean seconds between progress events of the current attempt."""
        if self.updates < 2 or self.first_t is None or self.last_t is None:
            return None
        return (self.last_t - self.first_t) / (self.updates - 1)

    def _restart(self, attempt: int, t: float) -> None:
        if self.start_t is not None:
            stop = self.end_t if self.end_t is not None else (self.last_t if self.last_t is not None else t)
            self.lost_time += max(0.0, stop - self.start_t)
            self.lost_done += self.done
        self.attempt = attempt
        self.done = 0.0
        self.start_t = t
        self.end_t = None
        self.last_t = None
        self.first_t = None
        self.first_done = 0.0
        self.early = []
        self.recent = []
        self.updates = 0
        self.seq = -math.inf
        self.detail = None
        self.skipped = self.served = False

    def mark_skipped(self) -> None:
        """Served from earlier work; evidence of nothing unless this job's events showed it ending before."""
        self.skipped = True
        if self.end_t is None:
            self.served = True

    def halt(self, t: float) -> None:
        """The client died while this ran: its work so far counts as lost, to be redone."""
        if self.start_t is None or self.end_t is not None:
            return
        stop = self.last_t if self.last_t is not None else self.start_t
        self.lost_time += max(0.0, min(stop, t) - self.start_t)
        self.lost_done += self.done
        self.done = 0.0
        self.start_t = self.last_t = self.first_t = None
        self.first_done = 0.0
        self.early = []
        self.recent = []
        self.updates = 0

    def _attempt_of(self, event: Event, t: float) -> bool:
        """Bring the part to the event's attempt; False if the event is stale."""
        attempt = event.get("attempt")
        attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else max(self.attempt, 1)
        if attempt < self.attempt:
            return False
        if attempt > self.attempt:
            self._restart(attempt, t)
        return True


@dataclass
class PhaseState(_Span):
    """One phase: plan facts, whole-phase markers and its parts."""

    name: str
    unit: str | None = None
    plan_total: float | None = None
    total: float | None = None  # reported for the whole phase after the plan
    start_t: float | None = None
    end_t: float | None = None
    end_seq: float = -math.inf
    start_seq: float = -math.inf
    whole: PartState = field(default_factory=lambda: PartState(None))
    parts: dict[str, PartState] = field(default_factory=dict)
    detail: str | None = None  # latest heartbeat detail
    detail_t: float | None = None
    base_done: float = 0.0  # work done before the latest resume (not this run's rate)
    redo: float = 0.0  # work the latest resume found half done: it is done again
    peak: float = 0.0  # the most `done` has been: what its row shows, so a restarted part never takes it back

    def halt(self, t: float) -> None:
        """A resume found this phase unfinished: what ran counts as lost; it starts anew."""
        if self.end_t is not None:
            return
        for part in [self.whole, *self.parts.values()]:
            before = part.done
            part.halt(t)
            self.redo += before - part.done
        self.start_t = None
        self.start_seq = -math.inf
        self.base_done = self.done

    def kept(self, part: PartState, done: float, *, halted: bool) -> None:
        """A restarted `part` starts with `done` work its last attempt left whole: not lost, not redone.

        When a resume had halted it, that work was also done before the
        resume: out of what the resume redoes and out of this run's rate.
        """
        kept = min(done, part.lost_done)
        part.lost_done -= kept
        if halted:
            self.not_redone(kept)

    def not_redone(self, work: float) -> None:
        """Work a resume counted as cut short was left whole after all: not to redo, and done before this run."""
        self.redo = max(0.0, self.redo - work)
        self.base_done += work

    @property
    def done(self) -> float:
        """Work done: the sum over the parts (or the whole-phase count if larger)."""
        if not self.parts:
            return self.whole.done
        return max(self.whole.done, sum(p.done for p in self.parts.values()))

    @property
    def skipped(self) -> int:
        """Parts served from earlier work instead of being redone."""
        return sum(1 for p in self.parts.values() if p.skipped)

    @property
    def known_total(self) -> float | None:
        """The phase's total if known: reported, else planned."""
        if self.total is not None:
            return self.total
        return self.plan_total

    def part(self, key: str | None) -> PartState:
        if key is None:
            return self.whole
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = PartState(key)
        return part

    def mark_started(self, t: float) -> None:
        if self.start_t is None or t < self.start_t:
            self.start_t = t


class JobState:
    """Everything the events have told about one job so far."""

    def __init__(self) -> None:
        self.job: str | None = None
        self.t0: float | None = None  # the plan's t, else the earliest t seen
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.plan: Event | None = None
        self.features: dict[str, Any] = {}
        self.order: list[str] = []  # phase names, plan order first, then as seen
        self.phases: dict[str, PhaseState] = {}
        self.terminal: str | None = None  # "done" | "error" | "cancelled"
        self.terminal_t: float | None = None
        self.terminal_seq: float = -math.inf
        self.terminal_event: Event | None = None
        self.probe: dict[str, Any] | None = None  # the latest speed probe (load_model's phase_end)
        self.reused = False  # some work was taken finished from the cache: timings not a render's
        self.max_seq: float = -math.inf
        self.events = 0  # events applied (after de-duplication)
        self.dead: list[tuple[float, float]] = []  # (client died, resumed): time no work ran
        self._seen: set[int] = set()

    # -- queries -----------------------------------------------------------

    @property
    def state(self) -> str:
        return self.terminal or "running"

    def active(self, t0: float, t1: float) -> float:
        """Seconds between t0 and t1 that the job was alive (dead time before a resume left out)."""
        span = max(0.0, t1 - t0)
        for a, b in self.dead:
            span -= max(0.0, min(b, t1) - max(a, t0))
        return max(0.0, span)

    @property
    def resume_t(self) -> float | None:
        return self.dead[-1][1] if self.dead else None

    def phase(self, name: str) -> PhaseState:
        ph = self.phases.get(name)
        if ph is None:
            ph = self.phases[name] = PhaseState(name)
            self.order.append(name)
        return ph

    def has(self, name: str) -> bool:
        return name in self.phases

    # -- feeding -----------------------------------------------------------

    def feed(self, event: Event) -> bool:
        """Apply one event; False when it was ignored (repeat, malformed)."""
        if not isinstance(event, dict):
            return False
        t = _num(event.get("t"))
        typ = event.get("type")
        if t is None or not isinstance(typ, str):
            return False
        seq = event.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq in self._seen:
                return False
            self._seen.add(seq)
        sq = _seq(event)
        if self.job is None and isinstance(event.get("job"), str):
            self.job = event["job"]
        self.events += 1
        previous_t = self.last_t
        self.first_t = t if self.first_t is None else min(self.first_t, t)
        self.last_t = t if self.last_t is None else max(self.last_t, t)
        if sq != math.inf:
            self.max_seq = max(self.max_seq, sq)
        if self.t0 is None or (self.plan is None and t < self.t0):
            self.t0 = t

        if typ == "plan":
            self._plan(event, t)
        elif typ in ("done", "error", "cancelled"):
            self._terminal(event, typ, t, sq)
        else:
            phase_name = event.get("phase")
            if not isinstance(phase_name, str):
                return True
            if self.terminal in ("error", "cancelled") and sq > self.terminal_seq:
                self.terminal = None  # resumed
                self.terminal_t = None
            ph = self.phase(phase_name)
            if ph.unit is None and isinstance(event.get("unit"), str):
                ph.unit = event["unit"]
            if typ == "phase_start":
                if self._restarts_job(ph, event, sq):
                    self._resumed(previous_t if previous_t is not None else t, t)
                self._phase_start(ph, event, t, sq)
            elif typ == "progress":
                self._progress(ph, event, t, sq)
            elif typ == "heartbeat":
                self._heartbeat(ph, event, t)
            elif typ == "phase_end":
                self._phase_end(ph, event, t, sq)
            ph.peak = max(ph.peak, ph.done)
        return True

    def _plan(self, event: Event, t: float) -> None:
        first_plan = self.plan is None
        self.t0 = t if first_plan or self.t0 is None else min(self.t0, t)
        self.plan = event
        features = event.get("features")
        if isinstance(features, dict):
            self.features = features
        phases = event.get("phases")
        if isinstance(phases, list):
            planned = []
            for item in phases:
                if not isinstance(item, dict) or not isinstance(item.get("phase"), str):
                    continue
                ph = self.phase(item["phase"])
                planned.append(ph.name)
                if isinstance(item.get("unit"), str):
                    ph.unit = item["unit"]
                total = _num(item.get("total"))
                if total is not None:
                    ph.plan_total = total
            rest = [name for name in self.order if name not in planned]
            self.order = planned + rest

    def _restarts_job(self, ph: PhaseState, event: Event, sq: float) -> bool:
        """Does this event start a client run again (a resume)? Every run begins with the first phase."""
        return (not isinstance(event.get("part"), str) and bool(self.order) and ph.name == self.order[0]
                and ph.start_seq > -math.inf and sq > ph.start_seq)

    def _resumed(self, died: float, t: float) -> None:
        """A new client run starts at t; the previous one died after `died`. Unfinished work restarts."""
        self.dead.append((min(died, t), t))
        for ph in self.phases.values():
            ph.redo = 0.0
            ph.halt(died)

    def _terminal(self, event: Event, typ: str, t: float, sq: float) -> None:
        if self.terminal == "done":
            return
        if self.terminal is not None and sq < self.terminal_seq and typ != "done":
            return
        self.terminal = typ
        self.terminal_t = t
        self.terminal_seq = sq
        self.terminal_event = event

    def _phase_start(self, ph: PhaseState, event: Event, t: float, sq: float) -> None:
        ph.mark_started(t)
        key = event.get("part")
        if not isinstance(key, str):
            if sq > ph.end_seq and ph.end_t is not None:
                if self.resume_t is not None and ph.end_t <= self.resume_t:  # a resumed run does it again
                    ph.start_t, ph.whole = t, PartState(None)
                ph.end_t = None  # the phase starts again (a resumed job)
                ph.whole.end_t = None
            ph.start_seq = max(ph.start_seq, sq)
            if ph.whole.start_t is None or t < ph.whole.start_t:
                ph.whole.start_t = t
            total = _num(event.get("total"))
            if total is not None:
                ph.total = total
            return
        part = ph.part(key)
        before, halted = part.attempt, part.start_t is None and part.lost_done > 0
        if not part._attempt_of(event, t):
            return
        if part.start_t is None or t < part.start_t:
            part.start_t = t
        total = _num(event.get("total"))
        if total is not None:
            part.total = total
        if isinstance(event.get("worker"), str):
            part.worker = event["worker"]
        done = _num(event.get("done"))
        if done is not None and sq > part.seq:
            if part.attempt > before:
                ph.kept(part, done, halted=halted)
            part.done, part.seq = done, sq

    def _progress(self, ph: PhaseState, event: Event, t: float, sq: float) -> None:
        self.reused = self.reused or event.get("skipped") is True
        ph.mark_started(t)
        key = event.get("part")
        part = ph.part(key if isinstance(key, str) else None)
        halted = part.start_t is None and part.lost_done > 0
        if not part._attempt_of(event, t):
            return
        if part.start_t is None:
            part.start_t = t
        total = _num(event.get("total"))
        if sq <= part.seq:
            return
        done = _num(event.get("done"))
        if event.get("skipped") is True:
            self._served(ph, part, done, total, t, halted=halted)
        if done is not None:
            part.done = max(0.0, done)
            part.seq = sq
            part.last_t = t if part.last_t is None else max(part.last_t, t)
            part.updates += 1
            if part.first_t is None or t < part.first_t:
                part.first_t, part.first_done = t, part.done
            if len(part.early) < EARLY_SAMPLES or t < part.early[-1][0]:
                bisect.insort(part.early, (t, part.done))
                del part.early[EARLY_SAMPLES:]
            bisect.insort(part.recent, (t, part.done))
            del part.recent[:-RECENT_SAMPLES]
        if total is not None:
            part.total = total
            if part is ph.whole:
                ph.total = total

    @staticmethod
    def _served(ph: PhaseState, part: PartState, done: float | None, total: float | None, t: float,
                *, halted: bool) -> None:
        """A part served from earlier work (`skipped: true`, no phase_end follows): complete once its
        count reaches its total, so nothing counts it as running. Work a resume had halted was
        left whole after all: not redone, and still the evidence of a rate it was (`lost_*`)."""
        part.mark_skipped()
        if done is None:
            return
        if halted:
            ph.not_redone(min(done, part.lost_done))
        whole = total if total is not None else part.total
        if part is not ph.whole and part.end_t is None and whole is not None and done >= whole:
            part.end_t = t

    def _heartbeat(self, ph: PhaseState, event: Event, t: float) -> None:
        ph.mark_started(t)
        if ph.detail_t is None or t >= ph.detail_t:
            ph.detail_t = t
            detail = event.get("detail")
            ph.detail = detail if isinstance(detail, str) else None

    def _phase_end(self, ph: PhaseState, event: Event, t: float, sq: float) -> None:
        probe = event.get("probe")
        if isinstance(probe, dict) and (_num(probe.get("s_per_px")) or 0.0) > 0:
            self.probe = probe
        key = event.get("part")
        done = _num(event.get("done"))
        total = _num(event.get("total"))
        if not isinstance(key, str):
            ph.mark_started(t)
            if sq >= ph.start_seq:
                ph.end_t = t if ph.end_t is None else max(ph.end_t, t)
                ph.end_seq = max(ph.end_seq, sq)
                if not ph.parts:
                    if ph.whole.start_t is None:
                        elapsed = _num(event.get("elapsed"))
                        ph.whole.start_t = t - elapsed if elapsed is not None else t
                    ph.whole.end_t = ph.end_t
            if total is not None:
                ph.total = total
            if done is not None and sq > ph.whole.seq:
                ph.whole.done, ph.whole.seq = done, sq
            out_bytes = _num(event.get("bytes"))
            if out_bytes is not None:
                ph.whole.out_bytes = out_bytes  # finalize's: the output's size
            return
        part = ph.part(key)
        if not part._attempt_of(event, t):
            return
        ph.mark_started(t)
        if event.get("skipped") is True:
            part.mark_skipped()
        if part.start_t is None:
            elapsed = _num(event.get("elapsed"))
            part.start_t = t - elapsed if elapsed is not None else t
        part.end_t = t
        if total is not None:
            part.total = total
        if sq > part.seq:
            if done is not None:
                part.done = done
            elif part.total is not None:
                part.done = part.total
            part.seq = sq
        detail = event.get("detail")
        if isinstance(detail, str):
            part.detail = detail
        out_bytes = _num(event.get("bytes"))
        if out_bytes is not None:
            part.out_bytes = out_bytes
