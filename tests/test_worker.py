"""The worker body: one segment decoded, upscaled by the real model, encoded."""

from __future__ import annotations

import threading

import pytest

from clipexport.media import plan_clips, plan_segments, probe
from clipexport.upscale import load_upscaler
from clipexport.worker import SegmentTask, run_segment
from tests.clips import make_clip


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
    assert not out.exists() and not list(out.parent.iterdir())
