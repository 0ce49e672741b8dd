"""`python -m tests.counted_run ARGS...`: the clipexport CLI with every frame entering the model counted.

Test instrumentation, kept out of the package. It wraps `Upscaler.stream`
(the worker's way into the model; the speed probe's frames are not the
job's) to append a line to the file `CLIPEXPORT_COUNT_FILE` for each frame
as the stream takes it in, before the model has run on it (the count errs
high, against the code under test), and, with `CLIPEXPORT_KILL_AT_FRAME=N`,
SIGKILLs its own process as the N-th frame enters: a real SIGKILL at a real
moment of the work, with no way to clean up.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from clipexport.cli import main
from clipexport.upscale.engine import Upscaler


def _counted(stream: Callable[..., Any], count_file: str, kill_at: int | None) -> Callable[..., Any]:
    seen = 0

    def entering(frames: Iterable[Any]) -> Iterator[Any]:
        nonlocal seen
        for frame in frames:
            with open(count_file, "a") as f:
                f.write("1\n")
            seen += 1
            if seen == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield frame

    def counted(self: Any, frames: Iterable[Any], **options: Any) -> Any:
        return stream(self, entering(frames), **options)

    return counted


if __name__ == "__main__":
    kill_at = os.environ.get("CLIPEXPORT_KILL_AT_FRAME")
    Upscaler.stream = _counted(Upscaler.stream, os.environ["CLIPEXPORT_COUNT_FILE"],  # type: ignore[method-assign]
                               int(kill_at) if kill_at else None)
    main()
