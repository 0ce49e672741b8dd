"""clipexport.media on real small clips made by tests/clips.py."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipexport import media
from clipexport.errors import ClipexportError, InputError, OutputError, UsageError
from clipexport.media import (
    ClipInfo,
    Crop,
    Segment,
    SegmentError,
    VideoWriter,
    concat_and_mux,
    parse_crop,
    parse_trim,
    plan_clips,
    plan_segments,
    probe,
    read_frames,
)
from tests.clips import index_image, make_bad_files, make_clip, read_index, strip_leading_timestamps

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clipdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="module")
def clip24(clipdir: Path) -> Path:
    """2 s at 24 fps, keyframe every 12 frames (so seeking matters), AAC stereo."""
    return make_clip(clipdir / "a24.mp4", frames=48, fps=24, gop=12)


@pytest.fixture(scope="module")
def clip30(clipdir: Path) -> Path:
    """1 s at 30 fps, no audio, keyframe every 7 frames."""
    return make_clip(clipdir / "b30.mp4", frames=30, fps=30, gop=7, audio=False)


@pytest.fixture(scope="module")
def clip_mkv(clipdir: Path) -> Path:
    """Matroska (1 ms timestamps, no nb_frames), Opus audio."""
    return make_clip(clipdir / "c.mkv", frames=36, fps=24, gop=10, audio_codec="libopus")


@pytest.fixture(scope="module")
def bad(clipdir: Path):
    return make_bad_files(clipdir / "bad")


def indices(plan, start: int, count: int) -> list[int]:
    return [read_index(f) for f in read_frames(plan, start, count)]


def one_plan(path: Path, trim=None, crop=None):
    return plan_clips([probe(path)], [trim], [crop])[0]


def decode_indices(path: Path) -> list[int]:
    with av.open(str(path)) as c:
        return [read_index(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def audio_seconds(path: Path) -> float:
    """Audio duration from the stream header, or by decoding where the header has none."""
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        if a.duration:
            return float(a.duration * a.time_base)
        return sum(f.samples for f in c.decode(audio=0)) / a.sample_rate


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(audio=0) if p.size]


def render(plans, workdir: Path, name: str, *, segment_frames: int = 10, scale: int = 2, **kw) -> Path:
    """The worker and finalize steps in miniature: read, 'upscale' by pixel repeat, encode, join."""
    paths = []
    for seg in plan_segments([p.frames for p in plans], segment_frames):
        plan = plans[seg.clip]
        w, h = plan.size[0] * scale, plan.size[1] * scale
        path = workdir / f"{name}-{seg.name}.mp4"
        with VideoWriter(path, w, h, plan.fps, preset="veryfast") as writer:
            for frame in read_frames(plan, seg.start, seg.count):
                writer.write(np.ascontiguousarray(frame.repeat(scale, 0).repeat(scale, 1)))
        paths.append(path)
    out = workdir / f"{name}{kw.pop('suffix', '.mp4')}"
    concat_and_mux(paths, plans, out, **kw)
    return out


# --------------------------------------------------------------------------- probe


def test_probe_mp4_fields(clip24: Path) -> None:
    info = probe(clip24)
    assert info.path == clip24
    assert (info.width, info.height) == (64, 36)
    assert info.fps == 24 and isinstance(info.fps, Fraction)
    assert info.frames == 48
    assert info.duration == pytest.approx(2.0, abs=1e-3)
    assert info.rotation == 0
    assert info.has_audio and info.audio_codec == "aac"
    assert info.codec == "h264"
    assert info.size_bytes == clip24.stat().st_size
    assert ClipInfo.from_dict(info.to_dict()) == info


def test_probe_mkv_counts_frames_by_demuxing(clip_mkv: Path) -> None:
    info = probe(clip_mkv)
    assert info.frames == 36
    assert info.fps == 24
    assert info.duration == pytest.approx(1.5, abs=0.01)
    assert info.audio_codec == "opus"


def test_probe_without_audio(clip30: Path) -> None:
    info = probe(clip30)
    assert (info.frames, info.fps, info.has_audio, info.audio_codec) == (30, 30, False, None)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_probe_rotation_swaps_display_size(tmp_path: Path, rotation: int) -> None:
    info = probe(make_clip(tmp_path / "r.mp4", frames=4, width=64, height=36, rotation=rotation, audio=False))
    assert info.rotation == rotation
    expect = (36, 64) if rotation in (90, 270) else (64, 36)
    assert (info.width, info.height) == expect


def test_probe_variable_frame_rate(tmp_path: Path) -> None:
    times = [0, 0.04, 0.1, 0.12, 0.2, 0.3, 0.33, 0.4]
    info = probe(make_clip(tmp_path / "vfr.mp4", frame_times=times))
    assert info.frames == len(times)
    assert 15 < info.fps < 22  # average rate
    assert info.duration == pytest.approx(float(info.frames / info.fps), rel=0.05)


@pytest.mark.parametrize(
    "kind,problem",
    [
        ("text", "not a readable video"),
        ("audio_only", "no video stream"),
        ("truncated", "not a readable video"),
        ("empty", "empty"),
        ("truncated_index", "truncated"),
        ("truncated_mkv", "truncated"),
        ("no_frames", "no frames"),
    ],
)
def test_probe_bad_inputs(bad, kind: str, problem: str) -> None:
    path = bad[kind]
    with pytest.raises(InputError) as err:
        probe(path)
    message = str(err.value)
    assert path.name in message and problem in message
    assert "\n" not in message
    assert err.value.exit_code == 2


def test_probe_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="gone.mp4: no such file"):
        probe(tmp_path / "gone.mp4")
    with pytest.raises(InputError, match="directory"):
        probe(tmp_path)


def test_bad_files_by_kind(bad) -> None:
    assert bad["text"] == bad.text
    assert all(isinstance(p, Path) and p.exists() for p in bad.values())


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,expect",
    [
        ("1.5-4", (1.5, 4.0)),
        ("0-10", (0.0, 10.0)),
        ("00:01-00:04.5", (1.0, 4.5)),
        ("1:02:03.5-1:02:04", (3723.5, 3724.0)),
        ("12-", (12.0, math.inf)),
        ("-4", (0.0, 4.0)),
        (" 2 - 3 ", (2.0, 3.0)),
        (".5-1.", (0.5, 1.0)),
    ],
)
def test_parse_trim_good(text: str, expect: tuple[float, float]) -> None:
    assert parse_trim(text) == expect


@pytest.mark.parametrize(
    "text", ["", "-", "4", "4-1", "2-2", "a-b", "1-2-3", "00:61-01:00", "1:60:00-2:00:00", "1..5-3", "--1"]
)
def test_parse_trim_bad(text: str) -> None:
    with pytest.raises(UsageError):
        parse_trim(text)


@given(st.integers(0, 10_000), st.integers(1, 10_000))
def test_parse_trim_property(start_ms: int, length_ms: int) -> None:
    a, b = start_ms / 1000, (start_ms + length_ms) / 1000
    assert parse_trim(f"{a}-{b}") == (a, b)
    m, s = divmod(a, 60)
    assert parse_trim(f"{int(m)}:{s:06.3f}-{b}") == pytest.approx((a, b))


def test_parse_crop() -> None:
    assert parse_crop("640:360:0:60") == Crop(640, 360, 0, 60)
    assert str(parse_crop(" 2:3:4:5 ")) == "2:3:4:5"
    for text in ["", "1:2:3", "1:2:3:4:5", "a:b:c:d", "-1:2:3:4", "0:10:0:0", "10:0:0:0", "1.5:2:3:4"]:
        with pytest.raises(UsageError):
            parse_crop(text)


# --------------------------------------------------------------------------- segments


def test_plan_segments_examples() -> None:
    segs = plan_segments([25, 10, 0, 3], 10)
    assert [(s.index, s.clip, s.start, s.count) for s in segs] == [
        (0, 0, 0, 10),
        (1, 0, 10, 10),
        (2, 0, 20, 5),
        (3, 1, 0, 10),
        (4, 3, 0, 3),
    ]
    assert segs[0].name == "seg-0001" and segs[4].name == "seg-0005"
    assert Segment(12344, 0, 0, 1).name == "seg-12345"
    with pytest.raises(ValueError):
        plan_segments([10], 0)


@given(st.lists(st.integers(0, 500), max_size=8), st.integers(1, 120))
def test_plan_segments_tile_each_clip(clip_frames: list[int], size: int) -> None:
    segs = plan_segments(clip_frames, size)
    assert [s.index for s in segs] == list(range(len(segs)))
    for clip, total in enumerate(clip_frames):
        mine = [s for s in segs if s.clip == clip]
        pos = 0
        for s in mine:
            assert s.start == pos and 1 <= s.count <= size
            pos += s.count
        assert pos == total
    assert [s.clip for s in segs] == sorted(s.clip for s in segs)


# --------------------------------------------------------------------------- planning


def test_plan_target_from_first_clip(clip24: Path, clip30: Path) -> None:
    a, b = probe(clip24), probe(clip30)
    plans = plan_clips([a, b], [None, None], [Crop(32, 18, 8, 4), None])
    assert all(p.size == (32, 18) and p.fps == 24 for p in plans)
    assert plans[0].frames == 48 and plans[0].trim is None
    assert plans[1].frames == 24  # 1 s of 30 fps at 24 fps
    assert media.ClipPlan.from_dict(plans[0].to_dict()) == plans[0]


def test_plan_trim(clip24: Path) -> None:
    plan = one_plan(clip24, trim=(0.5, 1.25))
    assert (plan.start_frame, plan.frames) == (12, 18)
    assert plan.trim == pytest.approx((0.5, 1.25))
    to_end = one_plan(clip24, trim=(1.5, math.inf))
    assert (to_end.start_frame, to_end.frames) == (36, 12)
    # A start inside a frame starts at that frame; an end half a frame past the clip is clamped.
    inside = one_plan(clip24, trim=(0.51, 2.01))
    assert (inside.start_frame, inside.frames) == (12, 36)


def test_plan_errors_name_the_file(clip24: Path) -> None:
    info = probe(clip24)
    cases = [
        ([(2.5, 3.0)], [None], "past the end"),
        ([(0.0, 3.0)], [None], "past the end"),
        ([None], [Crop(64, 36, 1, 0)], "outside"),
        ([None], [Crop(10, 40, 0, 0)], "outside"),
        ([None], [Crop(0, 10, 0, 0)], "empty"),
    ]
    for trims, crops, problem in cases:
        with pytest.raises(UsageError, match=problem) as err:
            plan_clips([info], trims, crops)
        assert clip24.name in str(err.value)


# --------------------------------------------------------------------------- reading


def test_read_all_frames_exact(clip24: Path) -> None:
    plan = one_plan(clip24)
    frames = list(read_frames(plan, 0, plan.frames))
    assert len(frames) == 48
    assert all(f.shape == (36, 64, 3) and f.dtype == np.uint8 and f.flags.c_contiguous for f in frames)
    assert [read_index(f) for f in frames] == list(range(48))


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 47), max_size=4, unique=True))
def test_read_frames_segment_boundaries(clip24: Path, cuts: list[int]) -> None:
    plan = one_plan(clip24)
    bounds = [0, *sorted(cuts), 48]
    got: list[int] = []
    for a, b in zip(bounds, bounds[1:]):
        got += indices(plan, a, b - a)
    assert got == list(range(48))


def test_read_frames_arguments(clip24: Path) -> None:
    plan = one_plan(clip24)
    assert list(read_frames(plan, 48, 0)) == []
    for start, count in [(-1, 2), (0, -1), (40, 9)]:
        with pytest.raises(ValueError):
            list(read_frames(plan, start, count))


def test_read_frames_mkv_rounded_timestamps(clip_mkv: Path) -> None:
    plan = one_plan(clip_mkv)
    assert indices(plan, 0, 13) + indices(plan, 13, 11) + indices(plan, 24, 12) == list(range(36))


def test_read_frames_trimmed(clip24: Path) -> None:
    plan = one_plan(clip24, trim=(0.5, 1.25))
    assert indices(plan, 0, 7) + indices(plan, 7, 11) == list(range(12, 30))


def test_fps_resampling_30_after_24(clip24: Path, clip30: Path) -> None:
    plan = plan_clips([probe(clip24), probe(clip30)], [None, None], [None, None])[1]
    assert plan.frames == 24
    got = indices(plan, 0, 10) + indices(plan, 10, 14)
    assert len(got) == 24
    assert got == [math.floor(k * 30 / 24) for k in range(24)]  # source frame on screen at k/24
    assert all(b > a for a, b in zip(got, got[1:]))


def test_fps_resampling_24_after_30_duplicates(clip24: Path, clip30: Path) -> None:
    plan = plan_clips([probe(clip30), probe(clip24)], [None, None], [None, None])[1]
    assert plan.frames == 60
    got = indices(plan, 0, 60)
    assert got == [math.floor(k * 24 / 30) for k in range(60)]


def shown_faithfully(got: list[int], times: list[float], fps: Fraction) -> bool:
    """Every frame shows, in order, never before its own time (a burst may show a little late)."""
    return (sorted(set(got)) == list(range(len(times))) and got == sorted(got)
            and all(times[i] <= k / fps + 1e-3 for k, i in enumerate(got)))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_keeps_every_frame(tmp_path: Path, suffix: str) -> None:
    """Frames closer together than one output frame (0.10, 0.12; 0.30, 0.33) are pushed apart, not dropped."""
    times = [0, 0.04, 0.1, 0.12, 0.2, 0.3, 0.33, 0.4]
    info = probe(make_clip(tmp_path / f"vfr{suffix}", frame_times=times, audio=False))
    assert info.crowded
    plan = plan_clips([info], [None], [None])[0]
    got = indices(plan, 0, plan.frames)
    assert shown_faithfully(got, times, plan.fps), got
    assert plan.frames <= len(times) + 2  # the pushes are taken back at the holds
    pieces = [i for start in range(0, plan.frames, 3) for i in indices(plan, start, min(3, plan.frames - start))]
    assert pieces == got  # segments read the same frames as one pass


def test_a_crowded_clip_is_not_read_again_from_its_start_for_every_segment(tmp_path: Path, monkeypatch) -> None:
    """Each segment of a crowded clip needs the frame times from the clip's start: kept, not read per segment."""
    import importlib

    probe_module = importlib.import_module("clipexport.media.probe")

    times = [round(0.1 * i + (0.02 if i % 5 == 3 else 0.0), 3) for i in range(120)]  # a burst every 5 frames
    info = probe(make_clip(tmp_path / "long.mp4", frame_times=times, audio=False))
    assert info.crowded
    plan = plan_clips([info], [None], [None])[0]
    segments = [(start, min(10, plan.frames - start)) for start in range(0, plan.frames, 10)]
    monkeypatch.setattr(probe_module, "_TIMES", {})
    fresh = []
    for start, count in segments:  # as before: every segment reads from the start to its end
        probe_module._TIMES.clear()
        fresh += indices(plan, start, count)
    probe_module._TIMES.clear()
    reads = []
    read = probe_module._read_times
    monkeypatch.setattr(probe_module, "_read_times", lambda *a: reads.append(a[2]) or read(*a))
    kept = [i for start, count in segments for i in indices(plan, start, count)]
    assert kept == fresh and sorted(set(kept)) == list(range(len(times)))  # the same frames, none lost
    assert len(segments) >= 12 and len(reads) <= 5, reads  # each read goes twice as far as the one before


