"""The cost of a Modal render: prices, the prediction before, the bill after, the lines shown."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipexport import cost
from clipexport.errors import UsageError


class Known:
    """A timing model with round numbers: 0.05 s a frame, a 20 s cold start, a 10 s model load."""

    class _Dist:
        def __init__(self, mean: float) -> None:
            self._mean = mean

        def mean(self) -> float:
            return self._mean

    def spf(self, features):
        assert features["gpu"] == "L4" and features["backend"] == "modal"
        return math.log(0.05), 0.3

    def cold_wait(self):
        return self._Dist(20.0)

    def load_time(self, features):
        return self._Dist(10.0)


def test_rate_is_the_gpu_plus_cpu_and_memory():
    r = cost.rate("L4")
    assert r.gpu == "L4" and r.gpu_per_h == 0.80
    assert r.container_per_h == pytest.approx(4 * 0.0473 + 8 * 0.008)
    assert cost.rate(None).gpu == cost.DEFAULT_GPU
    assert cost.rate("h100:2").gpu_per_h == pytest.approx(2 * 3.95)


def test_config_overrides_prices_and_adds_gpus():
    r = cost.rate("L4", {"L4": 0.5, "cpu_core": 0.0, "memory_gib": 0.0})
    assert (r.gpu_per_h, r.container_per_h) == (0.5, 0.0)
    assert cost.rate("MI300X", {"MI300X": 4.0}).gpu_per_h == 4.0
    with pytest.raises(UsageError, match="no price for GPU 'MI300X'"):
        cost.rate("MI300X")


def test_estimate_for_known_inputs():
    features = {"frames": 2400, "parallel": 3, "segments": 10}
    free = cost.rate("L4", {"cpu_core": 0.0, "memory_gib": 0.0})
    c = cost.estimate(features, Known(), free, idle_s=120)
    # 3 containers x (20 + 10 + 120) s + 2400 frames x 0.05 s
    assert (c.containers, c.gpu_s, c.idle_s) == (3, pytest.approx(570.0), 360.0)
    assert c.usd == pytest.approx(570 / 3600 * 0.80)
    assert cost.lines(c.to_json(), billed_=False) == [
        "gpu          L4 at $0.80/h (GPU $0.80, CPU and memory $0.00)",
        "gpu time     0:09:30 predicted, 3 container(s)",
        "idle tail    0:06:00 ($0.08): each container stays up 120 s after its last segment",
        "cost         $0.13 predicted",
    ]
    # fewer segments than --parallel: only as many containers as segments
    assert cost.estimate({"frames": 10, "parallel": 3, "segments": 1}, Known(), free, idle_s=0).containers == 1


def test_bill_from_container_spans():
    r = cost.rate("L4", {"cpu_core": 0.0, "memory_gib": 0.0})
    c = cost.billed({"ta-1": (1000.0, 1100.0), "ta-2": (1005.0, 1065.0)}, r, idle_s=120)
    assert (c.containers, c.gpu_s, c.idle_s) == (2, 400.0, 240.0)
    assert c.to_json() == {"gpu": "L4", "usd_per_hour": 0.8, "gpu_usd_per_hour": 0.8, "container_usd_per_hour": 0.0,
                           "containers": 2, "gpu_s": 400.0, "idle_s": 240.0,
                           "usd": round(400 / 3600 * 0.8, 4), "idle_usd": round(240 / 3600 * 0.8, 4)}
    assert cost.lines(c.to_json(), billed_=True)[-1] == "cost         $0.09 billed"


def test_the_summary_shows_gpu_time_billed_and_cost():
    from clipexport.progress.text import summary_parts
    from clipexport.progress.tracker import JobInfo, Snapshot

    snap = Snapshot(job="cx-1", state="done", fraction=1.0, elapsed=100.0, remaining_s=0.0, eta_text="", phases=(),
                    info=JobInfo(gpu_s=400.0, cost_usd=0.0889))
    parts = summary_parts(snap)
    assert parts[-2:] == ["0:06:40 GPU time billed", "$0.089"]


# -- render --estimate --backend modal: no token, no network --------------------------------


ROOT = Path(__file__).resolve().parent.parent


def _estimate(tmp_path: Path, *extra: str, config: str | None = None) -> subprocess.CompletedProcess:
    from tests.clips import make_clip

    clip = make_clip(tmp_path / "clip.mp4", frames=48, width=64, height=36)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "AWS_"))}
    env["HOME"] = str(tmp_path / "home")  # no ~/.modal.toml: no token
    if config is not None:
        (tmp_path / "config.toml").write_text(config)
        env["CLIPEXPORT_CONFIG"] = str(tmp_path / "config.toml")
    args = [sys.executable, "-m", "clipexport", "render", str(clip), "-o", str(tmp_path / "out.mp4"),
            "--backend", "modal", "--storage", "r2://bucket/prefix", "--segment-frames", "12", "--parallel", "2",
            "--estimate", *extra]
    return subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_estimate_on_modal_prints_cost_without_a_token(tmp_path):
    proc = _estimate(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[-4:]] == ["gpu", "gpu", "idle", "cost"]
    assert lines[-4].startswith("gpu          L4 at $1.05/h")
    assert lines[-2].endswith("each container stays up 120 s after its last segment")
    assert not (tmp_path / "out.mp4").exists()


def test_estimate_json_carries_the_cost_and_config_prices_apply(tmp_path):
    proc = _estimate(tmp_path, "--json", "--gpu", "A10G",
                     config="prices = {A10G = 2.0, cpu_core = 0.0, memory_gib = 0.0}\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    c = out["cost"]
    assert (c["gpu"], c["usd_per_hour"], c["containers"], c["idle_s"]) == ("A10G", 2.0, 2, 240.0)
    assert c["gpu_s"] > c["idle_s"] and c["usd"] == pytest.approx(c["gpu_s"] / 3600 * 2.0, abs=1e-3)
    assert set(out["phases"]) >= {"upload", "queue", "upscale"}
