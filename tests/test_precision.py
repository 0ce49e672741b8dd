"""--precision: chosen from the CPU's flags (read from fixture files here, never
the real CPU), validated before any job, in the plan and the segment keys, and
the default close enough to fp32 on a real clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from clipexport.cli import app
from clipexport.errors import UsageError
from clipexport.upscale import MODELS, load_upscaler, precision
from tests.clips import make_clip

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.mp4"

# Excerpts of real /proc/cpuinfo files: a Sapphire Rapids (AMX), a Cooper Lake
# (AVX512-BF16 and VNNI, no AMX), a Cascade Lake server (AVX-512 VNNI without
# bf16), an Alder Lake (AVX-VNNI), a Haswell (AVX2 only), an arm64 box.
CPUINFO = {
    "amx": "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8\n",
    "avx512_bf16": "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n",
    "cascadelake": "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n",
    "alderlake": "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx_vnni\n",
    "haswell": "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n",
    "arm64": "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes crc32 atomics\n",
}
ANIME, X4PLUS = MODELS["realesr-animevideov3"], MODELS["realesrgan-x4plus"]


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the flag reader at one of the fixture files; returns a setter."""

    def use(name: str) -> Path:
        path = tmp_path / f"cpuinfo-{name}"
        path.write_text(CPUINFO[name])
        monkeypatch.setattr(precision, "CPUINFO", path)
        return path

    return use


@pytest.mark.parametrize("name,expected", [("amx", "bf16"), ("avx512_bf16", "int8"), ("cascadelake", "int8"),
                                           ("alderlake", "int8"), ("haswell", "fp32"), ("arm64", "fp32")])
def test_auto_follows_the_cpu_flags(cpuinfo, name, expected):
    cpuinfo(name)
    assert precision.resolve("auto", "cpu", model=ANIME) == expected
    assert precision.resolve("auto", "cuda", model=ANIME) == "fp16"  # whatever the CPU
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    # int8 only where its quality was measured: not the RRDB nets, nor an unnamed model.
    assert precision.resolve("auto", "cpu", model=X4PLUS) == ("bf16" if name == "amx" else "fp32")
    assert precision.resolve("auto", "cpu") == ("bf16" if name == "amx" else "fp32")


def test_auto_falls_back_to_fp32_without_numba_and_int8_says_what_is_missing(cpuinfo, monkeypatch):
    cpuinfo("cascadelake")
    monkeypatch.setattr(precision, "_numba_installed", lambda: False)
    assert precision.resolve("auto", "cpu", model=ANIME) == "fp32"
    with pytest.raises(UsageError, match="precision int8 needs numba"):
        precision.resolve("int8", "cpu", model=ANIME)


def test_flags_are_read_from_the_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO["arm64"])
    assert "asimd" in precision.cpu_flags(path)
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()


def test_names_and_refusals():
    assert precision.normalise("BFloat16") == "bf16" and precision.normalise(" float32 ") == "fp32"
    with pytest.raises(UsageError, match="unknown precision 'int4'"):
        precision.normalise("int4")
    with pytest.raises(UsageError, match="fp16 does not run on the CPU"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(UsageError, match="int8 runs on the CPU only"):
        precision.resolve("int8", "cuda", model=ANIME)
    with pytest.raises(UsageError, match="int8 runs the compact models only .* not realesrgan-x4plus"):
        precision.resolve("int8", "cpu", model=X4PLUS)
    assert precision.resolve("int8", "cpu", model=MODELS["realesr-general-x4v3"]) == "int8"  # asked for: allowed


def _sample_frames(count: int) -> np.ndarray:
    with av.open(str(SAMPLE)) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(count * 20), container.decode(video=0))]
    return np.stack(frames[::20])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("flags,expected", [("amx", "bf16"), ("cascadelake", "int8")])
def test_the_default_precision_keeps_45_db_on_a_real_clip(cpuinfo, flags, expected):
    cpuinfo(flags)  # the default on such a CPU, emulated where this one lacks the instructions
    frames = _sample_frames(3)
    default = load_upscaler("realesr-animevideov3", device="cpu")
    fp32 = load_upscaler("realesr-animevideov3", device="cpu", precision="fp32")
    assert default.precision == expected
    got, ref = default.upscale(frames), fp32.upscale(frames)
    assert got.shape == ref.shape == (3, 360, 640, 3)
    assert 45.0 <= psnr(got, ref) < float("inf")  # close, and really another precision
    # int8 scales each frame to its own range: alone or batched, a frame comes out the same.
    assert np.array_equal(np.concatenate([default.upscale(frames[i : i + 1]) for i in range(3)]), got)


