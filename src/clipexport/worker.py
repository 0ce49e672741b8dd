"""The job body that runs next to the GPU, shared by every backend.

`run_segment` is a generator over one segment: decode its frames, upscale
them, encode them, store the file under its content key, yielding cumulative
progress as partial contract events all the while. The local backend relays
what it yields straight to the client; the Modal backend runs the very same
generator inside a container and publishes it to the storage progress
channel. A segment's key is derived from everything that shapes its output,
so a finished segment is never computed twice, by any backend, in any job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from clipexport.events import Throttle
from clipexport.media import ClipPlan, Segment, VideoWriter, read_frames

SEGMENT_SUFFIX = ".mp4"


class FrameUpscaler(Protocol):
    """What the worker needs of `clipexport.upscale.Upscaler`."""

    scale: int

    def stream(self, frames: Any, *, batch: int = 4) -> Generator[Any, None, None]: ...


@dataclass(frozen=True)
class SegmentTask:
    """One unit of work, complete enough to run anywhere."""

    job: str
    segment: Segment
    clip: ClipPlan
    key: str
    codec: str = "h264"
    crf: int | None = None
    attempt: int = 1
    input_key: str | None = None  # where a remote worker fetches the clip from the store


def segment_key(
    input_sha256: str,
    clip: ClipPlan,
    segment: Segment,
    *,
    model: str,
    weights_id: str,
    scale: int,
    codec: str,
    crf: int | None,
) -> str:
    """The storage key of a segment's output: a hash of all that shapes it."""
    shape = {
        "input": input_sha256,
        "source_start": clip.start_frame,
        "start": segment.start,
        "count": segment.count,
        "size": list(clip.size),
        "fps": str(clip.fps),
        "crop": None if clip.crop is None else [clip.crop.width, clip.crop.height, clip.crop.x, clip.crop.y],
        "model": model,
        "weights": weights_id,
        "scale": scale,
        "codec": codec,
        "crf": crf,
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    return f"segments/{digest[:32]}{SEGMENT_SUFFIX}"


def run_segment(
    task: SegmentTask,
    upscaler: FrameUpscaler,
    out_path: Path,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[dict[str, Any]]:
    """Upscale and encode one segment into `out_path`, yielding progress.

    Frames are encoded as they leave the model, so `upscale` and `encode`
    progress together; `encode` ends after the encoder's flush. The file is
    written under a temporary name and renamed at the end, so `out_path`
    exists only when complete: that is what makes a segment idempotent.
    """
    seg, total = task.segment, task.segment.count
    common = {"part": seg.name, "unit": "frames", "total": total, "attempt": task.attempt}
    started = clock()
    yield {"type": "phase_start", "phase": "upscale", **common}
    yield {"type": "phase_start", "phase": "encode", **common}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp{out_path.suffix}")
    try:
        done = yield from _encode_frames(task, upscaler, tmp, common, clock)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    elapsed = round(clock() - started, 3)
    end = {**common, "done": done, "elapsed": elapsed}
    yield {"type": "progress", "phase": "upscale", **common, "done": done}
    yield {"type": "phase_end", "phase": "upscale", **end}
    yield {"type": "progress", "phase": "encode", **common, "done": done}
    yield {"type": "phase_end", "phase": "encode", **end, "bytes": out_path.stat().st_size}


def _encode_frames(
    task: SegmentTask,
    upscaler: FrameUpscaler,
    tmp: Path,
    common: dict[str, Any],
    clock: Callable[[], float],
) -> Iterator[dict[str, Any]]:
    """Pipe decoded frames through the model into the encoder; return the count."""
    seg, clip, scale = task.segment, task.clip, upscaler.scale
    width, height = clip.size
    frames = read_frames(clip, seg.start, seg.count)
    done, throttle = 0, Throttle(clock=clock)
    # `closing` stops the model's threads as soon as anything goes wrong here
    # (Ctrl-C included): a traceback would otherwise keep the stream alive,
    # and a process exiting with torch mid-batch in another thread aborts.
    with (
        VideoWriter(tmp, width * scale, height * scale, clip.fps, codec=task.codec, crf=task.crf) as writer,
        closing(upscaler.stream(frames)) as upscaled,
    ):
        for frame in upscaled:
            writer.write(frame)
            done += 1
            if throttle.ready():
                yield {"type": "progress", "phase": "upscale", **common, "done": done}
                yield {"type": "progress", "phase": "encode", **common, "done": done}
    return done
