"""Progress: aggregation of contract events, the ETA, the timing model, the display.

Pure parts (no clock, no thread, no Rich): `state` (per-phase sums over
parts), `estimator` (remaining time at an explicit `now`), `tracker` (the
never-decreasing fraction and the `Snapshot` every view draws), `model` and
`fit` (the timing model and its fit from logs), `replay`, `text`. Only
`display` imports Rich.
"""

from __future__ import annotations

from typing import Any

from .estimator import Estimate, Estimator
from .fit import fit_logs
from .model import TimingModel, load_model, user_model_path
from .replay import replay_traces
from .state import JobState
from .text import eta_text
from .tracker import PhaseRow, Snapshot, Tracker

__all__ = [
    "Estimate",
    "Estimator",
    "JobState",
    "PhaseRow",
    "Snapshot",
    "TimingModel",
    "Tracker",
    "estimate_plan",
    "eta_text",
    "fit_logs",
    "load_model",
    "replay_traces",
    "user_model_path",
]


def estimate_plan(plan_event: dict[str, Any], model: TimingModel | None = None) -> dict[str, Any]:
    """The up-front estimate for a plan: {"total_s", "total_lo_s", "total_hi_s" (the 80 % range), "phases"}.

    Nothing runs: the plan alone is fed to the estimator at the plan's time.
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
