"""Write examples/sample.mp4: 3 s of a small animated scene with a stereo tone.

It is the clip `make demo` renders. Kept tiny (160x90, 24 fps) so that a CPU
upscales it in well under a minute; regenerate with
`python examples/make_sample.py` (needs only PyAV and numpy).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT, FPS, SECONDS = 160, 90, 24, 3
RATE = 48000


def frame_image(index: int) -> np.ndarray:
    """A sky gradient, a moving sun and a bouncing box: edges for the model."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[..., 0] = 40 + y * 120 // HEIGHT
    image[..., 1] = 80 + y * 100 // HEIGHT
    image[..., 2] = 200 - y * 60 // HEIGHT
    cx, cy = 20 + index * 4 % (WIDTH - 40), 25
    image[(x - cx) ** 2 + (y - cy) ** 2 < 100] = (250, 210, 60)
    bx = int((WIDTH - 30) * (0.5 + 0.5 * math.sin(index / 7)))
    image[60:80, bx : bx + 30] = (30, 30, 30)
    image[62:78, bx + 2 : bx + 28] = (230, 60, 60)
    return image


def main(path: Path = Path(__file__).with_name("sample.mp4")) -> None:
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = {"crf": "23"}
        audio = out.add_stream("aac", rate=RATE, layout="stereo")
        for index in range(FPS * SECONDS):
            frame = av.VideoFrame.from_ndarray(frame_image(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        samples = np.arange(RATE * SECONDS) / RATE
        tone = (0.2 * np.sin(2 * np.pi * 440 * samples)).astype(np.float32)
        chunk = 1024
        for start in range(0, len(tone), chunk):
            piece = np.stack([tone[start : start + chunk]] * 2)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = RATE, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode())
    print(path)


if __name__ == "__main__":
    main()
