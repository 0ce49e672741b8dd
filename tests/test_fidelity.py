"""Good inputs come out faithfully: real clips through the real render."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import pytest

from clipexport import cli
from clipexport.media import probe
from tests.clips import make_clip, make_damaged, read_index, strip_leading_timestamps


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def video_of(path: Path) -> tuple[list[int], tuple[int, int], Fraction]:
    """Frame indices, size and pixel aspect of an output's video."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        sar = Fraction(video.sample_aspect_ratio or 1)
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video)]
    return [read_index(i) for i in images], (images[0].shape[1], images[0].shape[0]), sar


def test_non_square_pixels_keep_the_display_aspect(tmp_path, capsys):
    """64x36 pixels twice as wide as high show as 128x36: x2 gives 256x72 square pixels, not a squeeze."""
    clip = make_clip(tmp_path / "anamorphic.mp4", frames=6, width=64, height=36, sar=Fraction(2), audio=False)
    assert probe(clip).sar == 2
    out = tmp_path / "out.mp4"

    args = ["render", str(clip), "-o", str(out), "--scale", "2", "--progress", "none", "--strict"]

    code, _, stderr = run_main(args, capsys)

    assert code == 0 and "could not be decoded" not in stderr, stderr  # a clean clip: nothing to report
    indices, size, sar = video_of(out)
    assert size == (256, 72) and sar in (0, 1)
    assert indices == list(range(6))  # the index bands sit where they were: no pillarbox, no squeeze


def audio_tracks_of(path: Path) -> list[tuple[str, float]]:
    """(codec, seconds of decoded samples) of each audio track."""
    tracks = []
    with av.open(str(path)) as container:
        for stream in container.streams.audio:
            samples = sum(f.samples for f in container.decode(stream))
            tracks.append((stream.codec_context.name, samples / stream.codec_context.sample_rate))
            container.seek(0)
    return tracks


@pytest.mark.parametrize("trim", [None, "0-0.25"], ids=["copied", "encoded"])
def test_every_audio_track_is_kept(trim, tmp_path, capsys):
    clip = make_clip(tmp_path / "two.mp4", frames=12, width=64, height=36, audio_tracks=2)
    out = tmp_path / "out.mkv"
    args = ["render", str(clip), "-o", str(out), "--scale", "2", "--progress", "none"]

    code, _, stderr = run_main(args + (["--trim", trim] if trim else []), capsys)

    assert code == 0, stderr
    seconds = 0.25 if trim else 0.5
    tracks = audio_tracks_of(out)
    assert len(tracks) == 2, tracks
    assert all(codec == "aac" and abs(length - seconds) < 0.05 for codec, length in tracks), tracks


def test_undecodable_frames_are_reported_once_and_fatal_with_strict(tmp_path, capsys):
    clip = make_damaged(tmp_path / "damaged.mp4")
    out = tmp_path / "out.mp4"
    args = ["render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "15", "--progress", "none"]

    code, _, stderr = run_main(args, capsys)

    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "could not be decoded" in line]
    assert len(warnings) == 1, stderr
    found = re.fullmatch(r"clipexport: warning: (\d+) frames could not be decoded \((\d\d:\d\d)–(\d\d:\d\d)\); "
                         r"they were repeated from the previous frame", warnings[0])
    assert found and 0 < int(found[1]) < 30 and found[2] <= found[3], warnings[0]
    assert len(video_of(out)[0]) == 30  # the output keeps its length (and its audio alignment)

    strict = tmp_path / "strict.mp4"  # the segments are reused; their damage is remembered beside them
    code, _, stderr = run_main([*args[:3], str(strict), *args[4:], "--strict"], capsys)

    assert code == 1, stderr
    [line] = [line for line in stderr.splitlines() if "could not be decoded" in line]
    assert line.startswith(f"clipexport: error: {found[1]} frames could not be decoded") and "--strict" in line
    assert not strict.exists()



def render_frames(clip: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[int], float, Fraction]:
    """Render `clip` x2 (strict: no frame may count as damaged); the output's frame indices, seconds and rate."""
    code, _, stderr = run_main(["render", str(clip), "-o", str(out), "--scale", "2", "--progress", "none",
                                "--strict"], capsys)
    assert code == 0, stderr
    with av.open(str(out)) as container:
        seconds = float(container.duration) / av.time_base
        rate = Fraction(container.streams.video[0].average_rate)
    return video_of(out)[0], seconds, rate


