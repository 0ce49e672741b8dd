"""Plan: parse crops and trims, place clips on the output timeline, cut it into segments.

Conventions (time origin, frame rate and VFR, rotation, odd sizes): see the
package docstring, :mod:`clipexport.media`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..errors import UsageError
from ._util import _seconds
from .probe import ClipInfo, frame_times


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


def display_size(size: tuple[int, int], sar: Fraction) -> tuple[int, int]:
    """The size in square pixels that shows `size` pixels of aspect `sar` as a player would.

    Non-square pixels are never squeezed: the output has square pixels at the
    display aspect, widening (sar > 1) or heightening (sar < 1) so that no
    source pixel is lost.
    """
    width, height = size
    if sar > 1:
        return max(1, round(width * sar)), height
    if sar < 1:
        return width, max(1, round(height / sar))
    return width, height


def plan_clips(
    infos: list[ClipInfo],
    trims: list[tuple[float, float] | None],
    crops: list[Crop | None],
) -> list[ClipPlan]:
    """Place each clip on the output timeline.

    The output size and fps are the first clip's (after its crop, in square
    pixels at its display aspect: see :func:`display_size`; its fps is its
    pace where pauses pull its average below that, see ``ClipInfo.pace``). Other clips
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
    size = display_size((first_crop.width, first_crop.height) if first_crop else (first.width, first.height),
                        first.sar)
    fps_t = first.pace or first.fps  # a crowded clip with pauses keeps its pace (probe._pace)

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
        if pushes(info, fps_t):
            frames = _pushed_frames(info, t0, end, fps_t, frames, to_end=end >= clip_end)
        used = None if trim is None else (float(t0), float(t0 + Fraction(frames) / fps_t))
        plans.append(
            ClipPlan(info=info, start_frame=start_frame, frames=frames, crop=crop, size=size, fps=fps_t, trim=used)
        )
    return plans


def pushes(info: ClipInfo, fps: Fraction) -> bool:
    """Whether the clip's frames are placed by :func:`pushed_slots` at output rate `fps`, not by time alone.

    Only for a crowded clip at or above its own average rate: below it,
    dropping frames is what resampling to a lower rate means.
    """
    return info.crowded and fps >= info.fps


def pushed_slots(times: list[Fraction], t0: Fraction, fps: Fraction, fps_source: Fraction) -> dict[Fraction, int]:
    """The output slot where each frame (by its time, `times` sorted) first shows.

    A frame's own slot is the first whose time is at or after its own (less
    a quarter of a source frame for rounding), counted from `t0`; when the
    previous frame already took that slot (a burst: frames closer together
    than one output frame), it goes in the next free one. So no frame is
    lost: a burst is shown a little late, and the delay is taken back at the
    next hold, where the slots it crossed would only have repeated a frame.
    Frames at or before `t0` share slot 0 (the last of them shows).
    """
    tol = Fraction(1, 4) / fps_source
    slots: dict[Fraction, int] = {}
    last = 0
    for s in times:
        own = math.ceil((s - t0 - tol) * fps)
        last = slots[s] = 0 if own <= 0 else max(own, last + 1)
    return slots


def _pushed_frames(info: ClipInfo, t0: Fraction, end: Fraction, fps: Fraction, frames: int, *, to_end: bool) -> int:
    """Output frames of a crowded clip: enough slots for every frame before `end` (see :func:`pushed_slots`).

    Run to its end, the clip's last frame shows in the last slot (the reader
    holds that slot for it): it needs a slot of its own only past the
    frames pushed before it.
    """
    times = [s for s in frame_times(info.path, info.fps, until=end) if s < end]
    slots = pushed_slots(times, t0, fps, info.fps)
    if not times:
        return frames
    needed = [slots[s] + 1 for s in (times[:-1] if to_end else times)]
    if to_end and len(times) > 1:
        needed.append(slots[times[-2]] + 2)
    return max([frames, *needed])


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
