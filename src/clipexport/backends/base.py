"""The Backend protocol: run segment tasks, report their events.

A backend owns where the work happens and how it is followed; the
orchestrator owns what the work is. Backends translate their own failures
into `clipexport.errors.BackendError` (with `resumable`) at this boundary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from clipexport.worker import SegmentTask

EmitFn = Callable[[dict[str, Any]], None]


class Backend(Protocol):
    """Runs segment tasks, relaying each partial event to `emit` in order."""

    name: str

    def run(self, tasks: Sequence[SegmentTask], emit: EmitFn, stop: threading.Event) -> None:
        """Run every task; return when all are stored, raise on failure.

        `stop` is set when the client wants to stop: a backend finishes or
        abandons the segment in hand (never leaving a partial file under a
        segment key) and returns.
        """
        ...
