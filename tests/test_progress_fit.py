"""`eta fit` recovers the rates the logs were made with; replay does not look ahead."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from clipexport.progress import TimingModel, fit_logs, load_model, replay_traces
from clipexport.progress import model as model_mod
from clipexport.progress.model import Dist, probe_seconds

from .test_progress_synth import JobSpec, write_log

UPLOAD = 3e6
DOWNLOAD = 12e6
SPF = {"T4": 0.08, "L4": 0.04}  # per frame at 640x360, x4, animevideov3
BPF = 60_000.0


def _specs() -> list[JobSpec]:
    specs = []
    for i in range(12):
        gpu = "T4" if i % 2 else "L4"
        warm = (i % 3 != 0, False)
        specs.append(JobSpec(
            job=f"cx-fit{i:02d}", t0=1_700_000_000.0 + 10_000 * i, gpu=gpu,
            frames=240 + 120 * (i % 4), segment_frames=120, parallel=2,
            input_bytes=10_000_000 + 2_000_000 * i, upload_rate=UPLOAD, download_rate=DOWNLOAD,
            spf=SPF[gpu], bytes_per_frame=BPF, warm=warm, cold_s=20.0 + 2 * i, load_s=4.0 + 0.2 * i,
        ))
    return specs


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("logs")
    return [write_log(d / f"{s.job}.jsonl", s) for s in _specs()]


@pytest.fixture(scope="module")
def fitted(logs) -> TimingModel:
    return fit_logs(logs)


def test_fit_recovers_upload_and_download_throughput(fitted):
    mu, _ = fitted.upload_rate(20_000_000)
    assert math.exp(mu) == pytest.approx(UPLOAD, rel=0.05)
    mu, _ = fitted.download_rate(UPLOAD)
    assert math.exp(mu) == pytest.approx(DOWNLOAD, rel=0.05)


def test_fit_recovers_time_per_frame_by_gpu(fitted):
    for gpu, spf in SPF.items():
        features = {"gpu": gpu, "model": "realesr-animevideov3", "scale": 4, "in_width": 640, "in_height": 360}
        mu, _ = fitted.spf(features)
        assert math.exp(mu) == pytest.approx(spf, rel=0.05)
        # per pixel: twice the pixels, twice the time
        mu2, _ = fitted.spf(dict(features, in_width=1280))
        assert math.exp(mu2 - mu) == pytest.approx(2.0, rel=0.01)


def test_fit_recovers_waits_output_size_and_cold_start_odds(fitted):
    cold = fitted.cold_wait()
    assert cold.q[0] == pytest.approx(20.0, abs=0.5) and cold.q[-1] == pytest.approx(42.0, abs=0.5)
    assert fitted.warm_wait().q[-1] == pytest.approx(1.5, abs=0.1)
    # first container warm in 8 of 12 jobs, a second one never
    assert fitted.p_warm(1) == pytest.approx(8 / 12, abs=0.01)
    assert fitted.p_warm(2) == pytest.approx(0.0, abs=0.01)
    mu, _ = fitted.bytes_per_frame({"out_width": 2560, "out_height": 1440})
    assert math.exp(mu) == pytest.approx(BPF, rel=0.02)
    load = fitted.load_time({"backend": "modal", "model": "realesr-animevideov3"})
    assert 4.0 <= load.mean() <= 6.2
    assert fitted.finalize_time({"backend": "modal"}, 0.0) == pytest.approx(0.5, abs=0.05)


def test_model_round_trips_through_json(fitted, tmp_path):
    path = tmp_path / "model.json"
    fitted.save(path)
    assert TimingModel.load(path) == fitted
    assert json.loads(path.read_text())["format"] == "clipexport-timing-model"
    assert path.stat().st_size < 20_000  # a small file


def test_load_model_prefers_the_path_then_the_users_model_then_the_default(fitted, tmp_path, monkeypatch):
    user = tmp_path / "user" / "timing-model.json"
    monkeypatch.setattr(model_mod, "user_model_path", lambda: user)
    assert load_model() == TimingModel.default()
    fitted.save(user)
    assert load_model() == fitted
    other = tmp_path / "other.json"
    TimingModel.generic().save(other)
    assert load_model(other) == TimingModel.generic()
    user.write_text("{not json")
    assert load_model() == TimingModel.default()  # a damaged user model never stops a job
    with pytest.raises(ValueError, match="not a clipexport timing model"):
        TimingModel.load(_bad(tmp_path))


def _bad(tmp_path: Path) -> Path:
    p = tmp_path / "bad.json"
    p.write_text('{"format": "something else"}')
    return p


def test_a_fit_from_few_logs_keeps_the_builtin_priors_for_the_rest(fitted):
    f = {"gpu": "H100", "model": "realesrgan-x4plus", "scale": 4, "in_width": 1280, "in_height": 720}
    assert fitted.spf(f) == TimingModel.default().spf(f)
    assert fitted.load_time({"backend": "local", "model": "realesrgan-x4plus"}).q  # a section the logs lack


def test_refit_with_a_base_keeps_what_the_logs_do_not_say(logs):
    base = TimingModel.default()
    refit = fit_logs(logs[:2], base=base)
    # GPUs the user never used keep the built-in prior
    f = {"gpu": "H100", "model": "realesrgan-x4plus", "scale": 4, "in_width": 1280, "in_height": 720}
    assert refit.spf(f)[0] == pytest.approx(base.spf(f)[0], abs=1e-6)
    # the user's own line moves the upload prior towards it
    assert abs(refit.upload_rate(2e7)[0] - math.log(UPLOAD)) < abs(base.upload_rate(2e7)[0] - math.log(UPLOAD))


def test_default_model_is_complete():
    m = TimingModel.default()
    for section in ("upload", "download", "output", "queue", "load_model", "upscale", "encode", "finalize"):
        assert section in m.data, section
    assert {"A10", "H100", "L4", "T4", "cpu", "rtx4090"} <= set(m.data["upscale"]["gpu"])


def test_dist_conditions_on_time_waited():
    d = Dist([10.0, 20.0, 30.0])  # uniform on [10, 30]
    assert d.mean() == pytest.approx(20.0)
    assert d.remaining(0.0) == pytest.approx(20.0)
    assert d.remaining(20.0) == pytest.approx(5.0)
    assert d.survival(25.0) == pytest.approx(0.25)
    assert d.remaining(60.0) == pytest.approx(12.0)  # past everything seen: a share of the wait


def test_replay_of_a_truncated_trace_matches_the_whole_up_to_the_cut(logs, tmp_path):
    whole = logs[1]
    lines = whole.read_text().splitlines()
    cut = tmp_path / whole.name
    cut.write_text("\n".join(lines[: len(lines) // 3]) + "\n")
    model = TimingModel.default()
    full = list(replay_traces([whole], model))
    part = list(replay_traces([cut], model))
    assert len(full) == len(lines) and len(part) == len(lines) // 3
    assert part == full[: len(part)]
    assert set(full[0]) == {"trace", "seq", "t", "fraction", "remaining_s", "remaining_lo_s", "remaining_hi_s"}
    assert full[-1]["fraction"] == 1.0 and full[-1]["remaining_s"] == 0.0
    assert all(a["fraction"] <= b["fraction"] for a, b in zip(full, full[1:]))


def test_replay_is_fast_and_does_not_import_torch(logs):
    import sys

    start = time.perf_counter()
    n = sum(1 for _ in replay_traces(logs, TimingModel.default()))
    assert n > 1000
    assert time.perf_counter() - start < 5.0
    if os.environ.get("CLIPEXPORT_CHECK_TORCH", "1") == "1":
        import subprocess

        code = (
            "import sys; from clipexport.progress import replay_traces, TimingModel, fit_logs;"
            "from clipexport.progress.display import make_display; assert 'torch' not in sys.modules"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("name", "key"),
    [("H100", "H100"), ("h100", "H100"), ("H100-80GB", "H100"), ("H100 SXM", "H100"), ("A10G", "A10"),
     ("RTX 4090", "rtx4090"), ("A100", "A100"), ("L40S", "L40S"), ("", "")],
)
def test_gpu_names_are_matched_loosely(name, key):
    from clipexport.progress.model import match_gpu

    assert match_gpu(name, {"H100": 0, "A10": 0, "rtx4090": 0, "L4": 0}) == key


def test_an_unknown_gpu_gets_the_generic_prior_with_a_wide_spread():
    m = TimingModel.default()
    f = {"gpu": "A100", "model": "realesr-animevideov3", "scale": 4, "in_width": 1280, "in_height": 720}
    mu, sd = m.spf(f)
    mu_l4, sd_l4 = m.spf(dict(f, gpu="L4"))
    assert sd > 2 * sd_l4
    assert math.isfinite(mu)


def test_the_output_size_follows_how_busy_the_input_is(tmp_path):
    """Jobs whose inputs take more bytes per pixel encode to more bytes per frame: the fit learns it."""
    logs = []
    for i in range(12):
        busy = 2.0 ** (i % 4)  # input bytes per pixel, relative
        logs.append(write_log(tmp_path / f"{i}.jsonl", JobSpec(
            job=f"cx-busy{i:02d}", t0=1_700_000_000.0 + 10_000 * i, frames=240, segment_frames=120,
            input_bytes=int(5e6 * busy), bytes_per_frame=40_000.0 * busy ** 0.5)))
    fitted = fit_logs(logs)
    plain = {"scale": 4, "in_width": 640, "in_height": 360, "frames": 240, "out_width": 2560, "out_height": 1440}
    for busy in (1.0, 8.0):
        mu, sd = fitted.bytes_per_frame({**plain, "input_bytes": 5e6 * busy})
        assert math.exp(mu) == pytest.approx(40_000.0 * busy ** 0.5, rel=0.05)
        assert sd < 0.2
    mu, _ = fitted.bytes_per_frame({k: v for k, v in plain.items() if k != "frames"})  # input size unknown
    assert math.exp(mu) == pytest.approx(40_000.0 * 2.0 ** 0.75, rel=0.25)  # the mean of all jobs


def test_the_builtin_cpu_prior_goes_with_the_cores_a_job_gets():
    """Measured with 2 threads on real renders: 8 cores predict a quarter of the time, a GPU is unaffected."""
    model = TimingModel.default()
    f = {"gpu": "cpu", "model": "realesr-animevideov3", "scale": 2, "in_width": 160, "in_height": 90}
    two, eight, unknown = (model.spf({**f, "threads": n})[0] for n in (2, 8, None))
    assert eight == pytest.approx(two - math.log(4)) and unknown == two
    gpu = {**f, "gpu": "L4"}
    assert model.spf({**gpu, "threads": 8}) == model.spf(gpu)


def test_the_builtin_cpu_prior_knows_int8_runs_faster_than_fp32():
    """Measured on real renders (the whole upscale phase): int8 takes about three quarters of fp32's time."""
    model = TimingModel.default()
    f = {"gpu": "cpu", "model": "realesr-animevideov3", "scale": 4, "in_width": 160, "in_height": 96, "threads": 2}
    fp32, int8, unknown = (model.spf({**f, "precision": p})[0] for p in ("fp32", "int8", None))
    assert math.exp(int8 - fp32) == pytest.approx(0.75, abs=0.03) and unknown == fp32
    gpu = {**f, "gpu": "L4"}
    assert model.spf({**gpu, "precision": "int8"}) == model.spf(gpu)  # a CPU term only