def test_header_that_misstates_the_duration_is_measured(tmp_path: Path) -> None:
    """An .mp4 whose last frame lies past the duration its header gives (evenly spaced decode times)."""
    times = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.2]
    info = probe(make_clip(tmp_path / "hold.mp4", frame_times=times, audio=False))
    assert info.duration == pytest.approx(1.3, abs=0.01) and info.frames == 8
    assert info.pace == 10  # frames 0.1 s apart but for the pause: rendered at 10 fps, the pause repeats frame 6
    plan = plan_clips([info], [None], [None])[0]
    assert indices(plan, 0, plan.frames) == [0, 1, 2, 3, 4, 5, *[6] * 6, 7]


def test_frames_without_timestamps_keep_their_place(tmp_path: Path) -> None:
    """MPEG-TS whose first 3 video packets carry no timestamp: they come one frame apart before the 4th."""
    clip = strip_leading_timestamps(make_clip(tmp_path / "cut.ts", frames=30, gop=6, audio=False), 3)
    info = probe(clip)
    assert (info.frames, info.fps, info.duration) == (30, 24, pytest.approx(1.25))
    plan = plan_clips([info], [None], [None])[0]
    assert indices(plan, 0, 30) == list(range(30))
    assert [i for start in (0, 7, 19) for i in indices(plan, start, {0: 7, 7: 12, 19: 11}[start])] == list(range(30))


