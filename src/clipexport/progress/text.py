"""The ETA in words, and elapsed time as a clock.

`eta_text` is a pure function of the remaining seconds: coarse on purpose
("About 4 minutes remaining"), so the words change rarely. `EtaWords` adds a
little hysteresis on top, so an estimate that hovers on a boundary does not
make the text flip back and forth.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tracker import JobInfo, PhaseRow, Snapshot

ALMOST_DONE_S = 10.0


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _bucket(remaining_s: float) -> tuple[str, int]:
    """(kind, count) the words are made of: kinds 'almost', 'seconds' (tens), 'minutes', 'tenmin', 'hours'."""
    if remaining_s < ALMOST_DONE_S:
        return "almost", 0
    if remaining_s < 60.0:
        return "seconds", min(50, max(10, _round(remaining_s / 10.0) * 10))
    minutes = max(1, _round(remaining_s / 60.0))
    if minutes < 60:
        return "minutes", minutes
    if remaining_s < 24 * 3600:
        return "tenmin", _round(remaining_s / 600.0) * 10
    return "hours", _round(remaining_s / 3600.0)


def _words(kind: str, count: int) -> str:
    if kind == "almost":
        return "Almost done…"
    if kind == "seconds":
        return f"About {count} seconds remaining"
    if kind == "minutes":
        return f"About {_plural(count, 'minute')} remaining"
    if kind == "tenmin":
        hours, minutes = divmod(count, 60)
        if minutes == 0:
            return f"About {_plural(hours, 'hour')} remaining"
        return f"About {_plural(hours, 'hour')} {minutes} minutes remaining"
    return f"About {_plural(count, 'hour')} remaining"


def eta_text(remaining_s: float | None, state: str = "running") -> str:
    """The ETA as a person says it.

    >>> eta_text(200)
    'About 3 minutes remaining'
    """
    if state == "done":
        return "Done"
    if state == "error":
        return "Failed"
    if state == "cancelled":
        return "Cancelled"
    if remaining_s is None or not math.isfinite(remaining_s) or remaining_s < 0:
        return "Estimating time remaining…"
    return _words(*_bucket(remaining_s))


WIDE_RANGE = 1.6  # hi/lo above which the range is shown rather than one number


def _span(seconds: float) -> str:
    """A duration, coarse: '40 s', '3 min', '2 h'."""
    if seconds < 60.0:
        return f"{max(10, _round(seconds / 10.0) * 10)} s" if seconds >= 10 else f"{max(1, _round(seconds))} s"
    if seconds < 3600.0:
        return f"{max(1, _round(seconds / 60.0))} min"
    return f"{_round(seconds / 3600.0)} h"


def range_text(lo: float, hi: float) -> str:
    """An 80 % range as a person says it: 'About 40 s to 2 min remaining'."""
    low, high = _span(lo), _span(hi)
    if low == high:
        return f"About {low} remaining"
    return f"About {low} to {high} remaining"


class EtaWords:
    """`eta_text` with hysteresis: the minute count moves only when the
    estimate is clearly past the boundary (by `margin` of a unit)."""

    def __init__(self, margin: float = 0.25) -> None:
        self.margin = margin
        self._last: tuple[str, int] | None = None

    def __call__(self, remaining_s: float | None, state: str = "running",
                 lo: float | None = None, hi: float | None = None) -> str:
        """The words for `remaining_s`; while the 80 % range (`lo`, `hi`) is wide, the range itself."""
        if state != "running" or remaining_s is None or not math.isfinite(remaining_s) or remaining_s < 0:
            self._last = None
            return eta_text(remaining_s, state)
        if lo is not None and hi is not None and lo > 0 and hi / lo > WIDE_RANGE and remaining_s >= ALMOST_DONE_S:
            return range_text(lo, hi)
        kind, count = _bucket(remaining_s)
        last = self._last
        if last is not None and last[0] == kind and kind != "almost" and count != last[1]:
            unit = {"seconds": 1.0, "minutes": 60.0, "tenmin": 60.0, "hours": 3600.0}[kind]
            step = 10 if kind in ("seconds", "tenmin") else 1
            exact = remaining_s / unit
            # keep the shown count while the estimate is within the margin of it
            if abs(exact - last[1]) < step / 2 + self.margin * step:
                count = last[1]
        self._last = (kind, count)
        return _words(kind, count)


def clock(seconds: float | None) -> str:
    """Elapsed time as H:MM:SS; unknown is '-:--:--'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


_DECIMAL = ("bytes", "kB", "MB", "GB", "TB", "PB")


def _bytes(n: float) -> tuple[str, str]:
    """(number, suffix) in decimal units, as `rich.filesize.decimal` does."""
    if n < 1000:
        return f"{int(n):,}", "bytes"
    i = min(int(math.log(n, 1000)), len(_DECIMAL) - 1)
    return f"{n / 1000**i:.1f}", _DECIMAL[i]


