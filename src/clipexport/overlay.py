"""Overlays burnt into upscaled frames: text, box, ellipse, spotlight, image.

An overlay is a plain dict (JSON-ready, so it travels in a task to a Modal
container unchanged), as `clipexport.spec` validates and completes it:
``kind``, ``start``/``end`` in seconds from the clip's start (after its
trim; ``end`` None runs to the clip's end), the geometry ``x y w h`` (and
``size`` for text) as fractions of the output frame, with ``x y`` the top
left corner of the overlay's bounding box, and optional ``keyframes``.
An image overlay carries its PNG as base64 (``png``) and its ``sha256``.

`Painter` draws a segment's overlays on each frame at output resolution, in
list order. Drawing is numpy on the frame array: text and images are
rendered once (Pillow) into an RGBA patch per pixel size and composited;
shapes are masks cached by pixel size. The whole frame never goes through
Pillow.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

KINDS = ("text", "box", "ellipse", "spotlight", "image")
GEOMETRY = ("x", "y", "w", "h", "size")  # the fields a keyframe may move


def parse_color(text: str) -> tuple[int, int, int, int]:
    """``#rrggbb`` or ``#rrggbbaa`` as RGBA; ValueError otherwise."""
    digits = text[1:] if isinstance(text, str) and text.startswith("#") else ""
    if len(digits) not in (6, 8) or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"{text!r} is not a colour: use #rrggbb or #rrggbbaa")
    values = [int(digits[i:i + 2], 16) for i in range(0, len(digits), 2)]
    return (values[0], values[1], values[2], values[3] if len(values) == 4 else 255)


def active(overlay: dict[str, Any], index: int, fps: Fraction) -> bool:
    """Whether the overlay shows on the clip's output frame `index` (start <= t < end)."""
    t = Fraction(index) / fps
    end = overlay.get("end")
    return Fraction(overlay.get("start") or 0) <= t and (end is None or t < Fraction(end))


def touches(overlay: dict[str, Any], start: int, count: int, fps: Fraction) -> bool:
    """Whether the overlay shows on any of the frames ``start .. start + count - 1``."""
    return any(active(overlay, i, fps) for i in range(start, start + count))


def geometry_at(overlay: dict[str, Any], t: float) -> dict[str, float]:
    """The geometric fields at `t` seconds: linear between keyframes, held outside them."""
    values = {name: overlay[name] for name in GEOMETRY if overlay.get(name) is not None}
    keyframes = overlay.get("keyframes") or []
    for name in GEOMETRY:
        points = [(k["t"], k[name]) for k in keyframes if name in k]
        if points:
            values[name] = _interpolate(points, t)
    return values


def _interpolate(points: list[tuple[float, float]], t: float) -> float:
    if t <= points[0][0]:
        return points[0][1]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return points[-1][1]


def pixel_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Fractions to a pixel rectangle (x0, y0, x1, y1); empty when w or h rounds to nothing."""
    return round(x * width), round(y * height), round((x + w) * width), round((y + h) * height)


def on_screen(box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """Whether a pixel rectangle keeps at least one pixel inside the frame."""
    x0, y0, x1, y1 = box
    return max(x0, 0) < min(x1, width) and max(y0, 0) < min(y1, height)


def footprint(overlay: dict[str, Any], g: dict[str, float], width: int, height: int,
              image: Any = None) -> tuple[int, int, int, int]:
    """The pixel rectangle an overlay covers with geometry `g` (`image`: its decoded PNG)."""
    if overlay["kind"] == "text":
        x0, y0 = round(g["x"] * width), round(g["y"] * height)
        patch = text_patch(overlay["text"], _text_px(g, height), overlay["color"], overlay.get("background"))
        return x0, y0, x0 + patch.shape[1], y0 + patch.shape[0]
    if overlay["kind"] == "image":
        w, h = image_size(g, width, height, image.height / image.width)
        return pixel_box(g["x"], g["y"], w, h, width, height)
    return pixel_box(g["x"], g["y"], g["w"], g["h"], width, height)


def _text_px(g: dict[str, float], height: int) -> int:
    return max(1, round(g["size"] * height))


def image_size(geometry: dict[str, float], width: int, height: int, aspect: float) -> tuple[float, float]:
    """An image's (w, h) as fractions; h from the image's aspect (height / width) when absent."""
    w = geometry["w"]
    h = geometry.get("h")
    return w, (h if h is not None else w * width * aspect / height)


def decode_png(data: str) -> Any:
    """The base64 PNG of an image overlay as an RGBA Pillow image."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return image.convert("RGBA")