def test_the_builtin_cpu_load_is_the_weights_then_the_probe_at_the_jobs_frame_size():
    """On a CPU the load phase is mostly the speed probe, so it goes with the frame size; a GPU keeps its prior."""
    model = TimingModel.default()
    f = {"backend": "local", "gpu": "cpu", "model": "realesr-animevideov3", "scale": 2, "threads": 2}
    small, big = (model.load_time({**f, "in_width": w, "in_height": h}) for w, h in ((160, 90), (854, 480)))
    spf_small, spf_big = (math.exp(model.spf({**f, "in_width": w, "in_height": h})[0]) for w, h in ((160, 90), (854, 480)))
    assert small.mean() - probe_seconds(spf_small) == pytest.approx(big.mean() - probe_seconds(spf_big))
    assert small.mean() < 1.0 < big.mean()
    assert probe_seconds(0.05) == pytest.approx(0.05 * 4) and probe_seconds(2.0) == pytest.approx(2.0 * 2)
    gpu = {**f, "gpu": "L4", "in_width": 160, "in_height": 90}
    assert model.load_time(gpu).mean() == model.load_time({**gpu, "in_width": 854, "in_height": 480}).mean()


def test_the_builtin_cpu_load_includes_preparing_int8_the_first_time():
    """A plan whose load will round the weights and compile the kernels (`int8_first`) waits 7.5 s more on 2 cores."""
    model = TimingModel.default()
    f = {"backend": "local", "gpu": "cpu", "model": "realesr-animevideov3", "scale": 2, "threads": 2,
         "precision": "int8", "in_width": 160, "in_height": 90}
    ready, first = model.load_time(f).mean(), model.load_time({**f, "int8_first": True}).mean()
    assert first - ready == pytest.approx(7.5)
    assert model.load_time({**f, "int8_first": True, "threads": 8}).mean() - model.load_time(
        {**f, "threads": 8}).mean() == pytest.approx(7.5 / 4)
    busy = {**f, "cpu_busy": 1.0}  # one of the two cores taken: half the speed (`cpu_load_term`)
    assert model.load_time({**busy, "int8_first": True}).mean() - model.load_time(busy).mean() == pytest.approx(15.0)


