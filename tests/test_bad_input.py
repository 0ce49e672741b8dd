"""Bad input: one line on stderr naming the problem, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipexport.cli import app
from tests.clips import make_bad_files, make_clip

runner = CliRunner()


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "good.mp4", frames=12, width=64, height=36, fps=24)


@pytest.fixture
def bad(tmp_path: Path) -> dict[str, Path]:
    return make_bad_files(tmp_path / "bad")


def assert_refused(result, *needles: str, home: Path, out: Path | None = None) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("clipexport: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.stderr and result.stdout == ""
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.stem}*"))
    assert not (home / "state" / "jobs").exists(), "a refused render must not create a job"


def render(*args: str):
    return runner.invoke(app, ["render", *args, "--progress", "none"])


def test_missing_input(tmp_path, clipexport_home):
    out = tmp_path / "out.mp4"
    assert_refused(render(str(tmp_path / "nope.mp4"), "-o", str(out)), "nope.mp4", home=clipexport_home, out=out)


@pytest.mark.parametrize("kind", ["text", "audio_only", "truncated", "empty"])
def test_unreadable_inputs(tmp_path, bad, kind, clipexport_home):
    out = tmp_path / "out.mp4"
    assert_refused(render(str(bad[kind]), "-o", str(out)), bad[kind].name, home=clipexport_home, out=out)


def test_unknown_model(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--model", "realesrgan-x8")
    assert_refused(result, "realesrgan-x8", "realesr-animevideov3", home=clipexport_home, out=out)


def test_scale_the_model_does_not_support(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--model", "realesrgan-x2plus", "--scale", "4")
    assert_refused(result, "realesrgan-x2plus", "2", home=clipexport_home, out=out)


def test_scale_that_is_not_2_or_4(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    assert_refused(render(str(clip), "-o", str(out), "--scale", "3"), "scale", home=clipexport_home, out=out)


def test_weights_that_do_not_fit_the_architecture(tmp_path, clip, clipexport_home):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "wrong.safetensors"
    save_file({"conv_first.weight": torch.zeros(8, 3, 3, 3)}, str(weights))
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--weights", str(weights))
    assert_refused(result, "wrong.safetensors", home=clipexport_home, out=out)


def test_missing_weights_file(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--weights", str(tmp_path / "none.pth"))
    assert_refused(result, "none.pth", home=clipexport_home, out=out)


def test_missing_output_directory(tmp_path, clip, clipexport_home):
    out = tmp_path / "no" / "such" / "out.mp4"
    assert_refused(render(str(clip), "-o", str(out)), "does not exist", home=clipexport_home)


def test_unwritable_output_directory(clip, clipexport_home):
    # /proc refuses new files even to root, unlike a chmod-ed directory.
    assert_refused(render(str(clip), "-o", "/proc/out.mp4"), "not writable", home=clipexport_home)


def test_output_suffix(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.gif"
    assert_refused(render(str(clip), "-o", str(out)), "out.gif", home=clipexport_home, out=out)


def test_trim_outside_the_clip(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--trim", "5-6")
    assert_refused(result, "good.mp4", "trim", home=clipexport_home, out=out)


def test_malformed_trim_and_crop(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    assert_refused(render(str(clip), "-o", str(out), "--trim", "abc"), "abc", home=clipexport_home, out=out)
    assert_refused(render(str(clip), "-o", str(out), "--crop", "64:36"), "64:36", home=clipexport_home, out=out)


def test_crop_outside_the_frame(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--crop", "64:36:10:0")
    assert_refused(result, "good.mp4", "crop", home=clipexport_home, out=out)


def test_trim_count_that_pairs_with_no_input(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    result = render(str(clip), str(clip), str(clip), "-o", str(out), "--trim", "0-0.2", "--trim", "0-0.3")
    assert_refused(result, "--trim", home=clipexport_home, out=out)
