"""What one estimate reads: the job's state at `now`, the timing model and the estimator's settings.

Every stage of the estimator (`rates`, `containers`, `gpu_work`, and the
combination in `estimator`) is a function of a `Moment` that returns its
result; none keeps anything between estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import TimingModel
from .state import JobState


@dataclass(frozen=True)
class Settings:
    """The estimator's knobs, tuned on the reference traces (`bench/eta_accuracy.py`)."""

    grace_s: float = 2.5  # seconds without progress before a stream counts as stalled
    stall_growth: float = 0.5  # seconds of remaining time a stalled second adds
    min_remaining_s: float = 1.0  # the least remaining time shown before `done`
    tau_spf: float = 0.05  # observed seconds worth a time-per-frame prior of sd 1
    tau_upload: float = 0.3  # the same for the upload rate
    tau_download: float = 0.5  # the same for the download rate
    skew: float = 0.5  # lean of the rate priors towards the faster outcome (in sd^2)
    settle_frames: float | None = None  # frames of a fresh container's warm-up (None: the model's)
    scenarios: bool = True  # walk the warm and the cold first container apart while open
    skew_download: float | None = None  # the download prior's lean (None: `skew`)
    settle_samples: int = 1  # after a probe: samples past the first that end the warm-up
    batch_frames: float = 8.0  # frames the model emits at once: fewer are a burst, not a rate
    range_scale: float = 2.5  # how the time-per-frame spread widens the 80 % range
    range_floor: float = 0.03  # the 80 % range's spread that no prior states
    range_default_sd: float = 0.3  # that spread before any GPU work is seen
    change_ratio: float = 1.25  # a speed that changed by more than this (either way) is a new speed
    change_min_s: float = 4.0  # seconds of work each side of a change needs to count
    change_min_frames: float = 4.0  # frames the work after a change needs to count
    change_min_samples: int = 4  # progress intervals each side of a change needs to count
    change_z: float = 3.0  # standard errors of the intervals' own noise a change must exceed
    recent_share: float = 0.3  # half-life of a stretch's weight, as a share of the work's span (0: all equal)
    recent_min_s: float = 10.0  # the shortest half-life


@dataclass(frozen=True)
class Moment:
    """The inputs of one estimate."""

    settings: Settings
    model: TimingModel
    st: JobState
    now: float

    @property
    def f(self) -> dict[str, Any]:
        """The plan's features (gpu, model, sizes, segments)."""
        return self.st.features or {}


def add_share(shares: dict[str, float], phase: str, seconds: float) -> None:
    """Attribute `seconds` of the remaining time to `phase` (nothing if not positive)."""
    if seconds > 0:
        shares[phase] = shares.get(phase, 0.0) + seconds