class Painter:
    """Draws a clip's overlays on its frames; one per segment (or clip)."""

    def __init__(self, overlays: Sequence[dict[str, Any]], width: int, height: int, fps: Fraction) -> None:
        self.overlays, self.width, self.height, self.fps = list(overlays), width, height, fps
        self._images = {i: decode_png(o["png"]) for i, o in enumerate(self.overlays) if o["kind"] == "image"}
        self._wide: np.ndarray | None = None  # the spotlight's uint16 scratch frame, reused

    def paint(self, frame: np.ndarray, index: int) -> np.ndarray:
        """Draw the overlays showing on the clip's frame `index`; returns the (possibly new) array."""
        shown = [(i, o) for i, o in enumerate(self.overlays) if active(o, index, self.fps)]
        if not shown:
            return frame
        if not frame.flags.writeable:
            frame = frame.copy()
        t = float(Fraction(index) / self.fps)
        for i, overlay in shown:
            getattr(self, "_" + overlay["kind"])(frame, overlay, geometry_at(overlay, t), i)
        return frame

    def _box(self, frame: np.ndarray, overlay: dict[str, Any], g: dict[str, float], _: int) -> None:
        x0, y0, x1, y1 = footprint(overlay, g, self.width, self.height)
        color, width = parse_color(overlay["color"]), overlay.get("outline")
        mask = _frame_mask(x1 - x0, y1 - y0, int(width)) if width else np.ones((y1 - y0, x1 - x0), bool)
        _blend(frame, x0, y0, mask, color)

    def _ellipse(self, frame: np.ndarray, overlay: dict[str, Any], g: dict[str, float], _: int) -> None:
        x0, y0, x1, y1 = footprint(overlay, g, self.width, self.height)
        mask = _ellipse_mask(x1 - x0, y1 - y0, int(overlay.get("outline") or 0))
        _blend(frame, x0, y0, mask, parse_color(overlay["color"]))

    def _spotlight(self, frame: np.ndarray, overlay: dict[str, Any], g: dict[str, float], _: int) -> None:
        x0, y0, x1, y1 = footprint(overlay, g, self.width, self.height)
        keep = _clipped(frame, x0, y0, _ellipse_mask(x1 - x0, y1 - y0, 0))
        kept = None if keep is None else frame[keep[0]][keep[1]].copy()
        factor = np.uint16(round((1.0 - overlay["dim"]) * 256))
        if self._wide is None or self._wide.shape != frame.shape:
            self._wide = np.empty(frame.shape, np.uint16)
        np.multiply(frame, factor, out=self._wide, dtype=np.uint16, casting="unsafe")
        np.right_shift(self._wide, 8, out=frame, casting="unsafe")
        if keep is not None:
            frame[keep[0]][keep[1]] = kept

    def _text(self, frame: np.ndarray, overlay: dict[str, Any], g: dict[str, float], _: int) -> None:
        patch = text_patch(overlay["text"], _text_px(g, self.height), overlay["color"], overlay.get("background"))
        _composite(frame, round(g["x"] * self.width), round(g["y"] * self.height), patch)

    def _image(self, frame: np.ndarray, overlay: dict[str, Any], g: dict[str, float], i: int) -> None:
        image = self._images[i]
        x0, y0, x1, y1 = footprint(overlay, g, self.width, self.height, image)
        _composite(frame, x0, y0, _image_patch(overlay["sha256"], image, x1 - x0, y1 - y0, overlay["opacity"]))


