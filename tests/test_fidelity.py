"""Good inputs come out faithfully: real clips through the real render."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import pytest

from clipexport import cli
from clipexport.media import probe
from tests.clips import make_clip, read_index


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


def make_damaged(path: Path) -> Path:
    """30 frames (keyframe every 5) with 600 bytes overwritten a third of the way into the video data."""
    clip = make_clip(path.with_name("whole.mp4"), frames=30, width=64, height=36, audio=False, gop=5)
    data = bytearray(clip.read_bytes())
    start = data.find(b"mdat") + 8 + (len(data) - data.find(b"mdat")) // 3
    data[start:start + 600] = bytes((k * 7919) & 0xFF for k in range(start, start + 600))
    path.write_bytes(bytes(data))
    return path


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



def test_variable_frame_rate_keeps_its_last_frame_and_its_length(tmp_path, capsys):
    times = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.2]  # the last frame comes after a long hold
    clip = make_clip(tmp_path / "vfr.mkv", frame_times=times, width=64, height=36, audio=False)
    out = tmp_path / "out.mp4"

    code, _, stderr = run_main(["render", str(clip), "-o", str(out), "--scale", "2", "--progress", "none"], capsys)

    assert code == 0, stderr
    indices, _, _ = video_of(out)
    assert len(indices) == len(times) and indices[0] == 0 and indices[-1] == len(times) - 1
    with av.open(str(out)) as container:
        seconds = float(container.duration) / av.time_base
    assert 1.2 <= seconds <= 1.5  # the clip's real span, not 8 frames at a rate the header guessed