def test_raw_stream_runs_at_its_own_rate(tmp_path: Path) -> None:
    """A raw H.264 stream has no container timestamps: frames follow each other at the rate its SPS gives."""
    info = probe(make_clip(tmp_path / "raw.h264", frames=30, fps=30, gop=6, audio=False))
    assert (info.frames, info.fps, info.duration) == (30, 30, pytest.approx(1.0))
    plan = plan_clips([info], [None], [None])[0]
    assert [i for start in (0, 13) for i in indices(plan, start, 13 if start == 0 else 17)] == list(range(30))


def test_crop_and_resize(tmp_path: Path, clip24: Path) -> None:
    full = list(read_frames(one_plan(clip24), 0, 5))
    # A crop keeping the full width keeps the index readable.
    plan = one_plan(clip24, crop=Crop(64, 20, 0, 8))
    frames = list(read_frames(plan, 0, 5))
    assert frames[0].shape == (20, 64, 3)
    assert [read_index(f) for f in frames] == list(range(5))
    # Any crop is exactly a slice of the full frame.
    plan = one_plan(clip24, crop=Crop(30, 17, 21, 9))
    for f, ref in zip(read_frames(plan, 0, 5), full):
        assert np.array_equal(f, ref[9:26, 21:51])
    # A second clip of another size (same aspect) is scaled to the first's size.
    big = probe(make_clip(tmp_path / "big.mp4", frames=6, width=128, height=72, audio=False))
    plan = plan_clips([probe(clip24), big], [None, None], [None, None])[1]
    frames = list(read_frames(plan, 0, 6))
    assert all(f.shape == (36, 64, 3) for f in frames)
    assert [read_index(f) for f in frames] == list(range(6))