def test_a_load_that_first_prepared_int8_is_not_learned_as_the_machines_load_time(tmp_path):
    """`int8_first`: that load also rounded the weights and compiled the kernels, once per machine.
    Fitted from it, the next plan's load prior was 8 s where loads take 0.5 (seen with `--estimate`)."""
    def log(name: str, load_s: float, first: bool) -> Path:
        spec = JobSpec(job=f"cx-{name}", backend="local", gpu="cpu", width=160, height=90, frames=48,
                       segment_frames=24, load_s=load_s, warm=(True,))
        path = write_log(tmp_path / f"{name}.jsonl", spec)
        if first:
            lines = path.read_text().splitlines()
            plan = json.loads(lines[0])
            plan["features"]["int8_first"] = True
            path.write_text("\n".join([json.dumps(plan), *lines[1:]]) + "\n")
        return path

    f = {"backend": "local", "gpu": "cpu", "model": "realesr-animevideov3", "scale": 4, "threads": 2,
         "in_width": 160, "in_height": 90}
    # Only that job: the built-in `local|cpu` prior (the weights' read, then the probe) still holds.
    assert fit_logs([log("a", 9.0, first=True)]).load_time(f).mean() < 1.0
    # With an ordinary job beside it, the user's own load is the ordinary one's.
    both = fit_logs([log("b", 9.0, first=True), log("c", 2.0, first=False)])
    assert both.load_time(f).mean() == pytest.approx(2.0, rel=0.05)
