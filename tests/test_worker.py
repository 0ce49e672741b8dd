"""The worker body: one segment decoded, upscaled by the real model, encoded."""

from __future__ import annotations

import dataclasses
import itertools
import threading

import av
import numpy as np
import pytest

from clipexport.media import plan_clips, plan_segments, probe
from clipexport.upscale import load_upscaler
from clipexport.worker import FragmentDir, SegmentTask, fragments_beside, run_segment
from tests.clips import make_clip, read_index


@pytest.fixture(scope="module")
def upscaler():
    return load_upscaler("realesr-animevideov3", scale=2, device="cpu")


def make_task(tmp_path, frames=24):
    clip = make_clip(tmp_path / "clip.mp4", frames=frames, width=64, height=36, fps=24, audio=False)
    plan = plan_clips([probe(clip)], [None], [None])[0]
    segment = plan_segments([plan.frames], frames)[0]
    return SegmentTask("cx-000001", segment, plan, "segments/x.mp4")


def test_a_segment_reports_cumulative_progress_and_lands_whole(tmp_path, upscaler):
    out = tmp_path / "store" / "seg.mp4"
    events = list(run_segment(make_task(tmp_path), upscaler, out))
    done = [e["done"] for e in events if e["type"] == "progress" and e["phase"] == "upscale"]
    assert done == sorted(done) and done[-1] == 24
    assert events[-1]["type"] == "phase_end" and events[-1]["bytes"] == out.stat().st_size > 0
    assert list(out.parent.iterdir()) == [out]


def test_an_interrupted_segment_stops_the_model_threads_at_once(tmp_path, upscaler):
    """Ctrl-C mid-segment: while the traceback still holds the frames, no model thread runs on.

    A model thread left running when the process exits makes torch abort it.
    """
    out = tmp_path / "store" / "seg.mp4"
    body = run_segment(make_task(tmp_path, frames=48), upscaler, out)
    for event in body:
        if event["type"] == "progress":
            break
    with pytest.raises(KeyboardInterrupt) as raised:
        body.throw(KeyboardInterrupt)
    assert raised.traceback  # kept alive on purpose
    running = [t.name for t in threading.enumerate() if t.name.startswith("upscale-")]
    assert running == []
    assert not out.exists()
    assert [p.name for p in out.parent.rglob(".*")] == [], "no temporary file is left behind"


class Counting:
    """The real upscaler, counting the frames that go through the model."""

    def __init__(self, inner):
        self.inner, self.scale, self.frames = inner, inner.scale, 0

    def stream(self, frames, *, batch=4):
        def counted():
            for frame in frames:
                self.frames += 1
                yield frame
        return self.inner.stream(counted(), batch=batch)


def decoded(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_a_segment_cut_inside_resumes_after_its_last_whole_fragment(tmp_path, upscaler):
    """60 frames at 24 fps are fragments of 24, 24, 12: a stop in the second keeps the first."""
    task = make_task(tmp_path, frames=60)
    reference = tmp_path / "reference" / "seg.mp4"
    list(run_segment(task, upscaler, reference))
    out = tmp_path / "store" / "seg.mp4"
    fragments = fragments_beside(out, task.job)
    counting = Counting(upscaler)
    body = run_segment(task, counting, out, clock=itertools.count(0.0, 10.0).__next__)  # progress at every frame
    for event in body:
        if event["type"] == "progress" and event["done"] > 30:
            break
    body.close()  # the process stops here, inside the second fragment
    assert fragments.count() == 1 and not out.exists()
    assert counting.frames <= 48, "the model never runs ahead into the next fragment"

    counting.frames = 0
    resumed = list(run_segment(dataclasses.replace(task, attempt=2), counting, out))
    assert counting.frames == 60 - 24, "only the frames after the whole fragment are upscaled again"
    starts = [e for e in resumed if e["type"] == "phase_start"]
    assert [(e["phase"], e["done"], e["attempt"]) for e in starts] == [("upscale", 24, 2), ("encode", 24, 2)]
    done = [e["done"] for e in resumed if e.get("phase") == "upscale" and "done" in e]
    assert done == sorted(done) and done[-1] == 60
    got, want = decoded(out), decoded(reference)
    assert [read_index(f) for f in got] == list(range(60))
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), "same pixels as in one go"
    assert not fragments.root.exists(), "the fragments go once the segment is whole"


def test_fragments_are_closed_gops_of_one_second(tmp_path, upscaler):
    """Each fragment decodes alone, from a keyframe: the segment can be cut after any of them."""
    task = make_task(tmp_path, frames=60)
    fragments = FragmentDir(tmp_path / "fragments")  # the caller's own: kept after the join
    list(run_segment(task, upscaler, tmp_path / "store" / "seg.mp4", fragments=fragments))
    assert fragments.count() == 3
    for n, path in enumerate(fragments.paths(3)):
        with av.open(str(path)) as container:
            assert next(p for p in container.demux(video=0) if p.size).is_keyframe
        assert [read_index(f) for f in decoded(path)] == list(range(24 * n, min(24 * n + 24, 60))), path
