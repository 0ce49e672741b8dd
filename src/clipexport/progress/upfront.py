"""The up-front estimate of a plan (`render --estimate`, the bench's up-front score).

Nothing runs: the plan alone is fed to the estimator at the plan's time.
"""

from __future__ import annotations

from typing import Any

from .estimator import Estimator
from .model import TimingModel
from .state import JobState


def estimate_plan(plan_event: dict[str, Any], model: TimingModel | None = None) -> dict[str, Any]:
    """The up-front estimate for a plan: {"total_s", "total_lo_s", "total_hi_s" (the 80 % range), "phases"}.

    Each phase gets the time it adds to the job's critical path, so the
    phases sum to the total; a phase that overlaps others (encoding while
    upscaling) gets only what it adds after them. This is the expected
    length (every prior at its median, a cold start at its odds), where the
    live ETA leans towards the shorter outcome to keep its relative error
    small.
    """
    model = model or TimingModel.default()
    st = JobState()
    event = dict(plan_event)
    event.setdefault("type", "plan")
    event.setdefault("t", 0.0)
    st.feed(event)
    now = float(event["t"])
    est = Estimator(model, skew=0.0, scenarios=False).estimate(st, now)
    phases = {name: round(est.phases.get(name, 0.0), 3) for name in st.order}
    total = est.remaining_s if est.remaining_s is not None else sum(phases.values())
    out: dict[str, Any] = {"total_s": round(total, 3), "phases": phases}
    if est.remaining_lo_s is not None and est.remaining_hi_s is not None:
        out.update(total_lo_s=round(est.remaining_lo_s, 3), total_hi_s=round(est.remaining_hi_s, 3))
    return out
