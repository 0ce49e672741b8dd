"""Small real clips for tests, generated with PyAV (no ffmpeg binary).

Import from a test module as ``from tests.clips import make_clip, read_index``
(``tests`` is a package).

Frame index pattern: with ``index_blocks=True`` frame ``i`` shows ``i mod 256``
in binary as 8 vertical bands across the full width, most significant bit on
the left, white for 1 and black for 0. Bands span the full height, so the
index survives compression, any upscale, a resize that keeps the aspect and a
crop that keeps the full width; :func:`read_index` samples the band centres
of a frame of any size.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

BITS = 8

_ENCODERS = {"h264": "libx264", "hevc": "libx265", "libx264": "libx264", "libx265": "libx265"}
_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".m4a": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
            ".ts": "mpegts", ".h264": "h264"}


def index_image(index: int, width: int, height: int) -> np.ndarray:
    """The RGB uint8 (height, width, 3) picture of frame ``index``."""
    img = np.zeros((height, width, 3), np.uint8)
    value = index % (1 << BITS)
    for band in range(BITS):
        if (value >> (BITS - 1 - band)) & 1:
            x0 = band * width // BITS
            x1 = (band + 1) * width // BITS
            img[:, x0:x1] = 255
    return img


def read_index(frame: np.ndarray) -> int:
    """Decode the index drawn by :func:`index_image` from a frame of any size (RGB or grey)."""
    arr = np.asarray(frame, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    height, width = arr.shape
    y0, y1 = height // 4, max(height // 4 + 1, 3 * height // 4)
    half = max(0, width // (BITS * 4))
    value = 0
    for band in range(BITS):
        cx = (2 * band + 1) * width // (2 * BITS)
        region = arr[y0:y1, max(0, cx - half) : cx + half + 1]
        value = (value << 1) | int(region.mean() > 127)
    return value


def _noise_image(index: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    base = rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((4, 4, 1), np.uint8))[:height, :width])


def _audio_frames(samples: int, rate: int, layout: str, tone: float, codec: str, tone_start: float = 0.0):
    channels = 1 if layout == "mono" else 2
    t = np.arange(samples) / rate
    wave = (0.3 * np.sin(2 * math.pi * tone * t) * (t >= tone_start)).astype(np.float32)
    data = np.repeat(wave[None, :], channels, axis=0)
    fmt = "flt" if codec in ("libopus", "opus") else "fltp"
    pos = 0
    while pos < samples:
        n = min(1024, samples - pos)
        chunk = data[:, pos : pos + n]
        if fmt == "flt":
            chunk = chunk.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = pos
        frame.time_base = Fraction(1, rate)
        yield frame
        pos += n


def make_clip(
    path: Path,
    *,
    frames: int = 24,
    width: int = 64,
    height: int = 36,
    fps: int | Fraction = 24,
    audio: bool = True,
    audio_rate: int = 48000,
    index_blocks: bool = True,
    codec: str = "h264",
    rotation: int = 0,
    frame_times: list[float] | None = None,
    audio_codec: str = "aac",
    audio_layout: str = "stereo",
    tone: float = 440.0,
    tone_start: float = 0.0,
    faststart: bool = False,
    gop: int | None = None,
    solid: int | None = None,
    sar: Fraction | None = None,
    audio_tracks: int = 1,
) -> Path:
    """Write a real clip to ``path`` (container from the suffix) and return the path.

    * ``index_blocks``: frames show their index (see :func:`read_index`), else noise.
    * ``audio``: a sine tone of exactly the video's duration (``frames / fps``,
      or the span of ``frame_times`` plus one average frame), ``audio_codec``
      (AAC by default; e.g. "libopus" in .mkv), silent before ``tone_start`` seconds.
    * ``rotation``: clockwise degrees a player must rotate the picture by
      (written as a display matrix), like a phone shooting portrait.
    * ``frame_times``: presentation time of each frame in seconds, for a
      variable-frame-rate clip (millisecond time base); ``frames`` is ignored.
    * ``gop``: keyframe interval (x264 ``keyint``), to make seeking matter.
    * ``solid``: every frame one flat grey of this value (overrides ``index_blocks``).
    * ``sar``: sample (pixel) aspect ratio written into the stream, e.g. 2 for
      pixels twice as wide as high (anamorphic video).
    * ``audio_tracks``: how many audio streams; track k plays ``tone * (k + 1)``.
    """
    path = Path(path)
    fps = Fraction(fps)
    fmt = _FORMATS.get(path.suffix.lower(), "mp4")
    options = {"movflags": "+faststart"} if faststart and fmt in ("mp4", "mov") else {}
    container = av.open(str(path), "w", format=fmt, options=options)
    stream = container.add_stream(_ENCODERS.get(codec, codec), rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    opts = {"preset": "veryfast", "crf": "20"}
    if gop:
        opts["g"] = str(gop)
        opts["keyint_min"] = str(gop)
    if codec in ("hevc", "libx265"):
        opts["x265-params"] = "log-level=error"
    stream.codec_context.options = opts
    if sar is not None:
        stream.codec_context.sample_aspect_ratio = Fraction(sar)
    if rotation:
        stream.set_display_rotation(-rotation)  # PyAV takes counter-clockwise degrees
    if frame_times is not None:
        tb = Fraction(1, 1000)
        stream.codec_context.time_base = tb
        stream.time_base = tb
        pts_list = [round(t * 1000) for t in frame_times]
        count = len(pts_list)
        avg = Fraction(round((frame_times[-1] - frame_times[0]) * 1000), 1000) / max(1, count - 1)
        duration = Fraction(pts_list[-1], 1000) + (avg if count > 1 else 1 / fps)
    else:
        stream.codec_context.time_base = 1 / fps
        pts_list = list(range(frames))
        count = frames
        duration = Fraction(frames) / fps
    astreams = []
    for _ in range(audio_tracks if audio else 0):
        astream = container.add_stream(audio_codec, rate=audio_rate, layout=audio_layout)
        astream.codec_context.bit_rate = 96000
        astreams.append(astream)
    def video_frames():
        for i in range(count):
            if solid is not None:
                img = np.full((height, width, 3), solid, np.uint8)
            else:
                img = index_image(i, width, height) if index_blocks else _noise_image(i, width, height)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = pts_list[i]
            frame.time_base = stream.codec_context.time_base
            yield frame

    _encode_all(container, stream, video_frames())
    for k, astream in enumerate(astreams):
        samples = round(duration * audio_rate)
        _encode_all(container, astream,
                    _audio_frames(samples, audio_rate, audio_layout, tone * (k + 1), audio_codec, tone_start))
    container.close()
    return path


def strip_leading_timestamps(path: Path, count: int) -> Path:
    """Clear the timestamps of the first ``count`` video packets of an MPEG-TS file, in place.

    Muxers refuse to write a packet without a timestamp, so the PES headers
    are edited: their PTS/DTS flags cleared, the bytes turned into stuffing
    (0xFF), which keeps every 188-byte packet the same length.
    """
    data = bytearray(Path(path).read_bytes())
    cleared = 0
    for off in range(0, len(data), 188):
        if cleared == count:
            break
        if data[off] != 0x47 or not data[off + 1] & 0x40 or not data[off + 3] & 0x10:
            continue  # not the start of a PES, or no payload
        p = off + 4 + (1 + data[off + 4] if data[off + 3] & 0x20 else 0)  # past the adaptation field
        if data[p:p + 3] != b"\x00\x00\x01" or not 0xE0 <= data[p + 3] <= 0xEF or not data[p + 7] & 0xC0:
            continue  # not a video PES with timestamps
        size = 5 if data[p + 7] & 0xC0 == 0x80 else 10
        data[p + 7] &= 0x3F
        data[p + 9:p + 9 + size] = b"\xff" * size
        cleared += 1
    Path(path).write_bytes(bytes(data))
    return Path(path)


def _encode_all(container: Any, stream: Any, frames: Any) -> None:
    """Encode and mux every frame, then flush the encoder."""
    for frame in frames:
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_audio_only(path: Path, *, seconds: float = 1.0, rate: int = 48000) -> Path:
    """An AAC-only file (no video stream)."""
    path = Path(path)
    container = av.open(str(path), "w", format=_FORMATS.get(path.suffix.lower(), "mp4"))
    astream = container.add_stream("aac", rate=rate, layout="stereo")
    _encode_all(container, astream, _audio_frames(round(seconds * rate), rate, "stereo", 440.0, "aac"))
    container.close()
    return path


def make_no_frames(path: Path) -> Path:
    """A Matroska file with a video track that holds no frame (and a little audio)."""
    path = Path(path)
    container = av.open(str(path), "w", format="matroska")
    stream = container.add_stream("libx264", rate=24)
    stream.width, stream.height, stream.pix_fmt = 64, 36, "yuv420p"
    astream = container.add_stream("aac", rate=48000, layout="stereo")
    _encode_all(container, astream, _audio_frames(48000 // 4, 48000, "stereo", 440.0, "aac"))
    container.close()
    return path


def make_damaged(path: Path) -> Path:
    """30 frames at 24 fps (keyframe every 5) with 600 bytes overwritten a third of the way into the video data."""
    clip = make_clip(path.with_name(f"whole-{path.name}"), frames=30, width=64, height=36, audio=False, gop=5)
    data = bytearray(clip.read_bytes())
    start = data.find(b"mdat") + 8 + (len(data) - data.find(b"mdat")) // 3
    data[start:start + 600] = bytes((k * 7919) & 0xFF for k in range(start, start + 600))
    path.write_bytes(bytes(data))
    return path


def _cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    src.unlink()
    return dst


class BadFiles(dict):
    """Paths of unusable inputs by kind: ``bad["text"]`` or ``bad.text``; ``.values()`` gives all.

    Kinds: ``text`` (a text file named .mp4), ``audio_only`` (AAC in .m4a, no
    video stream), ``truncated`` (an .mp4 with its index at the end, cut at
    half its bytes: it no longer opens), ``empty`` (0 bytes, named .mp4),
    ``truncated_index`` (a faststart .mp4, index at the front, cut at half:
    opens, its index points past the end), ``truncated_mkv`` (Matroska cut at
    half: opens, packets stop at half the header duration), ``no_frames``
    (Matroska whose video track holds no frame).
    """

    def __getattr__(self, name: str) -> Path:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def make_bad_files(directory: Path) -> BadFiles:
    """Write one of each kind of unusable input into ``directory`` (see :class:`BadFiles`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    text = d / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    return BadFiles(
        text=text,
        audio_only=make_audio_only(d / "voice.m4a"),
        truncated=_cut_in_half(make_clip(d / "full.mp4", frames=48, index_blocks=False), d / "truncated.mp4"),
        empty=empty,
        truncated_index=_cut_in_half(
            make_clip(d / "full_fs.mp4", frames=48, index_blocks=False, faststart=True), d / "truncated_index.mp4"
        ),
        truncated_mkv=_cut_in_half(make_clip(d / "full.mkv", frames=48, index_blocks=False), d / "truncated.mkv"),
        no_frames=make_no_frames(d / "no_frames.mkv"),
    )
