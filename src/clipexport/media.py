"""Media: probe clips, plan segments, decode frames, encode segments, concat and mux.

Everything here uses PyAV (FFmpeg in-process); no ``ffmpeg`` binary, no torch.
Every PyAV error is translated at this boundary into a :mod:`clipexport.errors`
exception whose message is one line naming the file:

* problems with an input clip -> :class:`~clipexport.errors.InputError`;
* problems writing a segment or the output -> :class:`~clipexport.errors.OutputError`;
* an unreadable or mismatched segment file handed to :func:`concat_and_mux`
  -> :class:`SegmentError` (a :class:`~clipexport.errors.ClipexportError`).

Conventions used throughout
---------------------------

*Time origin.* A clip's time 0 is the presentation time of its first video
frame (``stream.start_time``); audio is aligned on the same container clock.

*Frame rate, VFR.* ``ClipInfo.fps`` is the stream's *average* rate. Output is
always constant frame rate at the first clip's average rate: output frame
``k`` of a clip shows the source frame on screen at source time
``T0 + k / fps_target`` (the last frame whose pts is at or before that time,
with a tolerance of min(1/4 source frame, one time-base tick) for pts
rounding in containers such as Matroska). Frames are chosen by their pts,
never by counting, so variable-frame-rate input becomes CFR by duplicating or
dropping frames, and a clip at another rate is resampled the same way.

*Rotation.* ``ClipInfo.rotation`` is the clockwise rotation (0/90/180/270)
needed to display the frame upright, read from the display matrix (what the
legacy ``rotate`` tag meant; FFmpeg's ``av_display_rotation_get`` returns the
negative of it). Width/height in :class:`ClipInfo` are display sizes, crops
are given in display coordinates, and :func:`read_frames` returns upright frames.
Non-square sample aspect ratios are not corrected (pixels are taken as square).

*Odd sizes.* Crops and planned sizes may be odd (the upscaler multiplies them
by 2 or 4, which makes them even). :class:`VideoWriter` needs even sizes for
yuv420p: given an odd width or height it drops the last column/row (documented
on the class) instead of failing.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np

from .errors import ClipexportError, InputError, OutputError, UsageError

__all__ = [
    "ClipInfo",
    "ClipPlan",
    "Crop",
    "Segment",
    "SegmentError",
    "VideoWriter",
    "concat_and_mux",
    "parse_crop",
    "parse_trim",
    "plan_clips",
    "plan_segments",
    "probe",
    "read_frames",
]

# PyAV raises its own FFmpegError tree, plus OSError/EOFError subclasses and, for
# odd metadata or arguments, ValueError/RuntimeError/TypeError.
_AV_ERRORS: tuple[type[BaseException], ...] = (
    av.error.FFmpegError,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
)

# Demuxers whose container duration comes from a header or an index (not
# estimated from the bit rate), so "packets end far before it" means truncation.
_HEADER_DURATION_FORMATS = ("matroska", "webm", "mov", "mp4", "avi", "flv", "asf", "nut", "mxf")

# Container names accepted for the output, from a suffix or a hint.
_OUTPUT_FORMATS = {
    "mp4": "mp4",
    "m4v": "mp4",
    "mov": "mov",
    "mkv": "matroska",
    "matroska": "matroska",
}

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


class SegmentError(ClipexportError):
    """A segment file is missing, unreadable, or does not match the others or the plan."""


# --------------------------------------------------------------------------- helpers


def _reason(exc: BaseException) -> str:
    """One-line description of a (PyAV) exception, without the file name."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _seconds(value: Fraction | float) -> str:
    return f"{float(value):.3f}".rstrip("0").rstrip(".") + "s"


# --------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ClipInfo:
    """What :func:`probe` learned about one clip (see the module docstring for conventions)."""

    path: Path
    width: int  # display size: rotation applied (90/270 swap)
    height: int
    fps: Fraction  # average frame rate
    frames: int  # exact number of video frames (packets) in the file
    duration: float  # video duration in seconds
    rotation: int  # clockwise degrees to display upright: 0, 90, 180, 270
    has_audio: bool
    audio_codec: str | None
    size_bytes: int
    codec: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (fps as "num/den")."""
        return {
            "path": str(self.path),
            "width": self.width,
            "height": self.height,
            "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "frames": self.frames,
            "duration": self.duration,
            "rotation": self.rotation,
            "has_audio": self.has_audio,
            "audio_codec": self.audio_codec,
            "size_bytes": self.size_bytes,
            "codec": self.codec,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipInfo:
        return cls(
            path=Path(data["path"]),
            width=int(data["width"]),
            height=int(data["height"]),
            fps=Fraction(data["fps"]),
            frames=int(data["frames"]),
            duration=float(data["duration"]),
            rotation=int(data["rotation"]),
            has_audio=bool(data["has_audio"]),
            audio_codec=data.get("audio_codec"),
            size_bytes=int(data["size_bytes"]),
            codec=str(data["codec"]),
        )


def _video_stream(container: Any) -> Any | None:
    for stream in container.streams.video:
        if not (int(stream.disposition) & int(av.stream.Disposition.attached_pic)):
            return stream
    return None


def _frame_rate(stream: Any) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def _index_past_eof(container: Any, size: int) -> bool:
    """True when a stream's sample index points past the end of the file.

    MP4/MOV (and AVI with an idx1) carry the byte offset of every sample in the
    header: a file cut short keeps its index, and its last samples lie beyond
    the file's size. Only the last few entries of each stream are checked.
    """
    for stream in container.streams:
        entries = stream.index_entries
        n = len(entries)
        if n == 0:
            continue
        for entry in entries[max(0, n - 16) : n]:
            if entry.pos >= 0 and entry.pos + max(entry.size, 0) > size:
                return True
    return False


def _count_by_demux(path: Path, container: Any, vindex: int) -> tuple[int, Fraction | None, Fraction | None]:
    """Demux every packet (no decoding): video frame count, video span, end of all streams.

    Returns (frames, video_duration_seconds, last_end_seconds_relative_to_container_start).
    Raises InputError when demuxing fails part way (truncated or corrupt file).
    """
    frames = 0
    vfirst: Fraction | None = None
    vend: Fraction | None = None
    all_end: Fraction | None = None
    try:
        for packet in container.demux():
            if packet.size == 0:
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            tb = packet.time_base
            if ts is not None and tb is not None:
                start = ts * tb
                end = (ts + max(packet.duration or 0, 0)) * tb
                all_end = end if all_end is None else max(all_end, end)
            else:
                start = end = None
            if packet.stream_index == vindex and not packet.is_discard:
                frames += 1
                if start is not None:
                    vfirst = start if vfirst is None else min(vfirst, start)
                    vend = end if vend is None else max(vend, end)
    except _AV_ERRORS as exc:
        raise InputError(
            f"{path}: corrupt or truncated video, reading failed after {frames} frames ({_reason(exc)})"
        ) from exc
    vdur = (vend - vfirst) if (vfirst is not None and vend is not None) else None
    if all_end is not None and container.start_time is not None:
        all_end -= Fraction(container.start_time, av.time_base)
    return frames, vdur, all_end


def probe(path: Path) -> ClipInfo:
    """Read a clip's properties; raise :class:`InputError` (one line naming the file) if unusable.

    Frame count: ``nb_frames`` from the header is trusted only when it agrees
    (within one frame) with stream duration x average rate *and* the container
    has a complete per-sample index (MP4/MOV, AVI) that was checked against the
    file size. Otherwise packets are counted by demuxing the whole file (no
    decoding; Matroska, MPEG-TS, ...).

    Truncation/corruption rule, documented here because it is a judgement call:

    * the container cannot be opened or demuxing fails part way -> corrupt;
    * a sample index entry points past the end of the file -> truncated
      (MP4/MOV with the index at the front, AVI);
    * when packets are counted and the container's duration comes from its
      header (Matroska, MP4, AVI, FLV, ...), the last packet ends more than
      max(3 frames, 2 % of the duration) before that duration -> truncated.

    The first video frame is decoded to read the rotation (display matrix) and
    to prove the stream decodes.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a video file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({_reason(exc)})") from exc
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not a video")
    try:
        return _probe(path, size)
    except ClipexportError:
        raise
    except Exception as exc:  # the last line of defence: no traceback for a bad file
        raise InputError(f"{path}: not a readable video ({_reason(exc)})") from exc