def _clipped(frame: np.ndarray, x0: int, y0: int, mask: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The frame region a mask placed at (x0, y0) covers, and the part of the mask inside it."""
    height, width = frame.shape[:2]
    ya, yb = max(0, y0), min(height, y0 + mask.shape[0])
    xa, xb = max(0, x0), min(width, x0 + mask.shape[1])
    if ya >= yb or xa >= xb:
        return None
    return (slice(ya, yb), slice(xa, xb)), mask[ya - y0:yb - y0, xa - x0:xb - x0]


def _blend(frame: np.ndarray, x0: int, y0: int, mask: np.ndarray, color: tuple[int, int, int, int]) -> None:
    """Paint `color` (with its alpha) where `mask` is set, the mask's corner at (x0, y0)."""
    placed = _clipped(frame, x0, y0, mask)
    if placed is None:
        return
    region, inside = frame[placed[0]], placed[1]
    alpha = color[3]
    rgb = np.array(color[:3], np.uint16)
    pixels = region[inside].astype(np.uint16)
    region[inside] = ((rgb * alpha + pixels * (255 - alpha) + 127) // 255).astype(np.uint8)


def _composite(frame: np.ndarray, x0: int, y0: int, patch: np.ndarray) -> None:
    """Alpha-composite an RGBA uint8 patch onto the frame, its corner at (x0, y0)."""
    placed = _clipped(frame, x0, y0, np.ones(patch.shape[:2], bool))
    if placed is None:
        return
    region = frame[placed[0]]
    ys, xs = placed[0]
    part = patch[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0].astype(np.uint16)
    alpha = part[..., 3:4]
    region[:] = ((part[..., :3] * alpha + region.astype(np.uint16) * (255 - alpha) + 127) // 255).astype(np.uint8)


@lru_cache(maxsize=64)
def _frame_mask(width: int, height: int, outline: int) -> np.ndarray:
    """A rectangle's outline `outline` pixels wide (all of it when that covers it)."""
    mask = np.ones((height, width), bool)
    mask[outline:height - outline, outline:width - outline] = False
    return mask


@lru_cache(maxsize=64)
def _ellipse_mask(width: int, height: int, outline: int) -> np.ndarray:
    """The pixels of the ellipse inscribed in width x height (a ring `outline` wide when > 0)."""
    ys = (np.arange(height) + 0.5 - height / 2)[:, None]
    xs = (np.arange(width) + 0.5 - width / 2)[None, :]
    inside = _within(xs, ys, width / 2, height / 2)
    if outline <= 0:
        return inside
    return inside & ~_within(xs, ys, width / 2 - outline, height / 2 - outline)


def _within(xs: np.ndarray, ys: np.ndarray, rx: float, ry: float) -> np.ndarray:
    if rx <= 0 or ry <= 0:
        return np.zeros((ys.shape[0], xs.shape[1]), bool)
    return (xs / rx) ** 2 + (ys / ry) ** 2 <= 1.0


@lru_cache(maxsize=32)
def text_patch(text: str, px: int, color: str, background: str | None) -> np.ndarray:
    """Text `px` pixels high in Pillow's scalable default font, as an RGBA patch.

    The patch is the text's ink box plus a margin of a fifth of its height,
    filled with `background` (transparent without one).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=px)
    left, top, right, bottom = font.getbbox(text)
    pad = max(1, math.ceil(px / 5))
    fill = parse_color(background) if background else (0, 0, 0, 0)
    image = Image.new("RGBA", (max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad), fill)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((pad - left, pad - top), text, font=font, fill=parse_color(color))
    return np.asarray(Image.alpha_composite(image, layer)).copy()


_IMAGE_PATCHES: dict[tuple[str, int, int, float], np.ndarray] = {}


def _image_patch(sha256: str, image: Any, width: int, height: int, opacity: float) -> np.ndarray:
    """The image resized to width x height, its alpha scaled by `opacity`; cached per size."""
    key = (sha256, width, height, opacity)
    if width < 1 or height < 1:
        return np.zeros((0, 0, 4), np.uint8)
    patch = _IMAGE_PATCHES.get(key)
    if patch is None:
        from PIL import Image

        patch = np.asarray(image.resize((width, height), Image.Resampling.LANCZOS)).copy()
        patch[..., 3] = np.round(patch[..., 3] * opacity).astype(np.uint8)
        if len(_IMAGE_PATCHES) > 64:
            _IMAGE_PATCHES.clear()
        _IMAGE_PATCHES[key] = patch
    return patch
