"""`python -m tests.counted_run ARGS...`: the clipexport CLI with every frame entering the model counted.

Test instrumentation, kept out of the package. It wraps `Upscaler.upscale`
to append each batch's frame count to the file `CLIPEXPORT_COUNT_FILE`
before the model runs (a kill mid-batch still counts it: the count errs
high, against the code under test), and, with `CLIPEXPORT_KILL_AT_FRAME=N`,
SIGKILLs its own process once N frames have gone through the model in this
process: a real SIGKILL at a real moment of the work, with no way to clean up.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from clipexport.cli import main
from clipexport.upscale.engine import Upscaler


def _counted(upscale: Callable[[Any, Any], Any], count_file: str, kill_at: int | None) -> Callable[[Any, Any], Any]:
    seen = 0

    def counted(self: Any, frames: Any) -> Any:
        nonlocal seen
        n = frames.shape[0] if frames.ndim == 4 else 1
        with open(count_file, "a") as f:
            f.write(f"{n}\n")
        out = upscale(self, frames)
        seen += n
        if kill_at is not None and seen >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return counted


if __name__ == "__main__":
    kill_at = os.environ.get("CLIPEXPORT_KILL_AT_FRAME")
    Upscaler.upscale = _counted(Upscaler.upscale, os.environ["CLIPEXPORT_COUNT_FILE"],  # type: ignore[method-assign]
                                int(kill_at) if kill_at else None)
    main()