def test_other_aspect_is_letterboxed(tmp_path: Path, clip24: Path) -> None:
    square = probe(make_clip(tmp_path / "sq.mp4", frames=2, width=36, height=36, audio=False, index_blocks=False))
    plan = plan_clips([probe(clip24), square], [None, None], [None, None])[1]
    frame = next(read_frames(plan, 0, 1))
    assert frame.shape == (36, 64, 3)
    assert frame[:, :10].max() < 20 and frame[:, -10:].max() < 20  # black pillars
    assert frame[:, 20:44].mean() > 40  # picture in the middle


def test_rotation_is_applied(tmp_path: Path) -> None:
    info = probe(make_clip(tmp_path / "rot.mp4", frames=6, rotation=90, audio=False))
    plan = plan_clips([info], [None], [None])[0]
    frames = list(read_frames(plan, 0, 6))
    assert frames[0].shape == (64, 36, 3)
    # Rotating the upright picture back (counter-clockwise) gives the stored picture.
    assert [read_index(np.rot90(f, k=1)) for f in frames] == list(range(6))
    assert np.abs(np.rot90(frames[5], k=1).astype(int) - index_image(5, 64, 36)).mean() < 10


def test_short_file_repeats_last_frame(clip30: Path) -> None:
    info = dataclasses.replace(probe(clip30), frames=34)  # as if nb_frames lied by 4
    plan = plan_clips([info], [None], [None])[0]
    assert plan.frames == 34
    got = indices(plan, 25, 9)
    assert got == [25, 26, 27, 28, 29, 29, 29, 29, 29]


