"""Helpers shared by the media modules: the PyAV errors caught at this boundary, one-line messages."""

from __future__ import annotations

from fractions import Fraction

import av
import av.error

# PyAV raises its own FFmpegError tree, plus OSError/EOFError subclasses and, for
# odd metadata or arguments, ValueError/RuntimeError/TypeError.
_AV_ERRORS: tuple[type[BaseException], ...] = (
    av.error.FFmpegError,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
)


# --------------------------------------------------------------------------- helpers


def _reason(exc: BaseException) -> str:
    """One-line description of a (PyAV) exception, without the file name."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _seconds(value: Fraction | float) -> str:
    return f"{float(value):.3f}".rstrip("0").rstrip(".") + "s"