def _open_input(path: Path) -> Any:
    try:
        return av.open(str(path), metadata_errors="replace")
    except _AV_ERRORS as exc:
        raise InputError(f"{path}: not a readable video ({_reason(exc)})") from exc


def _probe(path: Path, size: int) -> ClipInfo:
    with _open_input(path) as container:
        v = _video_stream(container)
        if v is None:
            if container.streams.audio:
                raise InputError(f"{path}: no video stream (audio only)")
            raise InputError(f"{path}: no video stream")
        ctx = v.codec_context
        codec = ctx.name if ctx is not None else (v.codec.name if v.codec else "unknown")
        fps = _frame_rate(v)
        if fps is None:
            raise InputError(f"{path}: video stream has no frame rate")
        audio = container.streams.audio[0] if container.streams.audio else None
        has_audio = audio is not None and audio.codec_context is not None
        audio_codec = audio.codec_context.name if has_audio else None
        vindex = v.index
        coded_w, coded_h = (ctx.width, ctx.height) if ctx is not None else (0, 0)

        if _index_past_eof(container, size):
            raise InputError(f"{path}: truncated video (its index points past the end of the file)")

        tb = v.time_base
        stream_dur = Fraction(v.duration) * tb if (v.duration and tb) else None
        nb = v.frames or 0
        index_complete = len(v.index_entries) >= nb > 0
        frames: int
        duration: Fraction | None
        if nb > 0 and stream_dur is not None and index_complete and abs(nb - stream_dur * fps) <= 1:
            frames, duration = nb, stream_dur
        else:
            frames, vdur, all_end = _count_by_demux(path, container, vindex)
            duration = stream_dur or vdur
            header = container.duration
            fmt = container.format.name if container.format else ""
            if (
                frames > 0
                and header
                and all_end is not None
                and any(name in fmt for name in _HEADER_DURATION_FORMATS)
            ):
                header_s = Fraction(header, av.time_base)
                tolerance = max(3 / fps, header_s / 50)
                if header_s - all_end > tolerance:
                    raise InputError(
                        f"{path}: truncated video (data ends at {_seconds(all_end)} "
                        f"of {_seconds(header_s)})"
                    )
        if frames == 0:
            raise InputError(f"{path}: the video stream has no frames")
        if duration is None or duration <= 0:
            duration = Fraction(frames) / fps

    # Decode the first frame in a fresh container: proves decodability, gives rotation.
    with _open_input(path) as container:
        v = _video_stream(container)
        first = None
        try:
            for packet in container.demux(v):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    continue
                if decoded:
                    first = decoded[0]
                    break
            if first is None:
                decoded = v.decode(None) if v.codec_context is not None else []
                first = decoded[0] if decoded else None
        except _AV_ERRORS as exc:
            raise InputError(f"{path}: cannot decode the video ({_reason(exc)})") from exc
        if first is None:
            raise InputError(f"{path}: the video stream has no decodable frames")
        ccw = first.rotation or 0
        rotation = int(round(-float(ccw) / 90.0)) * 90 % 360
        width, height = coded_w or first.width, coded_h or first.height
    if rotation in (90, 270):
        width, height = height, width
    return ClipInfo(
        path=path,
        width=int(width),
        height=int(height),
        fps=fps,
        frames=int(frames),
        duration=float(duration),
        rotation=rotation,
        has_audio=has_audio,
        audio_codec=audio_codec,
        size_bytes=size,
        codec=codec,
    )


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Crop:
    """A crop rectangle in display coordinates (after rotation)."""

    width: int
    height: int
    x: int
    y: int

    def __str__(self) -> str:
        return f"{self.width}:{self.height}:{self.x}:{self.y}"