def test_seek_landing_late_falls_back_to_decoding_from_the_start(monkeypatch, clip24: Path) -> None:
    real_open = media.decode._open_input
    opened: list[Path] = []

    class LateSeeker:  # a demuxer whose seek lands half a second after the target
        def __init__(self, container) -> None:
            self._c = container

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self._c.close()

        def seek(self, offset: int, **kw) -> None:
            stream = kw.get("stream")
            if stream is not None and offset > 0:
                offset += int(Fraction(1, 2) / stream.time_base)
            self._c.seek(offset, **kw)

        def __getattr__(self, name: str):
            return getattr(self._c, name)

    def late_open(path: Path):
        opened.append(path)
        return LateSeeker(real_open(path))

    plan = one_plan(clip24)
    monkeypatch.setattr(media.decode, "_open_input", late_open)
    assert indices(plan, 20, 10) == list(range(20, 30))
    assert len(opened) == 2


def test_read_errors_become_input_errors(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "gone.mp4", frames=4, audio=False)
    plan = one_plan(path)
    path.write_text("not a video any more")
    with pytest.raises(InputError, match="gone.mp4"):
        list(read_frames(plan, 0, 4))


# --------------------------------------------------------------------------- writing


def test_video_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "seg.mp4"
    with VideoWriter(path, 128, 72, Fraction(24), preset="veryfast") as w:
        for i in range(20):
            w.write(index_image(i, 128, 72))
    assert w.close() == 20
    assert decode_indices(path) == list(range(20))
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        assert v.frames == 20 and v.codec_context.name == "h264"
        pts = sorted(p.pts for p in c.demux(v) if p.size)
        assert [p * v.time_base for p in pts] == [Fraction(i, 24) for i in range(20)]


