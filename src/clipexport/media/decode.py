"""Decode: frame-exact reading of a planned clip as upright, cropped, fitted RGB frames.

Conventions (time origin, frame rate and VFR, rotation, odd sizes): see the
package docstring, :mod:`clipexport.media`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import av.error
import numpy as np

from ..errors import ClipexportError, InputError
from ._util import _AV_ERRORS, _reason
from .plan import ClipPlan, display_size, pushed_slots, pushes
from .probe import _open_input, _video_stream, frame_times, video_origin


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
        self.sar = plan.info.sar
        self.fit = None if src == plan.size and self.sar == 1 else _fit(display_size(src, self.sar), plan.size)

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
            self.fit = _fit(display_size((arr.shape[1], arr.shape[0]), self.sar), self.size)
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


def read_frames(plan: ClipPlan, start: int, count: int, damaged: list[int] | None = None) -> Iterator[np.ndarray]:
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

    ``damaged``, if given, receives the output frame numbers (within the
    clip) that stand in for source frames that could not be decoded: the
    frame shown is more than one source frame older than its slot after the
    decoder rejected data, or the file ended before the plan did.
    """
    if start < 0 or count < 0 or start + count > plan.frames:
        raise ValueError(f"read_frames: frames {start}..{start + count} outside the clip's {plan.frames}")
    if count == 0:
        return
    path = plan.info.path
    try:
        yield from _read_frames(plan, start, count, [] if damaged is None else damaged)
    except ClipexportError:
        raise
    except _AV_ERRORS as exc:
        raise InputError(f"{path}: cannot read frames ({_reason(exc)})") from exc


def _read_frames(plan: ClipPlan, start: int, count: int, damaged: list[int]) -> Iterator[np.ndarray]:
    path = plan.info.path
    convert = _Converter(plan)
    t0 = plan.start_time
    fps_t, fps_s = plan.fps, plan.info.fps
    origin_s = video_origin(path, fps_s)  # None: no timestamps at all (a raw stream)
    slots = None
    if pushes(plan.info, fps_t):  # placed so that no frame is lost: needs the times of those before
        slots = pushed_slots(frame_times(path, fps_s, until=t0 + (start + count) / fps_t), t0, fps_t, fps_s)
    first_target = t0 + Fraction(start) / fps_t
    if slots is not None:  # the time of the frame that shows in slot `start`
        first_target = max((s for s, slot in slots.items() if slot <= start), default=Fraction(0))

    for attempt in (0, 1):
        with _open_input(path) as container:
            v = _video_stream(container)
            if v is None:
                raise InputError(f"{path}: no video stream")
            v.codec_context.thread_type = "AUTO"
            tb = Fraction(v.time_base)
            tol = min(Fraction(1, 4) / fps_s, tb)

            def slot_of(s: Fraction) -> int:
                """The first output slot the frame at source time `s` shows in."""
                if slots is not None and s in slots:
                    return slots[s]
                return math.ceil((s - t0 - tol) * fps_t)

            origin = Fraction(0) if origin_s is None else origin_s / tb
            seek_pts = math.floor(origin + first_target / tb)
            sought = attempt == 0 and first_target > 0 and seek_pts > origin and origin_s is not None
            if sought:  # else decode from the file's start, where a fresh container is
                container.seek(seek_pts, stream=v, backward=True)

            k = start
            end = start + count
            cand = None  # the latest frame at or before the current target
            cand_s: Fraction | None = None
            shown = Fraction(0)  # when cand is shown from: its time, or its slot's when a burst pushed it later
            cand_arr: np.ndarray | None = None
            cand_used = False
            restart = False
            errors = [0]  # packets the decoder rejected so far
            hold = _last_slot(plan) if end == plan.frames else None  # filled by the clip's very last frame
            stale = Fraction(1) / fps_s + tol  # a slot shown this late lost its own frame
            keyed = not sought  # after a seek, frames before the first keyframe are broken (MPEG-TS seeks anywhere)
            for frame in _decode(container, v, errors):
                keyed = keyed or frame.key_frame
                if not keyed:
                    continue
                if frame.pts is None and cand_s is None and sought:
                    restart = True  # the seek landed on frames without timestamps: where are we?
                    break
                s = (frame.pts - origin) * tb if frame.pts is not None else (
                    cand_s + 1 / fps_s if cand_s is not None else Fraction(0)
                )
                if cand_s is not None and s <= cand_s:
                    continue  # non-increasing pts: a damaged or duplicate frame
                slot = slot_of(s)
                if cand is None and slot > start:
                    if sought:
                        restart = True  # the seek landed after the target: decode from the start
                        break
                    # Decoding from the start and the first decodable frame comes late
                    # (leading frames lost): it stands in for the times before it.
                    cand, cand_s, shown = frame, s, s
                while k < end and k != hold and slot > k:
                    if errors[0] and t0 + Fraction(k) / fps_t - shown > stale:
                        damaged.append(k)
                    if cand_arr is None:
                        cand_arr = convert(cand)
                    yield cand_arr.copy() if cand_used else cand_arr
                    cand_used = True
                    k += 1
                if k >= end:
                    break
                if cand is not frame:
                    cand, cand_s, cand_arr, cand_used = frame, s, None, False
                    shown = s if slots is None else max(s, t0 + Fraction(slot) / fps_t)
            if restart or (cand is None and sought):  # nothing decoded after the seek: from the start
                continue
            if cand is None:
                raise InputError(f"{path}: no decodable video frames where frame {start} was expected")
            # End of stream: the remaining targets show the last frame (see docstring).
            while k < end:
                if t0 + Fraction(k) / fps_t - shown > stale:
                    damaged.append(k)
                if cand_arr is None:
                    cand_arr = convert(cand)
                yield cand_arr.copy() if cand_used else cand_arr
                cand_used = True
                k += 1
            return


def _last_slot(plan: ClipPlan) -> int | None:
    """The clip's last output frame when the plan runs to the clip's end, else None.

    It shows the clip's last frame, whatever its timestamp: with a variable
    frame rate the last frame can come later than the last slot's time, and
    sampling by time alone would drop it. Not for a clip resampled to
    another rate.
    """
    fps_s = plan.info.fps
    if plan.fps != fps_s and not pushes(plan.info, plan.fps):  # resampled: dropping frames by time is the point
        return None
    end_s = plan.start_time + plan.duration
    return plan.frames - 1 if end_s >= Fraction(plan.info.frames) / fps_s - Fraction(1, 2) / fps_s else None


def _decode(container: Any, v: Any, errors: list[int]) -> Iterator[Any]:
    """Decode the video stream, skipping (and counting in ``errors[0]``) packets the decoder rejects."""
    for packet in container.demux(v):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            errors[0] += 1
            continue
        yield from frames
