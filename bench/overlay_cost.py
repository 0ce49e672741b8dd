"""What drawing overlays costs per frame, against encoding that frame, same run.

On 1280x720 output frames, one of each overlay kind (examples/reel.toml's
set), alternating, best of --repeat over --frames frames:

* encode: ``VideoWriter.write`` alone (x264, what every frame costs anyway);
* ours: ``overlay.Painter.paint`` (numpy on the frame; text and image
  rendered once into RGBA patches);
* via PIL: the obvious alternative, the whole frame through Pillow each
  frame (``Image.fromarray``, ``ImageDraw`` shapes and text, paste, back to
  numpy), drawing the same kinds.

Prints each one's milliseconds per frame and the ratios to the encode.

    python bench/overlay_cost.py [--frames 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipexport.media import VideoWriter  # noqa: E402
from clipexport.overlay import Painter, decode_png  # noqa: E402

WIDTH, HEIGHT, FPS = 1280, 720, Fraction(24)


def overlays() -> list[dict]:
    data = (ROOT / "examples" / "logo.png").read_bytes()
    png = base64.b64encode(data).decode()
    return [
        {"kind": "text", "start": 0, "text": "Goal! #10", "x": 0.05, "y": 0.8, "size": 0.06,
         "color": "#ffffff", "background": "#00000080"},
        {"kind": "box", "start": 0, "x": 0.1, "y": 0.1, "w": 0.2, "h": 0.2, "color": "#ff0000", "outline": 4},
        {"kind": "ellipse", "start": 0, "x": 0.5, "y": 0.2, "w": 0.1, "h": 0.15, "color": "#00ff0080"},
        {"kind": "spotlight", "start": 0, "x": 0.4, "y": 0.5, "w": 0.08, "h": 0.15, "dim": 0.5,
         "keyframes": [{"t": 0.0, "x": 0.4}, {"t": 2.0, "x": 0.55}]},
        {"kind": "image", "start": 0, "path": "logo.png", "png": png, "sha256": hashlib.sha256(data).hexdigest(),
         "x": 0.85, "y": 0.03, "w": 0.12, "opacity": 0.8},
    ]


def frames(count: int) -> list[np.ndarray]:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return [((x + 7 * i) % 256 // 2 + y % 128).astype(np.uint8)[..., None].repeat(3, axis=2) for i in range(count)]


def via_pil(frame: np.ndarray, index: int, logo) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame).convert("RGBA")
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=round(0.06 * HEIGHT))
    draw.rectangle((64, 576, 400, 640), fill=(0, 0, 0, 128))
    draw.text((70, 580), "Goal! #10", font=font, fill=(255, 255, 255, 255))
    draw.rectangle((128, 72, 384, 216), outline=(255, 0, 0, 255), width=4)
    draw.ellipse((640, 144, 768, 252), fill=(0, 255, 0, 128))
    image = Image.alpha_composite(image, layer)
    mask = Image.new("L", image.size, 0)
    cx = 0.4 + 0.15 * min(1.0, index / 48)
    ImageDraw.Draw(mask).ellipse((cx * WIDTH, 360, (cx + 0.08) * WIDTH, 468), fill=255)
    image = Image.composite(image, Image.eval(image, lambda v: v // 2), mask)
    small = logo.resize((154, 77))
    image.alpha_composite(small, (1088, 22))
    return np.asarray(image.convert("RGB"))


def run(kind: str, batch: list[np.ndarray], painter: Painter, logo, out: Path) -> float:
    started = time.perf_counter()
    if kind == "encode":
        with VideoWriter(out, WIDTH, HEIGHT, FPS) as writer:
            for frame in batch:
                writer.write(frame)
    elif kind == "ours":
        for i, frame in enumerate(batch):
            painter.paint(frame.copy(), i)
    else:
        for i, frame in enumerate(batch):
            via_pil(frame, i, logo)
    return (time.perf_counter() - started) / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    batch = frames(args.frames)
    specs = overlays()
    painter, logo = Painter(specs, WIDTH, HEIGHT, FPS), decode_png(specs[-1]["png"])
    best = {"encode": float("inf"), "ours": float("inf"), "via PIL": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for kind in best:
                best[kind] = min(best[kind], run(kind, batch, painter, logo, Path(tmp) / "o.mp4"))
    for kind, seconds in best.items():
        print(f"{kind:<8} {seconds * 1000:7.2f} ms/frame  {seconds / best['encode']:5.2f}x encode")
    print(f"ours is {best['via PIL'] / best['ours']:.1f}x faster than the whole frame through PIL")


if __name__ == "__main__":
    main()
