"""When each GPU container (or the local worker) is ready for a segment.

A waiting container's remaining wait is the prior distribution conditioned
on the time already waited: warm and cold starts are a mixture, the k-th
container is warm with the model's probability, updated by what the other
containers showed. Containers not requested yet follow the prior. A local
job has one worker, ready once its model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .model import Dist
from .moment import Moment, add_share
from .segments import container_kind
from .state import PartState, PhaseState

Ready = list[tuple[float, bool]]  # (time free for a new segment, warmed up), soonest first


def container_count(m: Moment, n_segments: int) -> int:
    """Containers the job will run at once: its parallelism, at most one per segment."""
    par = m.f.get("parallel")
    par = int(par) if isinstance(par, (int, float)) and not isinstance(par, bool) and par >= 1 else 1
    if "queue" not in m.st.phases:
        return 1
    return max(1, min(par, max(n_segments, 1)))


def kind(m: Moment, c: PartState, loadph: PhaseState | None) -> str | None:
    """'warm' or 'cold' once known, from the queue end detail or what followed, or a wait past any warm one."""
    said = container_kind(c, loadph)
    if said is not None:
        return said
    warm_max = m.model.warm_wait().q[-1]
    if c.ended:
        return "warm" if (c.end_t or 0) - (c.start_t or 0) <= warm_max else "cold"
    if c.start_t is not None and m.now - c.start_t > warm_max:
        return "cold"
    return None


def first_warm_probability(m: Moment) -> float | None:
    """P(the first container starts warm), while that is still open; else None."""
    queue = m.st.phases.get("queue")
    up = m.st.phases.get("upscale")
    if queue is None or (up is not None and up.parts):
        return None
    conts = sorted((p for p in queue.parts.values() if p.start_t is not None), key=lambda p: p.start_t)
    if not conts:
        return m.model.p_warm(1) if not queue.ended else None
    first = conts[0]
    if first.ended or kind(m, first, m.st.phases.get("load_model")) is not None:
        return None
    waited = m.now - (first.start_t or m.now)
    pw = m.model.p_warm(1)
    sw, sc = m.model.warm_wait().survival(waited), m.model.cold_wait().survival(waited)
    den = pw * sw + (1 - pw) * sc
    return pw * sw / den if den > 1e-12 else None


def waiting_alone(m: Moment, ph: PhaseState) -> float:
    """Remaining wait of a waiting phase (queue, load_model) in a job with no counted GPU work."""
    dist: Dist = m.model.load_time(m.f) if ph.name == "load_model" else m.model.cold_wait()
    if ph.started:
        return dist.remaining(m.now - (ph.start_t or m.now))
    return dist.mean()


def _local(m: Moment, cursor: float, busy: dict[str, float], workers: set[str]) -> tuple[Ready, dict[str, float]]:
    """The one local worker: free when its segment ends, or once the model is loaded."""
    now, shares = m.now, {}
    load = m.model.load_time(m.f)
    loadph = m.st.phases.get("load_model")
    if busy:
        return [(t, True) for t in sorted(busy.values())], shares
    if loadph is None or loadph.ended or workers:
        return [(max(cursor, now), bool(workers))], shares
    if loadph.started:
        rem = load.remaining(now - (loadph.start_t or now))
        add_share(shares, "load_model", rem)
        return [(now + rem, False)], shares
    rem = load.mean()
    add_share(shares, "load_model", rem)
    return [(cursor + rem, False)], shares


def _warm_odds(m: Moment, conts: list[PartState], first: str | None) -> Callable[[int], float]:
    """P(the k-th container is warm), given the kinds the containers seen so far showed.

    The warm GPUs are taken first: a warm k-th means all before were warm, a
    cold k-th that all after are cold. `first` forces the first container's
    kind (a scenario being walked).
    """
    loadph = m.st.phases.get("load_model")
    lo, hi = 0, math.inf
    for k, c in enumerate(conts, start=1):
        said = kind(m, c, loadph)
        if said == "warm":
            lo = max(lo, k)
        elif said == "cold":
            hi = min(hi, k)
    if first == "warm":
        lo = max(lo, 1)
    elif first == "cold":
        hi = min(hi, 1)

    def p_warm(k: int) -> float:
        if k <= lo:
            return 1.0
        if k >= hi:
            return 0.0
        s_k = m.model.p_warm(k)
        s_lo = m.model.p_warm(lo) if lo >= 1 else 1.0
        s_hi = m.model.p_warm(int(hi)) if hi != math.inf else 0.0
        den = s_lo - s_hi
        return min(max((s_k - s_hi) / den, 0.0), 1.0) if den > 1e-9 else 0.5

    return p_warm


def _seen_ready(m: Moment, k: int, c: PartState, p_warm: Callable[[int], float]) -> float:
    """When the k-th container seen so far will be ready (it is not running a segment)."""
    now, model = m.now, m.model
    load = model.load_time(m.f)
    loadph = m.st.phases.get("load_model")
    lp = loadph.parts.get(c.key or "") if loadph else None
    if c.ended:
        if lp is not None and lp.ended:
            return max(now, lp.end_t or now)
        if lp is not None and lp.started:
            return now + load.remaining(now - (lp.start_t or now))
        if kind(m, c, loadph) == "cold":
            return max(now, (c.end_t or now)) + load.remaining(now - (c.end_t or now))
        return max(now, c.end_t or now)
    warm, cold = model.warm_wait(), model.cold_wait()
    waited = now - (c.start_t if c.start_t is not None else now)
    pw = p_warm(k)
    sw, sc = warm.survival(waited), cold.survival(waited)
    den = pw * sw + (1 - pw) * sc
    post = pw * sw / den if den > 1e-12 else 0.0
    rem = post * warm.remaining(waited) + (1 - post) * (cold.remaining(waited) + load.mean())
    return now + rem


def ready(
    m: Moment, cursor: float, n_wanted: int, busy: dict[str, float], workers: set[str], first: str | None = None
) -> tuple[Ready, dict[str, float]]:
    """(when each container is free for a new segment, soonest first; the queue's share of the remaining time).

    `busy` maps the workers running a segment to its predicted end;
    `workers` names every worker that has run a segment (warmed up);
    `cursor` is when the GPU work may start (after the uploads).
    """
    queue = m.st.phases.get("queue")
    if queue is None:
        return _local(m, cursor, busy, workers)
    now, model = m.now, m.model
    loadph = m.st.phases.get("load_model")
    free: Ready = []
    conts = sorted(queue.parts.values(), key=lambda p: (p.start_t if p.start_t is not None else math.inf))
    p_warm = _warm_odds(m, conts, first)
    first_ready = math.inf
    for k, c in enumerate(conts, start=1):
        name = c.key or ""
        lp = loadph.parts.get(name) if loadph else None
        if c.detail == "cancelled" or (lp is not None and lp.detail == "cancelled"):
            continue
        if name in busy:
            free.append((busy[name], True))
            continue
        t_ready = _seen_ready(m, k, c, p_warm)
        free.append((t_ready, name in workers))
        first_ready = min(first_ready, t_ready)
    # containers not requested yet
    warm, cold, load = model.warm_wait(), model.cold_wait(), model.load_time(m.f)
    known = len(conts)
    stagger = model.constant("queue", "stagger_s")
    for k in range(known + 1, n_wanted + 1):
        pw = p_warm(k)
        if queue.started:
            start = max(now, queue.start_t or now) + stagger * (k - known - 1)
        else:
            start = cursor + model.constant("queue", "gap_s") + stagger * (k - 1)
        t_ready = start + pw * warm.mean() + (1 - pw) * (cold.mean() + load.mean())
        free.append((t_ready, False))
        first_ready = min(first_ready, t_ready)
    if not free:
        free.append((max(cursor, now) + warm.mean(), False))
    shares: dict[str, float] = {}
    if not busy and first_ready < math.inf:
        # the wait for the first container is the queue's (and load's) share
        add_share(shares, "queue", max(0.0, first_ready - max(cursor, now)))
    return sorted(free), shares
