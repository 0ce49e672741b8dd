"""Resume from inside a segment: a SIGKILL costs at most one fragment (a second of video) of upscaling.

Renders run as real processes (`tests/counted_run.py`: the CLI with every
frame entering the model counted in a file) and are SIGKILLed by that
wrapper as the N-th frame enters the model. After each kill the
test reads what is durable on disk (whole segments, whole fragments): the
frames upscaled so far minus those are the frames the kill lost.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import av
import pytest

from clipexport import events
from clipexport.jobs import JobStore
from tests.clips import make_clip, read_index

FPS = 24
RUN = [sys.executable, "-m", "tests.counted_run"]
CLI = [sys.executable, "-m", "clipexport"]
DEADLINE_S = 240


class Counted:
    """Runs the counted CLI; knows the frames upscaled so far and those kept on disk."""

    def __init__(self, tmp_path: Path, home: Path) -> None:
        self.count_file = tmp_path / "upscaled.txt"
        self.segments = home / "data" / "store" / "segments"
        self.store = JobStore(home / "state")

    def run(self, *args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "CLIPEXPORT_COUNT_FILE": str(self.count_file)}
        env.pop("CLIPEXPORT_KILL_AT_FRAME", None)
        if kill_at is not None:
            env["CLIPEXPORT_KILL_AT_FRAME"] = str(kill_at)
        return subprocess.run([*RUN, *args, "--progress", "none"], env=env, capture_output=True, text=True,
                              timeout=DEADLINE_S)

    def upscaled(self) -> int:
        """Frames that went into the model, over every process so far."""
        return len(self.count_file.read_text().split()) if self.count_file.exists() else 0

    def kept(self) -> int:
        """Frames durable on disk: in whole segments, else in their whole fragments."""
        frames = 0
        for segment in self.segments.glob("*.mp4"):
            frames += _frames(segment)
        for partial in self.segments.glob("*.partial"):
            if not partial.with_suffix(".mp4").exists():
                frames += sum(_frames(f) for f in partial.glob("*/[0-9]*.mp4"))
        return frames

    def job(self) -> str:
        return self.store.all()[0].id


def _frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return container.streams.video[0].frames


def frame_indices(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [read_index(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def render_args(clip: Path, out: Path) -> list[str]:
    return ["render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "96"]


def test_sigkill_61_frames_into_a_segment_redoes_at_most_a_second(tmp_path, clipexport_home):
    """The issue's case: killed 61 frames into a 96-frame segment, the resume starts at frame 48."""
    clip = make_clip(tmp_path / "clip.mp4", frames=120, width=64, height=36, fps=FPS)
    out = tmp_path / "out.mp4"
    counted = Counted(tmp_path, clipexport_home)
    killed = counted.run(*render_args(clip, out), kill_at=61)
    assert killed.returncode == -9, killed.stderr
    kept, upscaled = counted.kept(), counted.upscaled()
    assert kept == 48 and upscaled - kept <= FPS, (kept, upscaled)

    job = counted.job()
    resumed = counted.run("resume", job)
    assert resumed.returncode == 0, resumed.stderr
    assert counted.upscaled() == 120 + (upscaled - kept), "the resume upscales exactly what was not kept"
    assert frame_indices(out) == list(range(120))
    log = list(events.read_events(counted.store.log_path(job)))
    starts = [(e["attempt"], e.get("done")) for e in log
              if e["type"] == "phase_start" and e.get("part") == "seg-0001" and e["phase"] == "upscale"]
    assert starts == [(1, 0), (2, 48)], "attempt 2 is shown from the frames it kept"


def test_cancel_drops_the_fragments_of_a_killed_job(tmp_path, clipexport_home):
    clip = make_clip(tmp_path / "clip.mp4", frames=60, width=32, height=18, fps=FPS)
    counted = Counted(tmp_path, clipexport_home)
    killed = counted.run(*render_args(clip, tmp_path / "out.mp4"), kill_at=30)
    assert killed.returncode == -9, killed.stderr
    assert counted.kept() == FPS, "one whole fragment was on disk"
    cancelled = subprocess.run([*CLI, "cancel", counted.job()], capture_output=True, text=True, timeout=DEADLINE_S)
    assert cancelled.returncode == 0, cancelled.stderr
    assert list(counted.segments.glob("*.partial*")) == [], "a cancelled job's fragments are its own: gone"


@pytest.mark.stress
def test_random_sigkills_each_redo_at_most_a_second(tmp_path, clipexport_home):
    """Kills at random frames until the job ends; each loses at most `fps` frames of upscaling."""
    rng = random.Random(99)
    total = 240
    clip = make_clip(tmp_path / "clip.mp4", frames=total, width=64, height=36, fps=FPS)
    out = tmp_path / "out.mp4"
    counted = Counted(tmp_path, clipexport_home)
    args, lost = render_args(clip, out), []
    while True:
        proc = counted.run(*args, kill_at=rng.randint(1, 40))
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, proc.stderr
        lost.append(counted.upscaled() - counted.kept() - sum(lost))  # upscaled = kept + every kill's loss
        args = ["resume", counted.job()]
    assert len(lost) >= 10, "the kills should land before the job ends"
    print(f"\nframes redone per kill: max {max(lost)}, mean {sum(lost) / len(lost):.1f} over {len(lost)} kills "
          f"(fps {FPS})")
    assert max(lost) <= FPS
    assert counted.upscaled() == total + sum(lost), "each resume starts exactly after what was kept"
    assert frame_indices(out) == list(range(total))
