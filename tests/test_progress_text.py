"""The ETA in words and the unit formatting, table-driven."""

from __future__ import annotations

import math

import pytest

from clipexport.progress.text import EtaWords, amount, clock, eta_text, fold, pack, rate_text


@pytest.mark.parametrize(
    ("remaining", "state", "text"),
    [
        (None, "running", "Estimating time remaining…"),
        (math.nan, "running", "Estimating time remaining…"),
        (math.inf, "running", "Estimating time remaining…"),
        (-1.0, "running", "Estimating time remaining…"),
        (0.0, "running", "Almost done…"),
        (9.9, "running", "Almost done…"),
        (10.0, "running", "About 10 seconds remaining"),
        (24.9, "running", "About 20 seconds remaining"),
        (25.0, "running", "About 30 seconds remaining"),
        (59.9, "running", "About 50 seconds remaining"),
        (60.0, "running", "About 1 minute remaining"),
        (89.0, "running", "About 1 minute remaining"),
        (90.0, "running", "About 2 minutes remaining"),
        (29 * 60 + 29, "running", "About 29 minutes remaining"),
        (59 * 60 + 29, "running", "About 59 minutes remaining"),
        (59 * 60 + 31, "running", "About 1 hour remaining"),
        (80 * 60, "running", "About 1 hour 20 minutes remaining"),
        (2 * 3600 + 4 * 60, "running", "About 2 hours remaining"),
        (3 * 86400, "running", "About 72 hours remaining"),
        (100.0, "done", "Done"),
        (100.0, "error", "Failed"),
        (None, "cancelled", "Cancelled"),
    ],
)
def test_eta_text(remaining, state, text):
    assert eta_text(remaining, state) == text


def test_eta_words_hold_the_count_near_a_boundary():
    words = EtaWords()
    assert words(4 * 60 + 20) == "About 4 minutes remaining"
    # 4.6 minutes rounds to 5, but is within the margin of 4: the text holds
    assert words(4 * 60 + 36) == "About 4 minutes remaining"
    assert words(4 * 60 + 50) == "About 5 minutes remaining"
    assert words(4 * 60 + 25) == "About 5 minutes remaining"
    assert words(4 * 60 + 5) == "About 4 minutes remaining"
    # a change of kind is never held back
    assert words(50) == "About 50 seconds remaining"
    # under a minute, in tens of seconds, held the same way: 44 s is still "about 50"
    assert words(44) == "About 50 seconds remaining"
    assert words(41) == "About 40 seconds remaining"
    assert words(None) == "Estimating time remaining…"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-:--:--"), (-3, "-:--:--"), (math.inf, "-:--:--"), (0, "0:00:00"), (59.9, "0:00:59"), (3725, "1:02:05"), (360000, "100:00:00")],
)
def test_clock(seconds, text):
    assert clock(seconds) == text


@pytest.mark.parametrize(
    ("done", "total", "unit", "text"),
    [
        (30.2e6, 48.2e6, "bytes", "30.2/48.2 MB"),
        (999, 999, "bytes", "999/999 bytes"),
        (1500, 2_000_000_000, "bytes", "0.0/2.0 GB"),
        (12e6, None, "bytes", "12.0 MB"),
        (0, None, "bytes", "0 bytes"),
        (576, 1440, "frames", "576/1,440 frames"),
        (1500, 1440, "frames", "1,500/1,440 frames"),  # a total corrected late
        (3, None, None, "3"),
    ],
)
def test_amount(done, total, unit, text):
    assert amount(done, total, unit) == text


@pytest.mark.parametrize(
    ("rate", "unit", "text"),
    [(None, "bytes", ""), (0.0, "frames", ""), (math.nan, "frames", ""), (3.1e6, "bytes", "3.1 MB/s"), (512, "bytes", "512 bytes/s"), (9.46, "frames", "9.5 frames/s"), (123.4, "frames", "123 frames/s")],
)
def test_rate_text(rate, unit, text):
    assert rate_text(rate, unit) == text


HEADER = ["sample.mp4 → out.mp4", "160x90 → 320x180", "realesr-animevideov3", "cpu", "fp32", "local"]


@pytest.mark.parametrize(("width", "lines"), [
    (120, ["sample.mp4 → out.mp4 · 160x90 → 320x180 · realesr-animevideov3 · cpu · fp32 · local"]),
    # greedy packing would leave "local" alone on the second line
    (80, ["sample.mp4 → out.mp4 · 160x90 → 320x180", "realesr-animevideov3 · cpu · fp32 · local"]),
    (30, ["sample.mp4 → out.mp4", "160x90 → 320x180", "realesr-animevideov3", "cpu · fp32 · local"]),
])
def test_pack_uses_the_fewest_lines_and_evens_them(width, lines):
    assert pack(HEADER, width) == lines


def test_pack_gives_a_part_wider_than_the_line_its_own_line():
    assert pack(["x" * 70, "y", "z"], 60) == ["x" * 70, "y · z"]


def test_fold_breaks_between_words_and_keeps_a_quoted_command_whole():
    note = "clipexport: job cx-6e29b3 started (resume with `clipexport resume cx-6e29b3`)"
    assert fold(note, 60) == ["clipexport: job cx-6e29b3 started (resume with",
                              "`clipexport resume cx-6e29b3`)"]
    assert fold(note, 120) == [note]