def test_video_writer_hevc(tmp_path: Path) -> None:
    path = tmp_path / "seg.mp4"
    with VideoWriter(path, 128, 72, Fraction(30000, 1001), codec="hevc", preset="ultrafast") as w:
        for i in range(6):
            w.write(index_image(i, 128, 72))
    assert decode_indices(path) == list(range(6))
    info = probe(path)
    assert info.codec == "hevc" and info.fps == Fraction(30000, 1001) and info.frames == 6


def test_video_writer_odd_size_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    with VideoWriter(path, 65, 37, Fraction(24), preset="ultrafast") as w:
        assert w.encoded_size == (64, 36)
        w.write(index_image(3, 65, 37))
        with pytest.raises(ValueError):
            w.write(np.zeros((36, 64, 3), np.uint8))
    info = probe(path)
    assert (info.width, info.height, info.frames) == (64, 36, 1)
    # An exception inside `with` leaves no half-written file behind.
    broken = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(broken, 64, 36, Fraction(24)) as w:
            w.write(np.zeros((36, 64, 3), np.uint8))
            raise RuntimeError("worker died")
    assert not broken.exists()
    with pytest.raises(UsageError):
        VideoWriter(tmp_path / "x.mp4", 64, 36, Fraction(24), codec="vp9")


# --------------------------------------------------------------------------- concat and mux


def test_round_trip_single_clip_copies_audio(tmp_path: Path, clip24: Path) -> None:
    plans = [one_plan(clip24)]
    seen: list[tuple[int, int]] = []
    out = render(plans, tmp_path, "single", progress=lambda done, total: seen.append((done, total)))
    assert decode_indices(out) == list(range(48))
    info = probe(out)
    assert (info.width, info.height, info.frames, info.fps) == (128, 72, 48, 24)
    assert audio_packets(out) == audio_packets(clip24)  # copied, not re-encoded
    assert abs(audio_seconds(out) - 2.0) <= 1 / 24
    assert seen[-1] == (48, 48) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart


def test_round_trip_two_clips_aac_and_silence(tmp_path: Path, clip24: Path, clip30: Path) -> None:
    plans = plan_clips([probe(clip24), probe(clip30)], [None, None], [None, None])
    out = render(plans, tmp_path, "two", segment_frames=7)
    got = decode_indices(out)
    assert len(got) == 72
    assert got[:48] == list(range(48))
    assert got[48:] == [math.floor(k * 30 / 24) for k in range(24)]
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == "aac"
        rate = c.streams.audio[0].sample_rate
        pcm = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    assert audio_packets(out) != audio_packets(clip24)
    assert abs(audio_seconds(out) - 3.0) <= 1 / 24
    # The tone plays during clip 1; clip 2 (no audio) is silence.
    rms = lambda a, b: float(np.sqrt(np.mean(pcm[int(a * rate) : int(b * rate)] ** 2)))  # noqa: E731
    assert rms(0.1, 1.9) > 0.1
    assert rms(2.1, 2.9) < 0.01
    # Packets are interleaved, not all video then all audio.
    with av.open(str(out)) as c:
        kinds = [p.stream.type for p in c.demux() if p.size]
    assert "audio" in kinds[:12] and "video" in kinds[-12:]


@pytest.mark.parametrize("suffix,codec", [(".mkv", "opus"), (".mp4", "aac"), (".mov", "aac")])
def test_opus_source_copied_in_mkv_transcoded_in_mp4(tmp_path: Path, clip_mkv: Path, suffix: str, codec: str) -> None:
    out = render([one_plan(clip_mkv)], tmp_path, "opus", suffix=suffix)
    assert decode_indices(out) == list(range(36))
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == codec
    assert abs(audio_seconds(out) - 1.5) <= 1 / 24