_CROP_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_crop(text: str) -> Crop:
    """Parse ``"W:H:X:Y"`` (non-negative integers, W and H positive) into a :class:`Crop`."""
    m = _CROP_RE.match(text or "")
    if not m:
        raise UsageError(f"bad crop {text!r}: expected W:H:X:Y in pixels, e.g. 640:360:0:60")
    w, h, x, y = (int(g) for g in m.groups())
    if w == 0 or h == 0:
        raise UsageError(f"bad crop {text!r}: width and height must be positive")
    return Crop(w, h, x, y)


_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SECONDS_RE = re.compile(rf"^{_NUM}$")
_TIMECODE_RE = re.compile(rf"^(?:(\d+):)?(\d+):({_NUM})$")


def _parse_time(part: str, text: str) -> float:
    part = part.strip()
    if _SECONDS_RE.match(part):
        return float(part)
    m = _TIMECODE_RE.match(part)
    if m:
        hours, minutes, seconds = m.group(1), int(m.group(2)), float(m.group(3))
        if seconds >= 60 or (hours is not None and minutes >= 60):
            raise UsageError(f"bad trim {text!r}: {part!r} is not a valid timecode")
        return (int(hours) if hours else 0) * 3600 + minutes * 60 + seconds
    raise UsageError(
        f"bad trim {text!r}: {part!r} is neither seconds (12.5) nor a timecode ([H:]MM:SS[.ff])"
    )


def parse_trim(text: str) -> tuple[float, float]:
    """Parse ``"START-END"`` into seconds.

    Each side is seconds (``1.5``) or a timecode (``00:01``, ``1:02:03.5``).
    An empty END (``"5-"``) means "to the end" and gives ``math.inf``; an empty
    START (``"-4"``) means 0. Raises UsageError on bad syntax or END <= START.
    """
    raw = (text or "").strip()
    if raw.count("-") != 1:
        raise UsageError(f"bad trim {text!r}: expected START-END, e.g. 1.5-4 or 00:01-00:04.5")
    start_s, end_s = raw.split("-")
    if not start_s.strip() and not end_s.strip():
        raise UsageError(f"bad trim {text!r}: give at least START or END")
    start = _parse_time(start_s, text) if start_s.strip() else 0.0
    end = _parse_time(end_s, text) if end_s.strip() else math.inf
    if not end > start:
        raise UsageError(f"bad trim {text!r}: END must be after START")
    return (start, end)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ClipPlan:
    """One input as it enters the output timeline.

    ``start_frame`` is the index of the first source frame on the *average
    rate grid* (exact for CFR; for VFR it stands for the time
    ``start_frame / info.fps``). ``frames`` counts OUTPUT frames at ``fps``.
    ``trim`` is the source time range actually used, snapped to frames:
    ``(start_frame / info.fps, that + frames / fps)``, or None when untrimmed.
    """

    info: ClipInfo
    start_frame: int
    frames: int
    crop: Crop | None
    size: tuple[int, int]
    fps: Fraction
    trim: tuple[float, float] | None

    @property
    def start_time(self) -> Fraction:
        """Source time (seconds from the first frame) of output frame 0."""
        return Fraction(self.start_frame) / self.info.fps

    @property
    def duration(self) -> Fraction:
        """Output duration of this clip in seconds (exact)."""
        return Fraction(self.frames) / self.fps

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": self.info.to_dict(),
            "start_frame": self.start_frame,
            "frames": self.frames,
            "crop": None if self.crop is None else [self.crop.width, self.crop.height, self.crop.x, self.crop.y],
            "size": list(self.size),
            "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "trim": None if self.trim is None else list(self.trim),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipPlan:
        crop = data.get("crop")
        trim = data.get("trim")
        return cls(
            info=ClipInfo.from_dict(data["info"]),
            start_frame=int(data["start_frame"]),
            frames=int(data["frames"]),
            crop=None if crop is None else Crop(*(int(v) for v in crop)),
            size=(int(data["size"][0]), int(data["size"][1])),
            fps=Fraction(data["fps"]),
            trim=None if trim is None else (float(trim[0]), float(trim[1])),
        )


_EPS = Fraction(1, 10**6)  # in frames: guards float error at exact frame boundaries


def plan_clips(
    infos: list[ClipInfo],
    trims: list[tuple[float, float] | None],
    crops: list[Crop | None],
) -> list[ClipPlan]:
    """Place each clip on the output timeline.

    The output size and fps are the first clip's (after its crop). Other clips
    are resampled to that fps by pts (module docstring) and scaled to fit that
    size keeping their aspect ratio, centred on black (letterbox/pillarbox)
    when the aspect differs; when it matches this is a plain resize.

    A clip contributes ``ceil((END - T0) * fps)`` output frames, where T0 is
    the trim start snapped down to a source frame and END the trim end (or the
    clip end, ``frames / fps_source``). So an untrimmed clip at the target rate
    contributes exactly its frame count; a trim END may exceed the clip end by
    half a frame (rounding) and is clamped.

    Raises UsageError naming the file when a trim lies outside the clip or
    selects no frames, or a crop is empty or outside the (display) frame.
    """
    if not infos:
        raise UsageError("no input clips")
    if not (len(infos) == len(trims) == len(crops)):
        raise ValueError("plan_clips: infos, trims and crops must have the same length")

    for info, crop in zip(infos, crops):
        if crop is None:
            continue
        if crop.width <= 0 or crop.height <= 0:
            raise UsageError(f"{info.path}: crop {crop} is empty")
        if crop.x < 0 or crop.y < 0 or crop.x + crop.width > info.width or crop.y + crop.height > info.height:
            raise UsageError(f"{info.path}: crop {crop} lies outside the {info.width}x{info.height} frame")

    first, first_crop = infos[0], crops[0]
    size = (first_crop.width, first_crop.height) if first_crop else (first.width, first.height)
    fps_t = first.fps

    plans: list[ClipPlan] = []
    for info, trim, crop in zip(infos, trims, crops):
        fps_s = info.fps
        clip_end = Fraction(info.frames) / fps_s
        if trim is None:
            start_frame = 0
            end = clip_end
        else:
            a, b = trim
            if not (math.isfinite(a) and a >= 0) or math.isnan(b) or not (b > a):
                raise UsageError(f"{info.path}: bad trim {_seconds(a)}-{_seconds(b)}")
            if Fraction(a) >= clip_end:
                raise UsageError(
                    f"{info.path}: trim start {_seconds(a)} is past the end of the clip ({_seconds(clip_end)})"
                )
            if math.isinf(b):
                end = clip_end
            else:
                if Fraction(b) > clip_end + Fraction(1, 2) / fps_s:
                    raise UsageError(
                        f"{info.path}: trim end {_seconds(b)} is past the end of the clip ({_seconds(clip_end)})"
                    )
                end = min(Fraction(b), clip_end)
            start_frame = math.floor(Fraction(a) * fps_s + _EPS)
        t0 = Fraction(start_frame) / fps_s
        frames = math.ceil((end - t0) * fps_t - _EPS)
        if frames <= 0:
            raise UsageError(f"{info.path}: trim selects no frames")
        used = None if trim is None else (float(t0), float(t0 + Fraction(frames) / fps_t))
        plans.append(
            ClipPlan(info=info, start_frame=start_frame, frames=frames, crop=crop, size=size, fps=fps_t, trim=used)
        )
    return plans