@pytest.mark.parametrize(("name", "times"), [
    ("hold.mkv", [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.2]),  # the last frame comes after a long hold
    ("hold.mp4", [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.2]),  # ... past the duration the .mp4's header gives
    ("burst.mp4", [0, 0.1, 0.2, 0.21, 0.22, 0.3, 0.4, 0.5]),  # three frames 10 ms apart
    ("screen.mkv", [k / 30 for k in range(15)] + [2.0]),  # 30 fps, then a pause: an average of 8 fps
])
def test_variable_frame_rate_keeps_every_frame_on_time(name, times, tmp_path, capsys):
    clip = make_clip(tmp_path / name, frame_times=times, width=64, height=36, audio=False)

    indices, seconds, rate = render_frames(clip, tmp_path / "out.mp4", capsys)

    assert sorted(set(indices)) == list(range(len(times))) and indices == sorted(indices), indices
    shown = {i: k / rate for k, i in reversed(list(enumerate(indices)))}  # when each frame first shows
    assert all(times[i] - 0.01 <= at <= times[i] + 2 / rate for i, at in shown.items()), (rate, shown)
    assert times[-1] < seconds <= times[-1] + 0.3, seconds  # the clip's real span, not frames at a guessed rate


def test_frames_without_timestamps_are_kept_in_place(tmp_path, capsys):
    """MPEG-TS whose first three video packets lost their timestamps; its audio stays in step."""
    clip = strip_leading_timestamps(make_clip(tmp_path / "cut.ts", frames=12, width=64, height=36), 3)
    out = tmp_path / "out.mp4"

    indices, seconds, _ = render_frames(clip, out, capsys)

    assert indices == list(range(12)) and seconds == pytest.approx(0.5, abs=0.05)
    [(codec, length)] = audio_tracks_of(out)
    assert length == pytest.approx(0.5, abs=0.05)


def test_raw_h264_renders_at_the_rate_its_stream_gives(tmp_path, capsys):
    clip = make_clip(tmp_path / "raw.h264", frames=12, fps=30, width=64, height=36, audio=False)
    out = tmp_path / "out.mp4"

    indices, seconds, rate = render_frames(clip, out, capsys)

    assert indices == list(range(12)) and seconds == pytest.approx(0.4, abs=0.05) and rate == 30


class _StopsAfter:
    """The real upscaler, raising once `after` frames came out: a run stopped mid-segment."""

    def __init__(self, inner, after: int) -> None:  # noqa: ANN001
        self.inner, self.after, self.scale, self.frames = inner, after, inner.scale, 0

    def stream(self, frames, *, batch: int | None = None):  # noqa: ANN001, ANN201
        for frame in self.inner.stream(frames, batch=batch):
            if self.frames == self.after:
                raise RuntimeError("stopped")
            self.frames += 1
            yield frame


def test_damage_in_fragments_kept_from_a_stopped_run_is_reported_again(tmp_path):
    """30 damaged frames at 24 fps: fragments of 24 and 6; stopped in the second, resumed after the first."""
    from clipexport.media import plan_clips, plan_segments
    from clipexport.upscale import load_upscaler
    from clipexport.worker import SegmentTask, run_segment

    plan = plan_clips([probe(make_damaged(tmp_path / "damaged.mp4"))], [None], [None])[0]
    task = SegmentTask("cx-test", plan_segments([plan.frames], 30)[0], plan, "segments/x.mp4")
    upscaler = load_upscaler("realesr-animevideov3", scale=2, device="cpu")
    [whole] = [e for e in run_segment(task, upscaler, tmp_path / "whole.mp4") if e["type"] == "phase_end"
               and e["phase"] == "encode"]
    assert any(k < 24 for k in whole["damaged"]), whole  # damage in the first fragment

    out = tmp_path / "stopped.mp4"
    with pytest.raises(RuntimeError, match="stopped"):
        list(run_segment(task, _StopsAfter(upscaler, 26), out))
    resumed = list(run_segment(task, upscaler, out))

    assert resumed[0]["done"] == 24  # the first fragment was kept, not redone
    assert resumed[-1]["type"] == "phase_end" and resumed[-1]["damaged"] == whole["damaged"]