def test_round_trip_trim(tmp_path: Path, clip24: Path) -> None:
    plans = [one_plan(clip24, trim=parse_trim("00:00.5-1.25"))]
    out = render(plans, tmp_path, "trim", suffix=".mkv")
    assert decode_indices(out) == list(range(12, 30))
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == "aac"  # trimmed: re-encoded
    assert abs(audio_seconds(out) - 0.75) <= 1 / 24


def test_trimmed_audio_is_aligned_with_the_video(tmp_path: Path) -> None:
    # 3 s clip, silent until 2.25 s; keep 2.0-2.75: the tone must start 0.25 s into the output.
    clip = make_clip(tmp_path / "late.mp4", frames=72, tone_start=2.25, gop=24)
    plans = [one_plan(clip, trim=(2.0, 2.75))]
    out = render(plans, tmp_path, "aligned", scale=1)
    assert decode_indices(out) == list(range(48, 66))
    with av.open(str(out)) as c:
        rate = c.streams.audio[0].sample_rate
        pcm = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    onset = int(np.argmax(np.abs(pcm) > 0.05)) / rate
    assert onset == pytest.approx(0.25, abs=0.01)
    assert abs(audio_seconds(out) - 0.75) <= 1 / 24


def test_trim_late_in_a_matroska_clip(tmp_path: Path) -> None:
    # Seeking (start > 1 s) by the Matroska cues, Opus decoded and re-encoded; tone from 1.25 s.
    clip = make_clip(tmp_path / "late.mkv", frames=48, gop=10, audio_codec="libopus", tone_start=1.25)
    plans = [one_plan(clip, trim=(1.125, 1.75))]
    assert (plans[0].start_frame, plans[0].frames) == (27, 15)
    out = render(plans, tmp_path, "mkvtrim", scale=1, segment_frames=6)
    assert decode_indices(out) == list(range(27, 42))
    assert abs(audio_seconds(out) - 0.625) <= 1 / 24
    with av.open(str(out)) as c:
        rate = c.streams.audio[0].sample_rate
        pcm = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    assert int(np.argmax(np.abs(pcm) > 0.05)) / rate == pytest.approx(0.125, abs=0.01)


def test_round_trip_no_audio_anywhere(tmp_path: Path, clip30: Path) -> None:
    out = render([one_plan(clip30)], tmp_path, "silent")
    with av.open(str(out)) as c:
        assert not c.streams.audio
    assert decode_indices(out) == list(range(30))


def test_container_hint_for_temporary_names(tmp_path: Path, clip30: Path) -> None:
    plan = one_plan(clip30)
    seg = tmp_path / "s.mp4"
    with VideoWriter(seg, 64, 36, plan.fps, preset="ultrafast") as w:
        for f in read_frames(plan, 0, 30):
            w.write(f)
    tmp = tmp_path / ".out.mkv.part-1234"
    concat_and_mux([seg], [plan], tmp)  # finds .mkv among the suffixes
    with av.open(str(tmp)) as c:
        assert c.format.name.startswith("matroska")
    odd = tmp_path / "out.tmp"
    with pytest.raises(OutputError):
        concat_and_mux([seg], [plan], odd)
    concat_and_mux([seg], [plan], odd, container_hint="mov")
    assert probe(odd).frames == 30


def test_segment_problems(tmp_path: Path, clip30: Path) -> None:
    plan = one_plan(clip30)
    segs = []
    for i, (w, h, n) in enumerate([(64, 36, 15), (64, 36, 15), (32, 18, 15)]):
        path = tmp_path / f"s{i}.mp4"
        with VideoWriter(path, w, h, plan.fps, preset="ultrafast") as writer:
            for k in range(n):
                writer.write(index_image(k, w, h))
        segs.append(path)
    out = tmp_path / "o.mp4"
    with pytest.raises(SegmentError, match="15 frames"):
        concat_and_mux(segs[:1], [plan], out)
    with pytest.raises(SegmentError, match="32x18"):
        concat_and_mux([segs[0], segs[2]], [plan], out)
    with pytest.raises(SegmentError, match="missing"):
        concat_and_mux([segs[0], tmp_path / "nope.mp4"], [plan], out)
    assert not out.exists()
    assert issubclass(SegmentError, ClipexportError)
    concat_and_mux(segs[:2], [plan], out)
    assert decode_indices(out) == list(range(15)) * 2
