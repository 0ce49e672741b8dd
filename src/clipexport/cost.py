"""What a render on Modal costs: the price table, the prediction before, the bill after.

Modal bills a container from its start to its scale-down: the cold start and
model load, the segments, and the idle tail (`scaledown_window`, 120 s by
default) after its last segment. So a job costs about

    containers x (start + idle tail) + the frames' GPU time,

times the container's rate: its GPU, plus the CPU cores and memory
`modal_app.py` asks for. The prices below are Modal's published on-demand
rates in USD per hour (modal.com/pricing, read Nov 2026); `prices` in
`config.toml` overrides any of them, e.g. `prices = {L4 = 0.70, cpu_core = 0.05}`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clipexport.errors import UsageError

# USD per hour, one GPU of the type; `cpu_core` per core, `memory_gib` per GiB.
PRICES: dict[str, float] = {
    "T4": 0.59,
    "L4": 0.80,
    "A10G": 1.10,
    "L40S": 1.95,
    "A100": 2.10,
    "A100-80GB": 2.50,
    "H100": 3.95,
    "H200": 4.54,
    "B200": 6.25,
    "cpu_core": 0.0473,
    "memory_gib": 0.0080,
}
DEFAULT_GPU = "L4"  # the deployment's first choice (modal_app.py, CLIPEXPORT_MODAL_GPUS)
CONTAINER_CORES = 4.0  # modal_app.py's defaults: CLIPEXPORT_MODAL_CPU, CLIPEXPORT_MODAL_MEMORY
CONTAINER_MEMORY_GIB = 8.0
SCALEDOWN_S = 120.0  # CLIPEXPORT_SCALEDOWN_S


@dataclass(frozen=True)
class Rate:
    """What one container of a GPU type costs per hour, split into its GPU and the rest."""

    gpu: str
    gpu_per_h: float
    container_per_h: float  # CPU cores and memory

    @property
    def per_h(self) -> float:
        return self.gpu_per_h + self.container_per_h

    def cost(self, seconds: float) -> float:
        return seconds / 3600.0 * self.per_h


def rate(gpu: str | None, overrides: Mapping[str, Any] | None = None) -> Rate:
    """The rate of a container with `gpu` (the deployment's first choice if None); `TYPE:N` is N GPUs."""
    prices = {**PRICES, **{str(k): float(v) for k, v in (overrides or {}).items()}}
    name, _, count = (gpu or DEFAULT_GPU).partition(":")
    by_upper = {k.upper(): v for k, v in prices.items()}
    per_gpu = by_upper.get(name.upper())
    if per_gpu is None:
        raise UsageError(f"no price for GPU {name!r}: add it under `prices` in config.toml (USD per hour)")
    n = int(count) if count.isdigit() else 1
    rest = CONTAINER_CORES * prices["cpu_core"] + CONTAINER_MEMORY_GIB * prices["memory_gib"]
    return Rate(name.upper() if name.upper() in PRICES else name, per_gpu * n, rest)


def gpu_type(device: str | None) -> str | None:
    """The priced GPU type a device name stands for: "NVIDIA A10G" is A10G, "NVIDIA H100 80GB HBM3" H100."""
    words = set((device or "").upper().replace("-", " ").split())
    found = [k for k in PRICES if k.upper() in words]
    return max(found, key=len) if found else None


def scaledown_s() -> float:
    """The idle tail: the deployment's `scaledown_window` (same variable as at deploy time)."""
    value = os.environ.get("CLIPEXPORT_SCALEDOWN_S", "").strip()
    return float(value) if value.isdigit() else SCALEDOWN_S


@dataclass(frozen=True)
class Cost:
    """Container time and its price: predicted (`estimate`) or billed (`billed`)."""

    rate: Rate
    containers: int
    gpu_s: float  # container-seconds, start to scale-down, all containers
    idle_s: float  # of which the idle tails

    @property
    def usd(self) -> float:
        return self.rate.cost(self.gpu_s)

    @property
    def idle_usd(self) -> float:
        return self.rate.cost(self.idle_s)

    def to_json(self) -> dict[str, Any]:
        """The one form a cost is shown from: `lines`, `--json`, the `done` event."""
        r = self.rate
        return {"gpu": r.gpu, "usd_per_hour": round(r.per_h, 4), "gpu_usd_per_hour": round(r.gpu_per_h, 4),
                "container_usd_per_hour": round(r.container_per_h, 4), "containers": self.containers,
                "gpu_s": round(self.gpu_s, 1), "idle_s": round(self.idle_s, 1), "usd": round(self.usd, 4),
                "idle_usd": round(self.idle_usd, 4)}


def estimate(features: Mapping[str, Any], model: Any, gpu_rate: Rate, idle_s: float) -> Cost:
    """The predicted bill of a plan's `features` with a `TimingModel`: starts, frames, idle tails."""
    containers = max(1, min(int(features.get("parallel") or 1), int(features.get("segments") or 1)))
    at_gpu = {**features, "backend": "modal", "gpu": gpu_rate.gpu}
    mu, _ = model.spf(at_gpu)
    work_s = float(features.get("frames") or 0) * math.exp(mu)
    start_s = model.cold_wait().mean() + model.load_time(at_gpu).mean()
    return Cost(gpu_rate, containers, containers * (start_s + idle_s) + work_s, containers * idle_s)


def billed(spans: Mapping[str, tuple[float, float]], gpu_rate: Rate, idle_s: float) -> Cost:
    """The bill of containers seen working: each from its start to its last segment, plus its idle tail."""
    busy = sum(max(0.0, last - started) for started, last in spans.values())
    return Cost(gpu_rate, len(spans), busy + len(spans) * idle_s, len(spans) * idle_s)


def lines(cost: Mapping[str, Any], *, billed_: bool) -> list[str]:
    """The summary lines of a cost's `to_json()`, aligned like the estimate's phase lines."""
    from clipexport.progress.text import clock

    what = "billed" if billed_ else "predicted"
    per_container = cost["idle_s"] / max(cost["containers"], 1)
    return [
        f"{'gpu':<12} {cost['gpu']} at ${cost['usd_per_hour']:.2f}/h (GPU ${cost['gpu_usd_per_hour']:.2f}, "
        f"CPU and memory ${cost['container_usd_per_hour']:.2f})",
        f"{'gpu time':<12} {clock(cost['gpu_s'])} {what}, {cost['containers']} container(s)",
        f"{'idle tail':<12} {clock(cost['idle_s'])} (${cost['idle_usd']:.2f}): each container stays up "
        f"{per_container:.0f} s after its last segment",
        f"{'cost':<12} ${cost['usd']:.2f} {what}",
    ]