def amount(done: float, total: float | None, unit: str | None) -> str:
    """Work in its own unit: '30.2/48.2 MB', '576/1,440 frames', '12.0 MB'."""
    if unit == "bytes":
        if total is not None and total > 0:
            scale = max(total, done)
            i = 0 if scale < 1000 else min(int(math.log(scale, 1000)), len(_DECIMAL) - 1)
            div = 1000**i
            fmt = (lambda x: f"{int(x):,}") if i == 0 else (lambda x: f"{x / div:.1f}")
            return f"{fmt(done)}/{fmt(total)} {_DECIMAL[i]}"
        num, suffix = _bytes(done)
        return f"{num} {suffix}"
    word = unit or ""
    if total is not None:
        text = f"{int(done):,}/{int(total):,}"
    else:
        text = f"{int(done):,}"
    return f"{text} {word}".rstrip()


def rate_text(rate: float | None, unit: str | None) -> str:
    """'3.1 MB/s', '12.1 frames/s'; '' when unknown."""
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return ""
    if unit == "bytes":
        num, suffix = _bytes(rate)
        return f"{num} {suffix}/s"
    if rate < 10:
        return f"{rate:.1f} {unit or 'units'}/s"
    return f"{rate:,.0f} {unit or 'units'}/s"


def size_text(n: float) -> str:
    """A file size in decimal units: '1.2 MB'."""
    num, suffix = _bytes(n)
    return f"{num} {suffix}"


def duration_text(seconds: float) -> str:
    """A length of video: '3.0 s' under a minute, else H:MM:SS."""
    return f"{seconds:.1f} s" if seconds < 60 else clock(seconds)


def _name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def header_parts(info: JobInfo) -> list[str]:
    """The header of a job, piece by piece: inputs → output, resolution in → out,
    model, device, precision, backend (each only when the events carry it)."""
    parts = []
    if info.inputs:
        names = [_name(p) for p in info.inputs]
        ins = " + ".join(names) if len(names) <= 2 else f"{names[0]} + {len(names) - 1} more"
        parts.append(f"{ins} → {_name(info.output)}" if info.output else ins)
    if info.in_size is not None and info.out_size is not None:
        (iw, ih), (ow, oh) = info.in_size, info.out_size
        parts.append(f"{iw}x{ih} → {ow}x{oh}")
    parts += [p for p in (info.model, info.device, info.precision, info.backend) if p]
    return parts


def summary_parts(snap: Snapshot) -> list[str]:
    """The end of a finished job, after its output path: size, resolution,
    duration, time taken, average speed, cost (each only when known). No
    speed when earlier work was reused: it would count frames not rendered."""
    info, elapsed = snap.info, snap.elapsed
    parts = []
    if info.output_bytes is not None:
        parts.append(size_text(info.output_bytes))
    if info.out_size is not None:
        parts.append(f"{info.out_size[0]}x{info.out_size[1]}")
    if info.duration_s is not None:
        parts.append(f"{duration_text(info.duration_s)} of video")
    parts.append(f"took {clock(elapsed)}")
    if info.frames and elapsed > 0 and not any(row.skipped for row in snap.phases):
        speed = f"{rate_text(info.frames / elapsed, 'frames')}"
        if info.duration_s:
            speed += f" ({info.duration_s / elapsed:.2g}x real time)"
        parts.append(speed)
    if info.gpu_s is not None:
        parts.append(f"{clock(info.gpu_s)} GPU time billed")
    if info.cost_usd is not None:
        parts.append(f"${info.cost_usd:.2f}" if info.cost_usd >= 0.1 else f"${info.cost_usd:.3f}")
    return parts


def skip_notes(rows: Iterable[PhaseRow], info: JobInfo) -> list[str]:
    """Work served from earlier runs, in words: '3 of 5 segments already rendered'."""
    notes = []
    for row in rows:
        if not row.skipped:
            continue
        if row.phase == "upscale":
            of = info.segments or row.parts
            notes.append(f"{row.skipped} of {of} segment{'s' if of != 1 else ''} already rendered")
        elif row.phase == "upload":
            if row.skipped == row.parts:
                notes.append("upload skipped: already in the store")
            else:
                notes.append(f"{row.skipped} of {row.parts} inputs already in the store")
    return notes


def pack(parts: list[str], width: int, sep: str = " · ") -> list[str]:
    """Join `parts` into as few lines of at most `width` as fit, breaking only
    between parts, with the lines as even as that allows: a header that needs
    two lines splits in the middle rather than leaving one word on the second
    (a part longer than `width` gets a line of its own)."""
    lines = _greedy(parts, width, sep)
    narrowest = max((len(part) for part in parts), default=0)
    for room in range(narrowest, width):
        even = _greedy(parts, room, sep)
        if len(even) == len(lines):
            return even
    return lines


def _greedy(parts: list[str], width: int, sep: str) -> list[str]:
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return lines


def fold(text: str, width: int) -> list[str]:
    """`text` broken between words into lines of at most `width` (a terminal
    would cut mid-word). A `quoted command` stays whole so it can be copied."""
    keep = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\xa0"), text)
    lines = textwrap.wrap(keep, width, break_long_words=False, break_on_hyphens=False)
    return [line.replace("\xa0", " ") for line in lines] or [""]
