"""`clipexport render` end to end on the local backend: real clips, real model.

Clips are 64x36 with their frame index drawn as large blocks, upscaled by
the converted realesr-animevideov3 weights; the output is decoded and every
frame's index read back, so a dropped, duplicated or reordered frame at a
segment or clip boundary fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
from typer.testing import CliRunner

from clipexport import events
from clipexport.cli import app
from clipexport.progress import Tracker
from tests.clips import make_clip, read_index

runner = CliRunner()


def render(*args: str):
    return runner.invoke(app, ["render", *args])


def decode(path: Path) -> tuple[list[int], tuple[int, int], float, float | None]:
    """Frame indices, size, video duration and audio duration of an output."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        indices, size = [], None
        for frame in container.decode(video):
            image = frame.to_ndarray(format="rgb24")
            size = (image.shape[1], image.shape[0])
            indices.append(read_index(image))
        rate = float(video.average_rate)
    with av.open(str(path)) as container:
        audio = None
        if container.streams.audio:
            samples = sum(f.samples for f in container.decode(container.streams.audio[0]))
            audio = samples / container.streams.audio[0].rate
    return indices, size, len(indices) / rate, audio


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=30, width=64, height=36, fps=24)


def test_single_clip_scale_2_keeps_every_frame_and_the_audio(tmp_path, clip):
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "12", "--progress", "plain")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "job cx-" in result.stderr
    indices, size, video_s, audio_s = decode(out)
    assert indices == list(range(30))
    assert size == (128, 72)
    assert audio_s is not None and abs(audio_s - video_s) <= 1 / 24


def test_scale_4_output_size(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=6, width=32, height=18, fps=24, audio=False)
    out = tmp_path / "out.mkv"
    result = render(str(clip), "-o", str(out), "--progress", "none")
    assert result.exit_code == 0, result.stderr
    indices, size, _, audio_s = decode(out)
    assert indices == list(range(6)) and size == (128, 72) and audio_s is None


def test_clips_join_in_order_and_the_second_is_brought_to_the_first(tmp_path):
    first = make_clip(tmp_path / "a.mp4", frames=20, width=64, height=36, fps=24)
    second = make_clip(tmp_path / "b.mp4", frames=15, width=96, height=54, fps=24)
    out = tmp_path / "joined.mp4"
    result = render(str(first), str(second), "-o", str(out), "--scale", "2", "--segment-frames", "8",
                    "--progress", "none")
    assert result.exit_code == 0, result.stderr
    indices, size, video_s, audio_s = decode(out)
    assert indices == list(range(20)) + list(range(15))
    assert size == (128, 72)
    assert abs(audio_s - video_s) <= 1 / 24


def test_trim_and_crop_pair_with_inputs(tmp_path):
    first = make_clip(tmp_path / "a.mp4", frames=48, width=64, height=36, fps=24)
    second = make_clip(tmp_path / "b.mp4", frames=24, width=64, height=36, fps=24)
    out = tmp_path / "trimmed.mp4"
    result = render(str(first), str(second), "-o", str(out), "--scale", "2",
                    "--trim", "0.5-1.5", "--trim", "-", "--crop", "64:36:0:0", "--progress", "none")
    assert result.exit_code == 0, result.stderr
    indices, _, video_s, audio_s = decode(out)
    assert indices == list(range(12, 36)) + list(range(24))
    assert abs(audio_s - video_s) <= 1 / 24


def test_json_events_follow_the_contract(tmp_path, clip):
    out = tmp_path / "out.mp4"
    result = render(str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "10", "--json")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for event in lines:
        events.validate_event(event)
    assert lines[0]["type"] == "plan" and lines[-1]["type"] == "done"
    assert lines[-1]["output"] == str(out)
    seqs = [e["seq"] for e in lines]
    assert seqs == sorted(set(seqs))
    tracker, fractions = Tracker(), []
    for event in lines:
        tracker.feed(event)
        fractions.append(tracker.snapshot(event["t"]).fraction)
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == 1.0 and max(fractions[:-1]) < 1.0
    parts = {e["part"] for e in lines if e["type"] == "phase_end" and e.get("phase") == "upscale" and "part" in e}
    assert parts == {"seg-0001", "seg-0002", "seg-0003"}


def test_existing_output_is_refused_without_force(tmp_path, clip):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    result = render(str(clip), "-o", str(out), "--scale", "2", "--progress", "none")
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = render(str(clip), "-o", str(out), "--scale", "2", "--progress", "none", "--force")
    assert result.exit_code == 0, result.stderr
    assert decode(out)[0] == list(range(30))


def test_a_second_render_reuses_finished_segments(tmp_path, clip):
    first = render(str(clip), "-o", str(tmp_path / "a.mp4"), "--scale", "2", "--segment-frames", "10", "--json")
    second = render(str(clip), "-o", str(tmp_path / "b.mp4"), "--scale", "2", "--segment-frames", "10", "--json")
    assert first.exit_code == 0 and second.exit_code == 0, second.stderr
    computed = [json.loads(line) for line in second.stdout.splitlines()]
    assert not [e for e in computed if e["type"] == "phase_start" and "part" in e]
    skipped = [e for e in computed if e.get("skipped")]
    assert {e["part"] for e in skipped} == {"seg-0001", "seg-0002", "seg-0003"}
    assert decode(tmp_path / "b.mp4")[0] == list(range(30))
