"""Remaining time of a job, from its state, a timing model and an explicit `now`: the phase combination.

Pure: no clock, no thread, no I/O. `Estimator.estimate(state, now)` walks the
job's pipeline forward from `now`, each stage a function in its own module:

1. *sequential phases before the GPU* (prepare, upload; `streams`): work
   left over a rate that blends the observed rate with the model's prior
   (`rates.blend`), one phase after another;
2. *containers* (queue, load_model; `containers`): when each GPU container
   will be ready, its wait conditioned on the time already waited;
3. *segments* (upscale, encode, download; `gpu_work`): a small simulation
   of the segments on those containers at the job's time per frame
   (`rates.frame_time`), downloads one after another;
4. *finalize*: the model's time for the output size, conditioned on time spent;
5. *the range*: an 80 % range around the sum, as wide as what is still open.

While the first GPU container's fate is open (a warm start in seconds, or a
cold one in half a minute), steps 2-4 are walked for both and the one that
minimises the expected relative error is kept.

A stall counts as no progress: past a grace period without progress, the
remaining time of the stalled work grows with the stall instead of freezing.
Phases the model does not know are counted with their own observed rate.
The up-front estimate of a plan is in `upfront`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from .containers import first_warm_probability
from .gpu_work import START, Work, gpu_work
from .model import Dist, TimingModel
from .moment import Moment, Settings, add_share
from .rates import stream_rate
from .state import JobState, PhaseState
from .streams import stream_remaining

PRE = ("prepare", "upload")
WORK = ("upscale", "encode", "download")
POST = ("finalize",)
KNOWN = PRE + START + WORK + POST
Z80 = 1.2816  # the normal quantile at 90 %: 80 % of the mass lies within +-Z80 sd


@dataclass(frozen=True)
class Estimate:
    """What the estimator says at one instant."""

    remaining_s: float | None  # None: nothing to go on
    phases: dict[str, float] = field(default_factory=dict)  # remaining seconds attributed to each phase
    rates: dict[str, float] = field(default_factory=dict)  # observed rate of each phase, unit per second
    remaining_lo_s: float | None = None  # the 80 % range of remaining_s: 10 % of jobs end sooner,
    remaining_hi_s: float | None = None  # 10 % later

    def counted_down(self, seconds: float, floor: float) -> Estimate:
        """The same estimate `seconds` later, nothing new having happened: each time left less those
        seconds, the estimate itself no lower than `floor` (`Settings.min_remaining_s`)."""
        def less(value: float | None, least: float) -> float | None:
            return None if value is None else max(value - seconds, least)

        return replace(self, remaining_s=less(self.remaining_s, floor), remaining_lo_s=less(self.remaining_lo_s, 0.0),
                       remaining_hi_s=less(self.remaining_hi_s, floor))


class Estimator:
    """Remaining-time estimator; one per job or shared, it keeps no job state.

    Keyword arguments are the `moment.Settings` knobs.
    """

    def __init__(self, model: TimingModel | None = None, **settings: Any) -> None:
        self.settings = Settings(**settings)
        self.model = model or TimingModel.default()

    def estimate(self, st: JobState, now: float) -> Estimate:
        if st.terminal == "done":
            return Estimate(0.0)
        return combine(Moment(self.settings, self.model, st, now))


def combine(m: Moment) -> Estimate:
    """The remaining time: the phases before the GPU, then the GPU work and what follows, then the range."""
    if not m.st.order:
        return Estimate(None)
    before = _before_gpu(m)
    after = _after_with_scenarios(m, before.end)
    rates = {**before.rates, **after.rates}
    if not (before.known or after.known):
        return Estimate(None, rates=rates)
    remaining = max(after.end - m.now, m.settings.min_remaining_s)
    sd = after.frames.sd if after.frames is not None else m.settings.range_default_sd
    lo, hi = _range(m, remaining, sd)
    return Estimate(remaining, {**before.shares, **after.shares}, rates, lo, hi)


def _first_work(names: list[str]) -> int:
    """Index of the first phase of the GPU work or after it."""
    for i, name in enumerate(names):
        if name in START or name in WORK or name in POST:
            return i
    return len(names)


def _later_started(m: Moment, names: list[str]) -> list[bool]:
    """For each phase: has a phase planned after it already started?

    The phases before the GPU run one after another, so a later phase
    under way means the earlier one is over even if its end was lost.
    """
    out = [False] * len(names)
    seen = False
    for i in range(len(names) - 1, -1, -1):
        out[i] = seen
        seen = seen or m.st.phases[names[i]].started
    return out


def _before_gpu(m: Moment) -> Work:
    """The sequential phases before the GPU (prepare, upload, unknown ones), one after another from now."""
    names = list(m.st.order)
    later_started = _later_started(m, names)
    first_work = _first_work(names)
    out = Work(m.now, False)
    for i, name in enumerate(names):
        if name not in PRE and (name in KNOWN or first_work < i):
            continue  # GPU work and what follows it: handled by `_after`
        ph = m.st.phases[name]
        obs = stream_rate(m, ph)  # still evidence when over (the upload rate)
        if obs is not None:
            out.rates[name] = obs[0]
        if ph.ended or later_started[i]:
            continue
        rem = stream_remaining(m, ph)
        if rem is None:
            continue
        out.known = True
        add_share(out.shares, name, rem)
        out.end += rem + (m.model.constant("upload", "gap_s") if name in PRE else 0.0)
    return out


def _after_with_scenarios(m: Moment, cursor: float) -> Work:
    """The GPU work and what follows; while the first container may start warm or cold, the better of both walks.

    Kept is the walk that minimises the expected relative error: the
    likelier, unless the other is much shorter.
    """
    p_first = first_warm_probability(m) if m.settings.scenarios else None
    if p_first is None:
        return _after(m, cursor, None)
    warm, cold = _after(m, cursor, "warm"), _after(m, cursor, "cold")
    r_w, r_c = max(warm.end - m.now, 1.0), max(cold.end - m.now, 1.0)
    return warm if p_first / r_w >= (1.0 - p_first) / r_c else cold


def _after(m: Moment, cursor: float, first: str | None) -> Work:
    """The GPU work from `cursor`, then what follows it: finalize and phases the model does not know."""
    work = gpu_work(m, cursor, first)
    names = list(m.st.order)
    first_work = _first_work(names)
    for i, name in enumerate(names):
        ph = m.st.phases[name]
        if name in POST:
            rem = _finalize(m, ph, work.out_bytes)
            if rem is not None:
                work.known = True
                start = max(work.end, m.now)
                add_share(work.shares, name, start + rem - max(work.end, m.now))
                work.end = start + rem
        elif name not in KNOWN and first_work < i and not ph.ended:
            obs = stream_rate(m, ph)
            if obs is not None:
                work.rates[name] = obs[0]
            rem = stream_remaining(m, ph)
            if rem is not None:
                work.known = True
                add_share(work.shares, name, rem)
                work.end = max(work.end, m.now) + rem
    return work


def _finalize(m: Moment, ph: PhaseState, out_bytes: float | None) -> float | None:
    """Finalize's remaining seconds: the model's time for the output size, less the time already spent."""
    if ph.ended:
        return None
    prior = m.model.finalize_time(m.f, out_bytes)
    if ph.started:
        spent = m.now - (ph.start_t or m.now)
        return max(prior - spent, Dist.TAIL_SHARE * spent, 0.1)
    return prior + m.model.constant("upscale", "gap_s")


def _range(m: Moment, remaining: float, spf_sd: float) -> tuple[float, float]:
    """The 80 % range around `remaining`: log-normal, as wide as what is still uncertain.

    The spread is the time-per-frame prior's, narrowed by the evidence
    as the blend weighs it (sd x sqrt(1 - w)), over a floor for what no
    prior states (machine noise, the tail of a job); calibrated on the
    reference traces (`bench/eta_accuracy.py` prints the coverage).
    """
    s = math.hypot(spf_sd * m.settings.range_scale, m.settings.range_floor)
    return max(remaining * math.exp(-Z80 * s), 0.0), remaining * math.exp(Z80 * s)
