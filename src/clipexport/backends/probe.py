"""The speed probe: a few timed forward passes at the job's frame size, right after the model loads.

No timing model knows every machine: a laptop's CPU, a GPU type nobody
fitted, a machine that is busy today. A probe costs a few frames' time and
tells the ETA this device's seconds per pixel before the first segment
reports anything; the estimator takes it as the prior (`progress.model`),
and `eta fit` keeps it per device, model and precision so the next
`--estimate` on this machine starts from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

# The ETA predicts the probe's own time from the same bounds (progress.model.probe_seconds).
from clipexport.progress.model import PROBE_BUDGET_S, PROBE_RUNS


def probe_speed(
    upscaler: Any,
    width: int,
    height: int,
    *,
    device: str,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Time `upscaler.upscale` on one textured frame of `width` x `height`; the fastest run counts,
    and the median run rides along (`s_per_px_median`).

    The first pass is untimed: it carries the one-off warm-up (kernel
    choice, allocations) that the first segment would otherwise pay too.
    On a machine other processes keep busy the fastest run is the lucky
    one; the model takes the median there (`TimingModel.spf`).
    """
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    upscaler.upscale(frame)
    runs: list[float] = []
    for _ in range(PROBE_RUNS):
        start = clock()
        upscaler.upscale(frame)
        runs.append(clock() - start)
        if sum(runs) >= PROBE_BUDGET_S:  # a slow CPU gets fewer runs
            break
    best, median = min(runs), sorted(runs)[len(runs) // 2]
    # The plan's name for it (fp32, bf16, fp16, int8), so a kept probe matches the next plan's features.
    precision = getattr(upscaler, "precision", None) or str(getattr(upscaler, "dtype", "")).removeprefix("torch.")
    return {
        "s_per_px": best / float(width * height),
        "s_per_px_median": median / float(width * height),
        "device": device,
        "model": getattr(upscaler, "model", None),
        "scale": getattr(upscaler, "scale", None),
        "precision": precision or None,
        "width": width,
        "height": height,
    }
