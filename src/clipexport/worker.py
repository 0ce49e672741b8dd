"""The job body that runs next to the GPU, shared by every backend.

`run_segment` is a generator over one segment: decode its frames, upscale
them, encode them as fragments of about a second (each recorded once whole,
so a killed segment resumes after the last one), join them into the file
stored under its content key, yielding cumulative progress as partial
contract events all the while. The local backend relays
what it yields straight to the client; the Modal backend runs the very same
generator inside a container and publishes it to the storage progress
channel. A segment's key is derived from everything that shapes its output,
so a finished segment is never computed twice, by any backend, in any job.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from clipexport.events import Throttle
from clipexport.media import ClipPlan, Segment, VideoWriter, join_video, read_frames
from clipexport.overlay import Painter

SEGMENT_SUFFIX = ".mp4"


class FrameUpscaler(Protocol):
    """What the worker needs of `clipexport.upscale.Upscaler`."""

    scale: int

    def stream(self, frames: Any, *, batch: int | None = None) -> Generator[Any, None, None]: ...


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
    overlays: tuple[dict[str, Any], ...] = ()  # those showing in this segment, drawn in order


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
    precision: str,
    overlays: Sequence[dict[str, Any]] = (),
) -> str:
    """The storage key of a segment's output: a hash of all that shapes it.

    `overlays` are those showing in the segment: changing one re-renders
    only the segments it touches. An image counts by its sha256, not its path.
    """
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
        "precision": precision,
    }
    if clip.info.crowded:  # its frames are placed so that none is lost (media.plan.pushed_slots)
        shape["placement"] = "pushed"
    if overlays:  # absent otherwise: keys of segments without overlays stay as they were
        shape["overlays"] = [{k: v for k, v in o.items() if k not in ("png", "path")} for o in overlays]
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    return f"segments/{digest[:32]}{SEGMENT_SUFFIX}"


def fragment_frames(fps: Fraction) -> int:
    """Frames per fragment: one second of video (keyint = round(fps)), at least one."""
    return max(1, round(fps))


class FragmentDir:
    """A segment's finished fragments, in one directory, while the segment is written.

    A segment is written as fragments of about a second, each by its own
    encoder run: each starts on an IDR frame and refers to nothing before it
    (a closed GOP of `fragment_frames` frames), so the segment stays valid
    when cut after any of them. Fragment `i` is written under a temporary
    name and renamed to `0000i.mp4` (`00012.mp4`) once whole: its file is the record that
    it is done, so a killed worker resumes at the frame after the last one.
    The directory is named after the segment's key and the job, so the
    job's next attempt continues it, and two jobs that render the same
    segment at once never write into each other's.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, index: int) -> Path:
        return self.root / f"{index:05d}{SEGMENT_SUFFIX}"

    def count(self) -> int:
        """How many fragments, from the first, are whole."""
        index = 0
        while self.path(index).is_file():
            index += 1
        return index

    def scratch(self, index: int) -> Path:
        """A fresh temporary name to write fragment `index` under."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f".{index:05d}.{os.getpid()}.{secrets.token_hex(4)}.tmp{SEGMENT_SUFFIX}"

    def note(self, index: int) -> Path:
        """Where fragment `index`'s damaged frames are noted (only when it has some)."""
        return self.root / f"{index:05d}.damaged.json"

    def add(self, index: int, written: Path, damaged: Sequence[int] = ()) -> None:
        """Record fragment `index`, whole in `written`, with the clip's frames in it that repeat an undecodable one.

        The note goes first: a fragment on record always has its damage
        noted, so a resumed segment reports the damage of those it keeps.
        """
        if damaged:
            self.note(index).write_text(json.dumps(list(damaged)), encoding="utf-8")
        else:
            self.note(index).unlink(missing_ok=True)
        os.replace(written, self.path(index))

    def damaged(self, count: int) -> list[int]:
        """The damaged frames noted with fragments 0..count-1, whichever run wrote them."""
        found: list[int] = []
        for index in range(count):
            note = self.note(index)
            if note.is_file():
                found += json.loads(note.read_text(encoding="utf-8"))
        return found

    def paths(self, count: int) -> list[Path]:
        """The files of fragments 0..count-1, here."""
        return [self.path(i) for i in range(count)]

    def clear(self) -> None:
        """Drop them: the segment they made is stored."""
        shutil.rmtree(self.root, ignore_errors=True)
        with suppress(OSError):  # another job's fragments of the same segment may be there
            self.root.parent.rmdir()


def fragment_prefix(key: str, job: str) -> str:
    """Where a job's fragments of segment `key` are kept, beside the segment: `<key stem>.partial/<job>/`.

    Named after the job, so they are that job's alone: a cancel drops them.
    """
    return f"{Path(key).with_suffix('.partial').as_posix()}/{job}/"


