"""Progress: aggregation of contract events, the ETA, the timing model, the display.

Pure parts (no clock, no thread, no Rich): `state` (per-phase sums over
parts), `tracker` (the never-decreasing fraction and the `Snapshot` every
view draws), `model` and `fit` (the timing model and its fit from logs),
`replay`, `text`, and the ETA in stages, each a module:

- `estimator`: the phase combination (remaining time at an explicit `now`);
- `upfront`: the estimate of a plan before anything runs;
- `rates`: live rate smoothing (prior against observed rate, stalls, rate changes);
- `streams`: the sequential phases before the GPU (prepare, upload);
- `containers`: when each GPU container is ready (warm or cold starts);
- `gpu_work`: the segments' simulation (upscale, encode, download);
- `segments`: what a segment's timing means, shared with the fit;
- `moment`: what one estimate reads (state, model, settings, now).

Only `display` imports Rich.
"""

from __future__ import annotations

from .estimator import Estimate, Estimator
from .fit import fit_logs
from .model import TimingModel, load_model, user_model_path
from .replay import replay_traces
from .state import JobState
from .text import eta_text
from .tracker import PhaseRow, Snapshot, Tracker
from .upfront import estimate_plan

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