def test_int8_keeps_45_db_on_a_frame_of_small_sharp_text():
    """Sharp high-contrast detail is where int8 weights err most: rounded to the nearest step
    this frame got 40 dB; rounded by GPTQ (upscale/int8_weights.py) it keeps the floor."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (160, 90), (20, 30, 60))
    draw, font = ImageDraw.Draw(im), ImageFont.load_default(size=14)
    draw.text((5, 5), "Subtitle line one", fill=(255, 255, 255), font=font)
    draw.text((5, 40), "clipexport 0.2", fill=(250, 220, 40), font=font)
    frame = np.array(im)[None]
    got = load_upscaler("realesr-animevideov3", device="cpu", precision="int8").upscale(frame)
    ref = load_upscaler("realesr-animevideov3", device="cpu", precision="fp32").upscale(frame)
    assert 45.0 <= psnr(got, ref) < float("inf")


def test_int8_at_x2_tiled_and_odd_sized_stays_close_to_fp32(cpuinfo):
    cpuinfo("cascadelake")
    frames = _sample_frames(2)[:, :45, :81]  # odd height and width
    for kwargs in ({"scale": 2}, {"tile": 32}):
        got = load_upscaler("realesr-animevideov3", device="cpu", precision="int8", **kwargs).upscale(frames)
        ref = load_upscaler("realesr-animevideov3", device="cpu", precision="fp32", **kwargs).upscale(frames)
        assert got.shape == ref.shape and 45.0 <= psnr(got, ref) < float("inf"), kwargs


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_a_render_runs_and_reports_the_precision_its_plan_names(tmp_path, cpuinfo):
    clip = make_clip(tmp_path / "clip.mp4", frames=4, width=32, height=18, audio=False)
    runs = {}
    for name, flags in (("bf16", "amx"), ("int8", "cascadelake"), ("fp32", "haswell")):
        cpuinfo(flags)
        result = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / f"{name}.mp4"), "--device", "cpu",
                                     "--scale", "2", "--json"])
        assert result.exit_code == 0, result.stderr
        runs[name] = _events(result.stdout)
    for name, evs in runs.items():
        plan = evs[0]
        loaded = [e for e in evs if e["type"] == "phase_end" and e.get("phase") == "load_model"]
        assert plan["features"]["precision"] == name
        assert [e["precision"] for e in loaded] == [name]  # what the loaded model runs in
    # Same clip and settings but another precision: a new segment key, nothing reused.
    assert not any(e.get("skipped") for e in runs["fp32"] + runs["int8"])


def test_the_first_int8_render_on_a_machine_says_so_in_its_plan(tmp_path, cpuinfo, monkeypatch):
    """`int8_first`: the ETA's load prior then includes rounding the weights (and compiling the kernels)."""
    cpuinfo("cascadelake")
    monkeypatch.setenv("CLIPEXPORT_CACHE_DIR", str(tmp_path / "fresh-cache"))  # nothing rounded here yet
    clip = make_clip(tmp_path / "clip.mp4", frames=2, width=32, height=18, audio=False)
    plans = []
    for name in ("first", "second"):
        result = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / f"{name}.mp4"), "--device", "cpu",
                                     "--scale", "2", "--json"])
        assert result.exit_code == 0, result.stderr
        plans.append(_events(result.stdout)[0]["features"])
    assert plans[0]["precision"] == "int8" and plans[0].get("int8_first") is True
    assert "int8_first" not in plans[1]
    assert list((tmp_path / "fresh-cache" / "int8").glob("realesr-animevideov3-*-gptq1.npz"))


def test_bad_precision_is_refused_before_any_job(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "clip.mp4", frames=2, width=32, height=18, audio=False)
    for args, env, message in (
        (["--precision", "fp16", "--device", "cpu"], {}, "fp16 does not run on the CPU"),
        (["--precision", "int4"], {}, "'int4'"),
        (["--precision", "int8", "--device", "cpu", "--model", "realesrgan-x4plus"], {}, "compact models only"),
        ([], {"CLIPEXPORT_PRECISION": "fp16", "CLIPEXPORT_DEVICE": "cpu"}, "fp16 does not run on the CPU"),
        ([], {"CLIPEXPORT_CPU_DTYPE": "float16", "CLIPEXPORT_DEVICE": "cpu"}, "fp16 does not run on the CPU"),
    ):
        with monkeypatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            result = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / "out.mp4"), *args])
        assert result.exit_code == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert runner.invoke(app, ["jobs", "--json"]).stdout.strip() in ("", "[]")
    assert not (tmp_path / "out.mp4").exists()


def test_estimate_says_which_precision_would_run(tmp_path, cpuinfo):
    cpuinfo("amx")
    clip = make_clip(tmp_path / "clip.mp4", frames=2, width=32, height=18, audio=False)
    result = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / "o.mp4"), "--device", "cpu", "--estimate"])
    assert result.exit_code == 0, result.stderr
    assert "precision    bf16" in result.stdout
    result = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / "o.mp4"), "--device", "cpu", "--estimate",
                                 "--precision", "fp32"])
    assert "precision    fp32" in result.stdout