def fragments_beside(out_path: Path, job: str) -> FragmentDir:
    """A job's fragments of the segment that will be `out_path`, in the folder beside it."""
    return FragmentDir(out_path.parent / fragment_prefix(out_path.name, job))


def scratch_path(root: Path, key: str) -> Path:
    """Where a backend that stores segments elsewhere writes segment `key` first (its fragments beside it)."""
    return root / "scratch" / key


def run_segment(
    task: SegmentTask,
    upscaler: FrameUpscaler,
    out_path: Path,
    *,
    fragments: FragmentDir | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[dict[str, Any]]:
    """Upscale, draw the overlays on, and encode one segment into `out_path`, yielding progress.

    Frames are encoded as they leave the model, so `upscale` and `encode`
    progress together; `encode` ends once the fragments are joined. The
    segment is written as fragments (see `FragmentDir`) and continues after
    those already whole: its `done` starts there (on the `phase_start`s too),
    so a resumed part never goes back. The joined file is written under a
    temporary name and renamed at the end, so `out_path` exists only when
    complete: that is what makes a segment idempotent.

    `fragments` defaults to `fragments_beside(out_path, task.job)`, dropped once
    `out_path` is whole; a caller that stores the segment elsewhere passes
    its own and clears it once the segment is stored.
    """
    owned = fragments is None
    fragments = fragments or fragments_beside(out_path, task.job)
    seg, total = task.segment, task.segment.count
    size = fragment_frames(task.clip.fps)
    kept = min(fragments.count() * size, total)
    common = {"part": seg.name, "unit": "frames", "total": total, "attempt": task.attempt}
    started = clock()
    yield {"type": "phase_start", "phase": "upscale", **common, "done": kept}
    yield {"type": "phase_start", "phase": "encode", **common, "done": kept}
    done = yield from _encode_fragments(task, upscaler, fragments, kept, common, clock)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{out_path.suffix}")
    try:
        join_video(fragments.paths(math.ceil(total / size)), tmp, task.clip.fps)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    damaged = fragments.damaged(math.ceil(total / size))  # output frames of the clip that repeat an undecodable one
    if owned:
        fragments.clear()
    elapsed = round(clock() - started, 3)
    end = {**common, "done": done, "elapsed": elapsed}
    yield {"type": "progress", "phase": "upscale", **common, "done": done}
    yield {"type": "phase_end", "phase": "upscale", **end}
    yield {"type": "progress", "phase": "encode", **common, "done": done}
    extra = {"damaged": damaged} if damaged else {}
    yield {"type": "phase_end", "phase": "encode", **end, "bytes": out_path.stat().st_size, **extra}


def _encode_fragments(
    task: SegmentTask,
    upscaler: FrameUpscaler,
    fragments: FragmentDir,
    kept: int,
    common: dict[str, Any],
    clock: Callable[[], float],
) -> Iterator[dict[str, Any]]:
    """Pipe the frames after the `kept` ones through the model into fragments; return the frames done.

    Each fragment gets its own model stream over its own frames, so the
    model never runs ahead into a fragment not yet begun: a kill loses at
    most the fragment in hand.
    """
    seg, clip, scale = task.segment, task.clip, upscaler.scale
    width, height = clip.size
    size, done = fragment_frames(clip.fps), kept
    painter = Painter(task.overlays, width * scale, height * scale, clip.fps) if task.overlays else None
    throttle = Throttle(clock=clock)
    damaged: list[int] = []  # filled by the reader as it goes
    # `closing` stops the decoder and the model's threads as soon as anything
    # goes wrong here (Ctrl-C included): a traceback would otherwise keep the
    # stream alive, and a process exiting with torch mid-batch in another
    # thread aborts.
    with closing(read_frames(clip, seg.start + done, seg.count - done, damaged)) as frames:
        index = kept // size
        while done < seg.count:
            count, noted = min(size, seg.count - done), len(damaged)
            scratch = fragments.scratch(index)
            with (
                VideoWriter(scratch, width * scale, height * scale, clip.fps, codec=task.codec,
                            crf=task.crf) as writer,
                closing(upscaler.stream(islice(frames, count))) as upscaled,
            ):
                for frame in upscaled:
                    writer.write(frame if painter is None else painter.paint(frame, seg.start + done))
                    done += 1
                    if throttle.ready():
                        yield {"type": "progress", "phase": "upscale", **common, "done": done}
                        yield {"type": "progress", "phase": "encode", **common, "done": done}
            fragments.add(index, scratch, damaged[noted:])
            index += 1
    return done
