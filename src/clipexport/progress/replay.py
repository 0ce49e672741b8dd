"""Replay event logs through the live code path (`clipexport eta replay`).

Each trace gets a fresh `Tracker`; after each event, the snapshot at that
event's `t` is one output line, with the 80 % range of the remaining time
(`remaining_lo_s`, `remaining_hi_s`) where the estimator has one. A
prediction at time t therefore depends only on the events up to t, and
replaying a truncated trace gives the same lines up to the cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..events import read_events
from .model import TimingModel
from .tracker import Tracker


def replay_events(events: Iterable[dict], model: TimingModel, name: str = "") -> Iterator[dict[str, Any]]:
    tracker = Tracker(model)
    for event in events:
        t = event.get("t") if isinstance(event, dict) else None
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            continue
        tracker.feed(event)
        snap = tracker.snapshot(float(t))
        line = {
            "trace": name,
            "seq": event.get("seq"),
            "t": t,
            "fraction": round(snap.fraction, 6),
            "remaining_s": None if snap.remaining_s is None else round(snap.remaining_s, 3),
        }
        if snap.remaining_lo_s is not None and snap.remaining_hi_s is not None:  # the 80 % range
            line.update(remaining_lo_s=round(snap.remaining_lo_s, 3), remaining_hi_s=round(snap.remaining_hi_s, 3))
        yield line


def replay_traces(paths: Iterable[Path], model: TimingModel) -> Iterator[dict[str, Any]]:
    """The JSON lines of `eta replay`, trace after trace."""
    for path in paths:
        path = Path(path)
        yield from replay_events(read_events(path), model, path.name)
