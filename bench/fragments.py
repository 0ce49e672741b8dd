"""What writing a segment as one-second fragments costs, against one writer for the whole segment, same run.

A segment of a generated clip (tests/clips.py's index clip) is upscaled and
encoded twice, alternating, best of --repeat:

* whole: the way segments were written before fragments: one model stream
  and one VideoWriter over the whole segment;
* fragments: `worker.run_segment`: a model stream and a VideoWriter per
  fragment of round(fps) frames, then the stream-copy join.

Prints the seconds of each and their ratio (fragments / whole), and the
output sizes. CPU, the real model; the ratio is what matters.

    python bench/fragments.py [--frames 96] [--size 128x72] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CLIPEXPORT_WEIGHTS_SOURCE", "offline")

from clipexport.media import VideoWriter, plan_clips, plan_segments, probe, read_frames  # noqa: E402
from clipexport.upscale import load_upscaler  # noqa: E402
from clipexport.worker import SegmentTask, run_segment  # noqa: E402
from tests.clips import make_clip  # noqa: E402


def whole(task: SegmentTask, upscaler, out: Path) -> None:
    seg, clip = task.segment, task.clip
    width, height = clip.size
    with (
        VideoWriter(out, width * upscaler.scale, height * upscaler.scale, clip.fps) as writer,
        closing(upscaler.stream(read_frames(clip, seg.start, seg.count))) as frames,
    ):
        for frame in frames:
            writer.write(frame)


def fragmented(task: SegmentTask, upscaler, out: Path) -> None:
    for _ in run_segment(task, upscaler, out):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--size", default="128x72")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    upscaler = load_upscaler("realesr-animevideov3", scale=2, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip = make_clip(root / "clip.mp4", frames=args.frames, width=width, height=height, fps=24, audio=False)
        plan = plan_clips([probe(clip)], [None], [None])[0]
        task = SegmentTask("cx-bench0", plan_segments([plan.frames], args.frames)[0], plan, "segments/b.mp4")
        best = {"whole": float("inf"), "fragments": float("inf")}
        sizes = {}
        for i in range(args.repeat):
            for name, body in (("whole", whole), ("fragments", fragmented)):
                out = root / f"{name}-{i}.mp4"
                started = time.perf_counter()
                body(task, upscaler, out)
                best[name] = min(best[name], time.perf_counter() - started)
                sizes[name] = out.stat().st_size
    print(f"{args.frames} frames {width}x{height} x2, best of {args.repeat}: "
          f"whole {best['whole']:.2f} s, fragments {best['fragments']:.2f} s, "
          f"ratio {best['fragments'] / best['whole']:.2f}; "
          f"size whole {sizes['whole']} B, fragments {sizes['fragments']} B "
          f"({sizes['fragments'] / sizes['whole']:.2f}x)")


if __name__ == "__main__":
    main()