@dataclass(frozen=True)
class Segment:
    """A run of output frames of one clip: the unit of work."""

    index: int  # global, 0-based, in output order
    clip: int  # index into the plans
    start: int  # first output frame within the clip's output numbering
    count: int

    @property
    def name(self) -> str:
        """``seg-0001`` (1-based, at least 4 digits)."""
        return f"seg-{self.index + 1:04d}"


def plan_segments(clip_frames: list[int], segment_frames: int) -> list[Segment]:
    """Cut each clip into segments of ``segment_frames`` (the last one of a clip shorter).

    Segments never cross a clip boundary; a clip of 0 frames gets none.
    """
    if segment_frames <= 0:
        raise ValueError("segment_frames must be positive")
    segments: list[Segment] = []
    for clip, total in enumerate(clip_frames):
        if total < 0:
            raise ValueError("clip frame counts must be non-negative")
        for start in range(0, total, segment_frames):
            segments.append(Segment(len(segments), clip, start, min(segment_frames, total - start)))
    return segments


# --------------------------------------------------------------------------- decoding


def _fit(src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int, int, int]:
    """Scaled size and offset of ``src`` fitted inside ``dst`` keeping aspect: (w, h, x, y)."""
    sw, sh = src
    dw, dh = dst
    if sw * dh == sh * dw or abs(sw * dh - sh * dw) <= 0.01 * sw * dh:
        return dw, dh, 0, 0
    if sw * dh > sh * dw:  # wider: full width, bars top and bottom
        w, h = dw, max(1, round(sh * dw / sw))
    else:
        w, h = max(1, round(sw * dh / sh)), dh
    return w, h, (dw - w) // 2, (dh - h) // 2


def _resize(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    src_h, src_w = arr.shape[:2]
    interpolation = "AREA" if (width < src_w and height < src_h) else "BICUBIC"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
    return frame.reformat(width=width, height=height, interpolation=interpolation).to_ndarray()


class _Converter:
    """Decoded frame -> upright, cropped, fitted RGB array at the plan's size."""

    def __init__(self, plan: ClipPlan) -> None:
        self.rotation = plan.info.rotation
        self.crop = plan.crop
        self.size = plan.size
        src = (plan.crop.width, plan.crop.height) if plan.crop else (plan.info.width, plan.info.height)
        self.src_size = src
        self.fit = _fit(src, plan.size) if src != plan.size else None

    def __call__(self, frame: Any) -> np.ndarray:
        kwargs: dict[str, Any] = {"format": "rgb24"}
        if frame.color_range == 2:  # full-range YUV tagged as such
            kwargs["src_color_range"] = 2
        arr = frame.to_ndarray(**kwargs)
        if self.rotation:
            arr = np.rot90(arr, k=-(self.rotation // 90))  # negative k: clockwise
        if self.crop is not None:
            c = self.crop
            arr = arr[c.y : c.y + c.height, c.x : c.x + c.width]
        if arr.shape[1] != self.src_size[0] or arr.shape[0] != self.src_size[1]:
            # The stream changed size mid-way (or the display size lied): fit what we got.
            self.fit = _fit((arr.shape[1], arr.shape[0]), self.size)
        if self.fit is not None:
            w, h, x, y = self.fit
            scaled = _resize(arr, w, h)
            if (w, h) == self.size:
                arr = scaled
            else:
                canvas = np.zeros((self.size[1], self.size[0], 3), np.uint8)
                canvas[y : y + h, x : x + w] = scaled
                arr = canvas
        return np.ascontiguousarray(arr)


def read_frames(plan: ClipPlan, start: int, count: int) -> Iterator[np.ndarray]:
    """Yield exactly ``count`` RGB uint8 frames (H, W, 3), output frames ``start..start+count-1``.

    Frames are upright (rotation applied), cropped, and at ``plan.size``.
    Frame exact: seeks to the keyframe at or before the time of output frame
    ``start`` (falling back to decoding from the beginning if the demuxer
    lands after it), decodes forward and picks frames by pts, so reading
    ``[0, n)`` then ``[n, m)`` gives exactly the frames of ``[0, m)``.

    If the file holds fewer decodable frames than planned (a header that
    lied, a damaged tail), the last decoded frame is repeated to make up
    ``count``: the output keeps its planned length and its audio alignment.
    Packets the decoder rejects are skipped, as FFmpeg does; a demux failure
    raises InputError naming the file.
    """
    if start < 0 or count < 0 or start + count > plan.frames:
        raise ValueError(f"read_frames: frames {start}..{start + count} outside the clip's {plan.frames}")
    if count == 0:
        return
    path = plan.info.path
    try:
        yield from _read_frames(plan, start, count)
    except ClipexportError:
        raise
    except _AV_ERRORS as exc:
        raise InputError(f"{path}: cannot read frames ({_reason(exc)})") from exc


def _read_frames(plan: ClipPlan, start: int, count: int) -> Iterator[np.ndarray]:
    path = plan.info.path
    convert = _Converter(plan)
    t0 = plan.start_time
    fps_t = plan.fps
    first_target = t0 + Fraction(start) / fps_t

    for attempt in (0, 1):
        with _open_input(path) as container:
            v = _video_stream(container)
            if v is None:
                raise InputError(f"{path}: no video stream")
            v.codec_context.thread_type = "AUTO"
            tb = Fraction(v.time_base)
            tol = min(Fraction(1, 4) / plan.info.fps, tb)
            origin = v.start_time
            if origin is None:
                origin = _first_pts(container, v)
                container.seek(0, backward=True)
                v.codec_context.flush_buffers()
            seek_pts = origin + math.floor(first_target / tb)
            sought = attempt == 0 and first_target > 0 and seek_pts > origin
            if sought:
                container.seek(seek_pts, stream=v, backward=True)
            elif attempt == 1 and origin != 0:
                container.seek(origin, stream=v, backward=True)

            k = start
            end = start + count
            cand = None  # the latest frame at or before the current target
            cand_s: Fraction | None = None
            cand_arr: np.ndarray | None = None
            cand_used = False
            restart = False
            for frame in _decode(container, v, path):
                s = (Fraction(frame.pts) - origin) * tb if frame.pts is not None else (
                    cand_s + 1 / plan.info.fps if cand_s is not None else Fraction(0)
                )
                if cand_s is not None and s <= cand_s:
                    continue  # non-increasing pts: a damaged or duplicate frame
                if cand is None and s > first_target + tol:
                    if sought:
                        restart = True  # the seek landed after the target: decode from the start
                        break
                    # Decoding from the start and the first decodable frame comes late
                    # (leading frames lost): it stands in for the times before it.
                    cand, cand_s = frame, s
                while k < end and s > t0 + Fraction(k) / fps_t + tol:
                    if cand_arr is None:
                        cand_arr = convert(cand)
                    yield cand_arr.copy() if cand_used else cand_arr
                    cand_used = True
                    k += 1
                if k >= end:
                    break
                if cand is not frame:
                    cand, cand_s, cand_arr, cand_used = frame, s, None, False
            if restart:
                continue
            if cand is None:
                raise InputError(f"{path}: no decodable video frames where frame {start} was expected")
            # End of stream: the remaining targets show the last frame (see docstring).
            while k < end:
                if cand_arr is None:
                    cand_arr = convert(cand)
                yield cand_arr.copy() if cand_used else cand_arr
                cand_used = True
                k += 1
            return


def _first_pts(container: Any, v: Any) -> int:
    for frame in container.decode(v):
        if frame.pts is not None:
            return int(frame.pts)
    return 0


def _decode(container: Any, v: Any, path: Path) -> Iterator[Any]:
    """Decode the video stream, skipping packets the decoder rejects."""
    for packet in container.demux(v):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            continue
        yield from frames


# --------------------------------------------------------------------------- encoding

_VIDEO_CODECS = {
    "h264": ("libx264", 18),
    "libx264": ("libx264", 18),
    "avc": ("libx264", 18),
    "hevc": ("libx265", 20),
    "h265": ("libx265", 20),
    "libx265": ("libx265", 20),
}


def _writer_format(path: Path) -> str:
    return {".mkv": "matroska", ".mov": "mov"}.get(path.suffix.lower(), "mp4")


class VideoWriter:
    """Encodes one video-only segment file. Context manager.

    libx264 (``codec="h264"``) or libx265 (``"hevc"``), yuv420p, BT.709
    limited range (tagged), CRF 18 (h264) / 20 (hevc) unless ``crf`` is given,
    ``preset`` "medium" unless given; ``options`` adds encoder options.
    ``threads`` 0 lets the encoder choose.

    Timing: the encoder time base is ``1/fps`` and frame ``i`` gets ``pts = i``,
    so a segment of n frames lasts exactly n/fps.

    Container: MP4 unless the path ends in ``.mkv``/``.mov``. Segments should
    be ``.mp4``: the MP4 muxer picks a timescale that is an exact multiple of
    the frame rate (1/12288 s at 24 fps), stores dts explicitly (B-frames) and
    a per-sample index, so stream-copy concatenation can offset pts/dts by an
    exact number of frames. Matroska rounds every timestamp to 1 ms.

    Odd sizes: yuv420p needs an even width and height. A writer created with
    an odd width or height encodes ``width & ~1`` x ``height & ~1`` (see
    :attr:`encoded_size`) and drops the last column/row of each frame.

    On an exception inside ``with``, or :meth:`abort`, the partial file is
    deleted; closing a writer that got no frame deletes the file and returns 0.
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: Fraction,
        *,
        codec: str = "h264",
        crf: int | None = None,
        threads: int = 0,
        preset: str = "medium",
        options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.width = int(width)
        self.height = int(height)
        self.fps = Fraction(fps)
        self.frames = 0
        self._closed = False
        if codec not in _VIDEO_CODECS:
            raise UsageError(f"unknown video codec {codec!r} (choose h264 or hevc)")
        encoder, default_crf = _VIDEO_CODECS[codec]
        ew, eh = self.width & ~1, self.height & ~1
        if ew < 2 or eh < 2:
            raise ValueError(f"VideoWriter: frame size {width}x{height} is too small")
        if self.fps <= 0:
            raise ValueError("VideoWriter: fps must be positive")
        self.encoded_size = (ew, eh)
        opts = {"crf": str(default_crf if crf is None else crf), "preset": preset}
        if encoder == "libx265":
            opts["x265-params"] = "log-level=error"
        opts.update(options or {})
        try:
            self._container = av.open(str(self.path), "w", format=_writer_format(self.path))
        except _AV_ERRORS as exc:
            raise OutputError(f"{self.path}: cannot create ({_reason(exc)})") from exc
        try:
            stream = self._container.add_stream(encoder, rate=self.fps)
            stream.width, stream.height = ew, eh
            stream.pix_fmt = "yuv420p"
            ctx = stream.codec_context
            ctx.time_base = 1 / self.fps
            ctx.thread_count = int(threads)
            ctx.color_range = 1  # MPEG (limited)
            ctx.colorspace = 1  # BT.709
            ctx.color_primaries = 1
            ctx.color_trc = 1
            ctx.options = opts
            if encoder == "libx265" and _writer_format(self.path) in ("mp4", "mov"):
                ctx.codec_tag = "hvc1"  # what Apple players expect for HEVC in MP4/MOV
            stream.time_base = 1 / self.fps
            self._stream = stream
        except _AV_ERRORS as exc:
            self._abort_quietly()
            raise OutputError(f"{self.path}: cannot set up the {encoder} encoder ({_reason(exc)})") from exc

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray) -> None:
        """Encode one RGB uint8 frame of shape (height, width, 3) as given to the constructor."""
        if self._closed:
            raise ValueError("VideoWriter: write after close")
        if frame.dtype != np.uint8 or frame.shape != (self.height, self.width, 3):
            raise ValueError(
                f"VideoWriter: expected uint8 ({self.height}, {self.width}, 3), got {frame.dtype} {frame.shape}"
            )
        ew, eh = self.encoded_size
        if (ew, eh) != (self.width, self.height):
            frame = frame[:eh, :ew]
        try:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            vf.pts = self.frames
            vf.time_base = self._stream.codec_context.time_base
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        except _AV_ERRORS as exc:
            self.abort()
            raise OutputError(f"{self.path}: encoding failed ({_reason(exc)})") from exc
        self.frames += 1

    def close(self) -> int:
        """Flush the encoder and close the file; return the number of frames written."""
        if self._closed:
            return self.frames
        if self.frames == 0:
            self.abort()
            return 0
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        except _AV_ERRORS as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing ({_reason(exc)})") from exc
        self._closed = True
        return self.frames

    def abort(self) -> None:
        """Stop and delete the partial file."""
        if self._closed:
            return
        self._abort_quietly()

    def _abort_quietly(self) -> None:
        self._closed = True
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        try:
            self.path.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------- concat and mux


def _output_format(out: Path, hint: str | None) -> str:
    if hint:
        fmt = _OUTPUT_FORMATS.get(hint.lower().lstrip("."))
        if fmt is None:
            raise OutputError(f"{out}: unsupported container {hint!r} (use mp4, mov or mkv)")
        return fmt
    for suffix in reversed(out.suffixes):
        fmt = _OUTPUT_FORMATS.get(suffix.lower().lstrip("."))
        if fmt is not None:
            return fmt
    raise OutputError(f"{out}: unknown output container (use a .mp4, .mov or .mkv name)")


def _audio_fits(codec: str | None, fmt: str) -> bool:
    if codec is None:
        return False
    if fmt == "matroska":
        return True
    return codec == "aac"


def _packet_time(packet: Any) -> float:
    ts = packet.dts if packet.dts is not None else packet.pts
    tb = packet.time_base
    if ts is None or tb is None:
        return 0.0
    return float(ts * tb)


def _interleave(*sources: Iterator[Any]) -> Iterator[Any]:
    """Merge packet iterators by dts time (so the muxer never buffers a whole stream)."""
    heap: list[tuple[float, int, Any]] = []
    iters = list(sources)
    for i, it in enumerate(iters):
        packet = next(it, None)
        if packet is not None:
            heap.append((_packet_time(packet), i, packet))
    heapq.heapify(heap)
    while heap:
        _, i, packet = heapq.heappop(heap)
        yield packet
        nxt = next(iters[i], None)
        if nxt is not None:
            heapq.heappush(heap, (_packet_time(nxt), i, nxt))


def _open_segment(path: Path) -> Any:
    if not path.is_file():
        raise SegmentError(f"{path}: segment file is missing")
    try:
        container = av.open(str(path))
    except _AV_ERRORS as exc:
        raise SegmentError(f"{path}: unreadable segment ({_reason(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise SegmentError(f"{path}: segment has no video stream")
    return container


def _video_packets(
    segments: list[Path], vout: Any, fps: Fraction, expect: tuple[Any, ...], counter: list[int]
) -> Iterator[Any]:
    """Stream-copy the segments' video packets, shifted onto one continuous timeline.

    Each segment starts at pts 0 (as VideoWriter writes it); segment i is
    shifted by the number of frames before it divided by fps, converted
    exactly into its own time base (an exact multiple for MP4 segments).
    dts is kept strictly increasing across the joins.
    """
    offset = Fraction(0)  # seconds before the current segment
    last_dts: Fraction | None = None  # seconds
    for path in segments:
        container = _open_segment(path)
        try:
            vs = container.streams.video[0]
            ctx = vs.codec_context
            got = (ctx.name, ctx.width, ctx.height, bytes(ctx.extradata or b""))
            if got[:3] != expect[:3]:
                raise SegmentError(
                    f"{path}: segment is {got[0]} {got[1]}x{got[2]}, the first is {expect[0]} {expect[1]}x{expect[2]}"
                )
            if expect[3] and got[3] and got[3] != expect[3]:
                raise SegmentError(f"{path}: segment was encoded with other codec parameters than the first")
            tb = Fraction(vs.time_base)
            base = vs.start_time or 0
            shift = round(offset / tb)
            n = 0
            try:
                for packet in container.demux(vs):
                    if packet.size == 0:
                        continue
                    if packet.pts is not None:
                        packet.pts = packet.pts - base + shift
                    if packet.dts is not None:
                        dts = packet.dts - base + shift
                        if last_dts is not None and dts * tb <= last_dts:
                            dts = math.floor(last_dts / tb) + 1
                            if packet.pts is not None and dts > packet.pts:
                                raise SegmentError(f"{path}: timestamps do not continue the previous segment")
                        packet.dts = dts
                        last_dts = dts * tb
                    packet.stream = vout
                    n += 1
                    counter[0] += 1
                    yield packet
            except _AV_ERRORS as exc:
                raise SegmentError(f"{path}: unreadable segment ({_reason(exc)})") from exc
            if n == 0:
                raise SegmentError(f"{path}: segment has no frames")
            offset += Fraction(n) / fps
        finally:
            container.close()


def _origin(container: Any, v: Any | None) -> Fraction:
    """Container time (s) of the first video frame: the clip's time 0."""
    if v is not None and v.start_time is not None and v.time_base:
        return Fraction(v.start_time) * Fraction(v.time_base)
    return Fraction(0)


def _parse_clock(text: str | None) -> Fraction | None:
    m = re.match(r"^(\d+):(\d+):(\d+(?:\.\d+)?)$", (text or "").strip())
    if not m:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + Fraction(m.group(3))


def _audio_span(a: Any) -> tuple[Fraction, Fraction] | None:
    """(start, end) of an audio stream in container seconds, from its header, if known."""
    tb = Fraction(a.time_base) if a.time_base else None
    if tb is None:
        return None
    start = Fraction(a.start_time or 0) * tb
    if a.duration:
        return start, start + Fraction(a.duration) * tb
    tagged = _parse_clock(a.metadata.get("DURATION") or a.metadata.get("duration"))
    if tagged is not None:  # Matroska writes a DURATION tag per stream
        return start, start + tagged
    return None


def _copy_audio_ok(plan: ClipPlan, fmt: str) -> bool:
    """One clip, untrimmed, codec fits the container, and its audio spans the video within a frame."""
    info = plan.info
    if plan.trim is not None or plan.start_frame != 0 or not _audio_fits(info.audio_codec, fmt):
        return False
    with _open_input(info.path) as container:
        if not container.streams.audio:
            return False
        span = _audio_span(container.streams.audio[0])
        if span is None:
            return False
        origin = _origin(container, _video_stream(container))
    frame = 1 / plan.fps
    return span[0] - origin <= frame and span[1] - origin >= plan.duration - frame


def _copied_audio(container: Any, aout: Any, plan: ClipPlan) -> Iterator[Any]:
    """The clip's audio packets unchanged, re-timed to the video's origin, cut at the video's end."""
    a = container.streams.audio[0]
    tb = Fraction(a.time_base)
    shift = round(_origin(container, _video_stream(container)) / tb)
    end = plan.duration
    try:
        for packet in container.demux(a):
            if packet.size == 0:
                continue
            if packet.pts is not None:
                if (packet.pts - shift) * tb >= end:
                    continue
                packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = aout
            yield packet
    except _AV_ERRORS as exc:
        raise InputError(f"{plan.info.path}: cannot read the audio ({_reason(exc)})") from exc


def _silence(channels: int, n: int, chunk: int = 8192) -> Iterator[np.ndarray]:
    while n > 0:
        k = min(chunk, n)
        yield np.zeros((channels, k), np.float32)
        n -= k


class _Window:
    """Cuts a continuous sample stream: drop ``skip`` samples, then pass ``want``."""

    def __init__(self, skip: int, want: int) -> None:
        self.skip, self.want = skip, want

    def take(self, arr: np.ndarray) -> np.ndarray | None:
        if self.skip:
            drop = min(self.skip, arr.shape[1])
            arr = arr[:, drop:]
            self.skip -= drop
        if self.want <= 0 or arr.shape[1] == 0:
            return None
        arr = arr[:, : self.want]
        self.want -= arr.shape[1]
        return arr


def _clip_pcm(plan: ClipPlan, rate: int, layout: str, nsamples: int) -> Iterator[np.ndarray]:
    """Exactly ``nsamples`` float32 (channels, n) samples of the clip's audio from its output start.

    Source audio is decoded from the clip's start (video origin + plan.start_time),
    resampled to ``rate``/``layout``; missing audio (before its start, after its end,
    gaps over 20 ms, a clip without audio) is silence.
    """
    channels = 1 if layout == "mono" else 2
    if nsamples <= 0:
        return
    if not plan.info.has_audio:
        yield from _silence(channels, nsamples)
        return
    path = plan.info.path
    with _open_input(path) as container:
        a = container.streams.audio[0]
        start = _origin(container, _video_stream(container)) + plan.start_time
        try:
            if start > 1:
                try:  # by the default (video) stream's index; audio follows
                    container.seek(math.floor((start - 1) * av.time_base), backward=True)
                except _AV_ERRORS:
                    pass  # not seekable: decode from the start, which is where we are
            window: _Window | None = None
            resampler: Any = None
            signature: tuple[Any, ...] | None = None
            expected: Fraction | None = None  # source time of the next input sample
            for packet in container.demux(a):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    continue
                for fr in decoded:
                    if fr.samples == 0:
                        continue
                    if fr.pts is not None and fr.time_base is not None:
                        ft = Fraction(fr.pts) * Fraction(fr.time_base)
                    else:
                        ft = expected if expected is not None else start
                    length = Fraction(fr.samples, fr.sample_rate)
                    if window is None:
                        skip = round((start - ft) * rate)
                        window = _Window(max(skip, 0), nsamples)
                        if skip < 0:
                            for chunk in _silence(channels, -skip):
                                out = window.take(chunk)
                                if out is not None:
                                    yield out
                    elif expected is not None and ft + length <= expected + Fraction(1, 1000):
                        continue  # overlaps what was already decoded
                    gap = (ft - expected) if expected is not None else Fraction(0)
                    sig = (fr.format.name, fr.layout.name, fr.sample_rate)
                    if resampler is None or sig != signature or gap > Fraction(1, 50):
                        if resampler is not None:
                            for o in resampler.resample(None):
                                out = window.take(_pcm(o, channels))
                                if out is not None:
                                    yield out
                        if gap > Fraction(1, 50):
                            for chunk in _silence(channels, round(gap * rate)):
                                out = window.take(chunk)
                                if out is not None:
                                    yield out
                        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
                        signature = sig
                    expected = ft + length
                    for o in resampler.resample(fr):
                        out = window.take(_pcm(o, channels))
                        if out is not None:
                            yield out
                    if window.want <= 0:
                        return
            if resampler is not None and window is not None:
                for o in resampler.resample(None):
                    out = window.take(_pcm(o, channels))
                    if out is not None:
                        yield out
        except _AV_ERRORS as exc:
            raise InputError(f"{path}: cannot read the audio ({_reason(exc)})") from exc
        remaining = window.want if window is not None else nsamples
        yield from _silence(channels, remaining)


def _pcm(frame: Any, channels: int) -> np.ndarray:
    return np.asarray(frame.to_ndarray(), dtype=np.float32).reshape(channels, -1)


def _audio_params(plans: list[ClipPlan]) -> tuple[int, str]:
    """Output rate and layout for AAC: the first clip with audio's rate (if AAC allows it), mono or stereo."""
    for plan in plans:
        if not plan.info.has_audio:
            continue
        with _open_input(plan.info.path) as container:
            a = container.streams.audio[0]
            rate = a.codec_context.sample_rate or 48000
            channels = a.codec_context.layout.nb_channels if a.codec_context.layout else 2
        return (rate if rate in _AAC_RATES else 48000), ("mono" if channels == 1 else "stereo")
    return 48000, "stereo"


def _encoded_audio(plans: list[ClipPlan], aout: Any, rate: int, layout: str) -> Iterator[Any]:
    """AAC packets of every clip's audio for exactly its output duration, back to back.

    Clip i covers samples round(B_i * rate) .. round(E_i * rate) where B_i/E_i are
    its exact start/end on the output timeline, so no drift accumulates.
    """
    begin = Fraction(0)
    pts = 0
    for plan in plans:
        end = begin + plan.duration
        n = round(end * rate) - round(begin * rate)
        for arr in _clip_pcm(plan, rate, layout, n):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = pts
            frame.time_base = Fraction(1, rate)
            pts += arr.shape[1]
            yield from aout.encode(frame)
        begin = end
    yield from aout.encode(None)


def concat_and_mux(
    segments: list[Path],
    plans: list[ClipPlan],
    out: Path,
    *,
    container_hint: str | None = None,
    faststart: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Join the segment files (stream copy, no re-encode) and add the clips' audio into ``out``.

    Video: the segments' packets in order, pts/dts shifted so the timeline is
    continuous (frame i of the output at i/fps). All segments must share the
    codec, size and codec parameters (as one VideoWriter configuration makes
    them); the total frame count must equal the plans' (SegmentError otherwise).

    Audio, aligned with the video (each clip's audio starts with its first
    output frame and lasts exactly its output duration):

    * **copied** (packets unchanged) when there is one clip, untrimmed, whose
      audio codec fits the container (AAC in MP4/MOV; anything in Matroska)
      and whose audio spans the video within one frame; packets starting after
      the video's end are dropped;
    * otherwise **decoded, cut, resampled and encoded as AAC** (192 kb/s,
      the first audio clip's sample rate, mono or stereo; more channels are
      downmixed to stereo) — in every container. A clip without audio
      contributes silence of its duration when another clip has audio; with
      no audio at all the output has no audio track.

    Container from ``out``'s suffix (.mp4, .mov, .mkv), or ``container_hint``
    ("mp4", "mov", "mkv") for a temporary name. MP4/MOV get ``+faststart``
    unless ``faststart=False``. ``progress(done, total)`` is called with video
    frames written. ``out`` is written directly and deleted if anything fails.
    """
    out = Path(out)
    fmt = _output_format(out, container_hint)
    if not segments:
        raise SegmentError(f"{out}: no segments to join")
    if not plans:
        raise ValueError("concat_and_mux: no clip plans")
    fps = plans[0].fps
    total = sum(p.frames for p in plans)

    # Check the segments' frame counts up front where their headers say (MP4/MOV).
    counted = 0
    known = True
    for path in segments:
        container = _open_segment(path)
        try:
            n = container.streams.video[0].frames
        finally:
            container.close()
        if n <= 0:
            known = False
        counted += n
    if known and counted != total:
        raise SegmentError(f"{out}: the segments hold {counted} frames, the plan expects {total}")

    audio_mode: str | None = None
    if any(p.info.has_audio for p in plans):
        audio_mode = "copy" if len(plans) == 1 and _copy_audio_ok(plans[0], fmt) else "aac"

    first = _open_segment(segments[0])
    options = {"movflags": "+faststart"} if (faststart and fmt in ("mp4", "mov")) else {}
    try:
        out_c = av.open(str(out), "w", format=fmt, options=options)
    except _AV_ERRORS as exc:
        first.close()
        raise OutputError(f"{out}: cannot create ({_reason(exc)})") from exc

    source: Any = None
    ok = False
    try:
        vs0 = first.streams.video[0]
        ctx0 = vs0.codec_context
        expect = (ctx0.name, ctx0.width, ctx0.height, bytes(ctx0.extradata or b""))
        vout = out_c.add_stream_from_template(vs0)
        vout.time_base = vs0.time_base
        first.close()
        counter = [0]
        sources: list[Iterator[Any]] = [_video_packets(segments, vout, fps, expect, counter)]
        if audio_mode == "copy":
            source = _open_input(plans[0].info.path)
            aout = out_c.add_stream_from_template(source.streams.audio[0])
            sources.append(_copied_audio(source, aout, plans[0]))
        elif audio_mode == "aac":
            rate, layout = _audio_params(plans)
            aout = out_c.add_stream("aac", rate=rate, layout=layout)
            aout.codec_context.bit_rate = 192_000 if layout == "stereo" else 128_000
            aout.time_base = Fraction(1, rate)
            sources.append(_encoded_audio(plans, aout, rate, layout))
        vindex = vout.index
        try:
            out_c.start_encoding()
        except _AV_ERRORS as exc:
            raise OutputError(f"{out}: cannot write ({_reason(exc)})") from exc
        for packet in _interleave(*sources):
            try:
                out_c.mux(packet)
            except _AV_ERRORS as exc:
                raise OutputError(f"{out}: writing failed ({_reason(exc)})") from exc
            if progress is not None and packet.stream_index == vindex:
                progress(counter[0], total)
        if counter[0] != total:
            raise SegmentError(f"{out}: the segments hold {counter[0]} frames, the plan expects {total}")
        try:
            out_c.close()
        except _AV_ERRORS as exc:
            raise OutputError(f"{out}: cannot finish writing ({_reason(exc)})") from exc
        ok = True
    except _AV_ERRORS as exc:
        raise OutputError(f"{out}: joining the segments failed ({_reason(exc)})") from exc
    finally:
        if source is not None:
            source.close()
        if not ok:
            try:
                first.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                out_c.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                out.unlink()
            except OSError:
                pass
