"""Mux: join the segment files (stream copy) and add the clips' audio, copied or encoded as AAC.

Conventions (time origin, frame rate and VFR, rotation, odd sizes): see the
package docstring, :mod:`clipexport.media`.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np

from ..errors import ClipexportError, InputError, OutputError
from ._util import _AV_ERRORS, _reason
from .plan import ClipPlan
from .probe import _open_input, video_origin

# Container names accepted for the output, from a suffix or a hint.
_OUTPUT_FORMATS = {
    "mp4": "mp4",
    "m4v": "mp4",
    "mov": "mov",
    "mkv": "matroska",
    "matroska": "matroska",
}

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


class SegmentError(ClipexportError):
    """A segment file is missing, unreadable, or does not match the others or the plan."""


# --------------------------------------------------------------------------- concat and mux


def _output_format(out: Path, hint: str | None) -> str:
    if hint:
        fmt = _OUTPUT_FORMATS.get(hint.lower().lstrip("."))
        if fmt is None:
            raise OutputError(f"{out}: unsupported container {hint!r} (use mp4, mov or mkv)")
        return fmt
    for suffix in reversed(out.suffixes):
        fmt = _OUTPUT_FORMATS.get(suffix.lower().lstrip("."))
        if fmt is not None:
            return fmt
    raise OutputError(f"{out}: unknown output container (use a .mp4, .mov or .mkv name)")


def _audio_fits(codec: str | None, fmt: str) -> bool:
    if codec is None:
        return False
    if fmt == "matroska":
        return True
    return codec == "aac"


def _packet_time(packet: Any) -> float:
    ts = packet.dts if packet.dts is not None else packet.pts
    tb = packet.time_base
    if ts is None or tb is None:
        return 0.0
    return float(ts * tb)


def _interleave(*sources: Iterator[Any]) -> Iterator[Any]:
    """Merge packet iterators by dts time (so the muxer never buffers a whole stream)."""
    heap: list[tuple[float, int, Any]] = []
    iters = list(sources)
    for i, it in enumerate(iters):
        packet = next(it, None)
        if packet is not None:
            heap.append((_packet_time(packet), i, packet))
    heapq.heapify(heap)
    while heap:
        _, i, packet = heapq.heappop(heap)
        yield packet
        nxt = next(iters[i], None)
        if nxt is not None:
            heapq.heappush(heap, (_packet_time(nxt), i, nxt))


def _open_segment(path: Path) -> Any:
    if not path.is_file():
        raise SegmentError(f"{path}: segment file is missing")
    try:
        container = av.open(str(path))
    except _AV_ERRORS as exc:
        raise SegmentError(f"{path}: unreadable segment ({_reason(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise SegmentError(f"{path}: segment has no video stream")
    return container


def _video_packets(
    segments: list[Path], vout: Any, fps: Fraction, expect: tuple[Any, ...], counter: list[int]
) -> Iterator[Any]:
    """Stream-copy the segments' video packets, shifted onto one continuous timeline.

    Each segment starts at pts 0 (as VideoWriter writes it); segment i is
    shifted by the number of frames before it divided by fps, converted
    exactly into its own time base (an exact multiple for MP4 segments).
    dts is kept strictly increasing across the joins.
    """
    offset = Fraction(0)  # seconds before the current segment
    last_dts: Fraction | None = None  # seconds
    for path in segments:
        container = _open_segment(path)
        try:
            vs = container.streams.video[0]
            ctx = vs.codec_context
            got = (ctx.name, ctx.width, ctx.height, bytes(ctx.extradata or b""))
            if got[:3] != expect[:3]:
                raise SegmentError(
                    f"{path}: segment is {got[0]} {got[1]}x{got[2]}, the first is {expect[0]} {expect[1]}x{expect[2]}"
                )
            if expect[3] and got[3] and got[3] != expect[3]:
                raise SegmentError(f"{path}: segment was encoded with other codec parameters than the first")
            tb = Fraction(vs.time_base)
            base = vs.start_time or 0
            shift = round(offset / tb)
            n = 0
            try:
                for packet in container.demux(vs):
                    if packet.size == 0:
                        continue
                    if packet.pts is not None:
                        packet.pts = packet.pts - base + shift
                    if packet.dts is not None:
                        dts = packet.dts - base + shift
                        if last_dts is not None and dts * tb <= last_dts:
                            dts = math.floor(last_dts / tb) + 1
                            if packet.pts is not None and dts > packet.pts:
                                raise SegmentError(f"{path}: timestamps do not continue the previous segment")
                        packet.dts = dts
                        last_dts = dts * tb
                    packet.stream = vout
                    n += 1
                    counter[0] += 1
                    yield packet
            except _AV_ERRORS as exc:
                raise SegmentError(f"{path}: unreadable segment ({_reason(exc)})") from exc
            if n == 0:
                raise SegmentError(f"{path}: segment has no frames")
            offset += Fraction(n) / fps
        finally:
            container.close()


def join_video(parts: list[Path], out: Path, fps: Fraction) -> int:
    """Join video-only files (VideoWriter's, one configuration) by stream copy into ``out``; return frames.

    What a segment written as fragments becomes at the end: the same packets
    on one continuous timeline, in a file that :func:`concat_and_mux` takes
    like any segment. ``out``'s suffix names the container; it is deleted if
    anything fails.
    """
    out = Path(out)
    if not parts:
        raise SegmentError(f"{out}: no fragments to join")
    try:
        out_c = av.open(str(out), "w", format=_output_format(out, None))
    except _AV_ERRORS as exc:
        raise OutputError(f"{out}: cannot create ({_reason(exc)})") from exc
    counter = [0]
    ok = False
    try:
        for packet in _copied_video(parts, out_c, fps, counter):
            out_c.mux(packet)
        out_c.close()
        ok = True
    except _AV_ERRORS as exc:
        raise OutputError(f"{out}: joining the fragments failed ({_reason(exc)})") from exc
    finally:
        if not ok:
            try:
                out_c.close()
            except Exception:  # noqa: BLE001 - already failing
                pass
            out.unlink(missing_ok=True)
    return counter[0]


def _copied_video(segments: list[Path], out_c: Any, fps: Fraction, counter: list[int]) -> Iterator[Any]:
    """Add to ``out_c`` a video stream like the first segment's; its packets from every segment."""
    first = _open_segment(segments[0])
    try:
        vs0 = first.streams.video[0]
        ctx0 = vs0.codec_context
        expect = (ctx0.name, ctx0.width, ctx0.height, bytes(ctx0.extradata or b""))
        vout = out_c.add_stream_from_template(vs0)
        vout.time_base = vs0.time_base
    finally:
        first.close()
    return _video_packets(segments, vout, fps, expect, counter)


def _origin(plan: ClipPlan) -> Fraction:
    """Container time (s) of the clip's first video frame: the clip's time 0."""
    return video_origin(plan.info.path, plan.info.fps) or Fraction(0)


def _parse_clock(text: str | None) -> Fraction | None:
    m = re.match(r"^(\d+):(\d+):(\d+(?:\.\d+)?)$", (text or "").strip())
    if not m:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + Fraction(m.group(3))


def _audio_span(a: Any) -> tuple[Fraction, Fraction] | None:
    """(start, end) of an audio stream in container seconds, from its header, if known."""
    tb = Fraction(a.time_base) if a.time_base else None
    if tb is None:
        return None
    start = Fraction(a.start_time or 0) * tb
    if a.duration:
        return start, start + Fraction(a.duration) * tb
    tagged = _parse_clock(a.metadata.get("DURATION") or a.metadata.get("duration"))
    if tagged is not None:  # Matroska writes a DURATION tag per stream
        return start, start + tagged
    return None


def _copy_audio_ok(plan: ClipPlan, fmt: str, track: int) -> bool:
    """One clip, untrimmed, the track's codec fits the container, and it spans the video within a frame."""
    info = plan.info
    if plan.trim is not None or plan.start_frame != 0 or track >= info.audio_tracks:
        return False
    with _open_input(info.path) as container:
        a = container.streams.audio[track]
        if not _audio_fits(a.codec_context.name if a.codec_context else None, fmt):
            return False
        span = _audio_span(a)
        if span is None:
            return False
        origin = _origin(plan)
    frame = 1 / plan.fps
    return span[0] - origin <= frame and span[1] - origin >= plan.duration - frame


def _copied_audio(container: Any, aout: Any, plan: ClipPlan, track: int) -> Iterator[Any]:
    """The clip's audio packets of one track unchanged, re-timed to the video's origin, cut at the video's end."""
    a = container.streams.audio[track]
    tb = Fraction(a.time_base)
    shift = round(_origin(plan) / tb)
    end = plan.duration
    try:
        for packet in container.demux(a):
            if packet.size == 0:
                continue
            if packet.pts is not None:
                if (packet.pts - shift) * tb >= end:
                    continue
                packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = aout
            yield packet
    except _AV_ERRORS as exc:
        raise InputError(f"{plan.info.path}: cannot read the audio ({_reason(exc)})") from exc


def _silence(channels: int, n: int, chunk: int = 8192) -> Iterator[np.ndarray]:
    while n > 0:
        k = min(chunk, n)
        yield np.zeros((channels, k), np.float32)
        n -= k


class _Window:
    """Cuts a continuous sample stream: drop ``skip`` samples, then pass ``want``."""

    def __init__(self, skip: int, want: int) -> None:
        self.skip, self.want = skip, want

    def take(self, arr: np.ndarray) -> np.ndarray | None:
        if self.skip:
            drop = min(self.skip, arr.shape[1])
            arr = arr[:, drop:]
            self.skip -= drop
        if self.want <= 0 or arr.shape[1] == 0:
            return None
        arr = arr[:, : self.want]
        self.want -= arr.shape[1]
        return arr


def _clip_pcm(plan: ClipPlan, rate: int, layout: str, nsamples: int, track: int = 0) -> Iterator[np.ndarray]:
    """Exactly ``nsamples`` float32 (channels, n) samples of the clip's audio from its output start.

    Source audio is decoded from the clip's start (video origin + plan.start_time),
    resampled to ``rate``/``layout``; missing audio (before its start, after its end,
    gaps over 20 ms, a clip without audio) is silence.
    """
    channels = 1 if layout == "mono" else 2
    if nsamples <= 0:
        return
    if track >= plan.info.audio_tracks:
        yield from _silence(channels, nsamples)
        return
    path = plan.info.path
    with _open_input(path) as container:
        a = container.streams.audio[track]
        start = _origin(plan) + plan.start_time
        try:
            if start > 1:
                try:  # by the default (video) stream's index; audio follows
                    container.seek(math.floor((start - 1) * av.time_base), backward=True)
                except _AV_ERRORS:
                    pass  # not seekable: decode from the start, which is where we are
            window: _Window | None = None
            resampler: Any = None
            signature: tuple[Any, ...] | None = None
            expected: Fraction | None = None  # source time of the next input sample
            for packet in container.demux(a):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    continue
                for fr in decoded:
                    if fr.samples == 0:
                        continue
                    if fr.pts is not None and fr.time_base is not None:
                        ft = Fraction(fr.pts) * Fraction(fr.time_base)
                    else:
                        ft = expected if expected is not None else start
                    length = Fraction(fr.samples, fr.sample_rate)
                    if window is None:
                        skip = round((start - ft) * rate)
                        window = _Window(max(skip, 0), nsamples)
                        if skip < 0:
                            for chunk in _silence(channels, -skip):
                                out = window.take(chunk)
                                if out is not None:
                                    yield out
                    elif expected is not None and ft + length <= expected + Fraction(1, 1000):
                        continue  # overlaps what was already decoded
                    gap = (ft - expected) if expected is not None else Fraction(0)
                    sig = (fr.format.name, fr.layout.name, fr.sample_rate)
                    if resampler is None or sig != signature or gap > Fraction(1, 50):
                        if resampler is not None:
                            for o in resampler.resample(None):
                                out = window.take(_pcm(o, channels))
                                if out is not None:
                                    yield out
                        if gap > Fraction(1, 50):
                            for chunk in _silence(channels, round(gap * rate)):
                                out = window.take(chunk)
                                if out is not None:
                                    yield out
                        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
                        signature = sig
                    expected = ft + length
                    for o in resampler.resample(fr):
                        out = window.take(_pcm(o, channels))
                        if out is not None:
                            yield out
                    if window.want <= 0:
                        return
            if resampler is not None and window is not None:
                for o in resampler.resample(None):
                    out = window.take(_pcm(o, channels))
                    if out is not None:
                        yield out
        except _AV_ERRORS as exc:
            raise InputError(f"{path}: cannot read the audio ({_reason(exc)})") from exc
        remaining = window.want if window is not None else nsamples
        yield from _silence(channels, remaining)


def _pcm(frame: Any, channels: int) -> np.ndarray:
    return np.asarray(frame.to_ndarray(), dtype=np.float32).reshape(channels, -1)


def _audio_params(plans: list[ClipPlan], track: int) -> tuple[int, str]:
    """Output rate and layout for AAC: the first clip with the track's rate (if AAC allows it), mono or stereo."""
    for plan in plans:
        if track >= plan.info.audio_tracks:
            continue
        with _open_input(plan.info.path) as container:
            a = container.streams.audio[track]
            rate = a.codec_context.sample_rate or 48000
            channels = a.codec_context.layout.nb_channels if a.codec_context.layout else 2
        return (rate if rate in _AAC_RATES else 48000), ("mono" if channels == 1 else "stereo")
    return 48000, "stereo"


def _encoded_audio(plans: list[ClipPlan], aout: Any, rate: int, layout: str, track: int) -> Iterator[Any]:
    """AAC packets of one audio track of every clip for exactly its output duration, back to back.

    Clip i covers samples round(B_i * rate) .. round(E_i * rate) where B_i/E_i are
    its exact start/end on the output timeline, so no drift accumulates.
    """
    begin = Fraction(0)
    pts = 0
    for plan in plans:
        end = begin + plan.duration
        n = round(end * rate) - round(begin * rate)
        for arr in _clip_pcm(plan, rate, layout, n, track):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = pts
            frame.time_base = Fraction(1, rate)
            pts += arr.shape[1]
            yield from aout.encode(frame)
        begin = end
    yield from aout.encode(None)


def _audio_track(out_c: Any, plans: list[ClipPlan], track: int, mode: str, opened: list[Any]) -> Iterator[Any]:
    """Add one output audio track and return its packets: copied from the one clip, or encoded as AAC."""
    if mode == "copy":
        source = _open_input(plans[0].info.path)
        opened.append(source)
        aout = out_c.add_stream_from_template(source.streams.audio[track])
        return _copied_audio(source, aout, plans[0], track)
    rate, layout = _audio_params(plans, track)
    aout = out_c.add_stream("aac", rate=rate, layout=layout)
    aout.codec_context.bit_rate = 192_000 if layout == "stereo" else 128_000
    aout.time_base = Fraction(1, rate)
    return _encoded_audio(plans, aout, rate, layout, track)


def concat_and_mux(
    segments: list[Path],
    plans: list[ClipPlan],
    out: Path,
    *,
    container_hint: str | None = None,
    faststart: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Join the segment files (stream copy, no re-encode) and add the clips' audio into ``out``.

    Video: the segments' packets in order, pts/dts shifted so the timeline is
    continuous (frame i of the output at i/fps). All segments must share the
    codec, size and codec parameters (as one VideoWriter configuration makes
    them); the total frame count must equal the plans' (SegmentError otherwise).

    Audio, every track of the inputs (the output has as many audio tracks as
    the input with the most; track i of a clip that has fewer is silence),
    each aligned with the video (each clip's audio starts with its first
    output frame and lasts exactly its output duration):

    * **copied** (packets unchanged) when there is one clip, untrimmed, whose
      audio codec fits the container (AAC in MP4/MOV; anything in Matroska)
      and whose audio spans the video within one frame; packets starting after
      the video's end are dropped;
    * otherwise **decoded, cut, resampled and encoded as AAC** (192 kb/s,
      the first audio clip's sample rate, mono or stereo; more channels are
      downmixed to stereo) — in every container. A clip without audio
      contributes silence of its duration when another clip has audio; with
      no audio at all the output has no audio track.

    Container from ``out``'s suffix (.mp4, .mov, .mkv), or ``container_hint``
    ("mp4", "mov", "mkv") for a temporary name. MP4/MOV get ``+faststart``
    unless ``faststart=False``. ``progress(done, total)`` is called with video
    frames written. ``out`` is written directly and deleted if anything fails.
    """
    out = Path(out)
    fmt = _output_format(out, container_hint)
    if not segments:
        raise SegmentError(f"{out}: no segments to join")
    if not plans:
        raise ValueError("concat_and_mux: no clip plans")
    fps = plans[0].fps
    total = sum(p.frames for p in plans)

    # Check the segments' frame counts up front where their headers say (MP4/MOV).
    counted = 0
    known = True
    for path in segments:
        container = _open_segment(path)
        try:
            n = container.streams.video[0].frames
        finally:
            container.close()
        if n <= 0:
            known = False
        counted += n
    if known and counted != total:
        raise SegmentError(f"{out}: the segments hold {counted} frames, the plan expects {total}")

    tracks = max(p.info.audio_tracks for p in plans)
    audio_modes = ["copy" if len(plans) == 1 and _copy_audio_ok(plans[0], fmt, t) else "aac" for t in range(tracks)]

    options = {"movflags": "+faststart"} if (faststart and fmt in ("mp4", "mov")) else {}
    try:
        out_c = av.open(str(out), "w", format=fmt, options=options)
    except _AV_ERRORS as exc:
        raise OutputError(f"{out}: cannot create ({_reason(exc)})") from exc

    opened: list[Any] = []  # the inputs copied tracks are read from, one container each
    ok = False
    try:
        counter = [0]
        sources: list[Iterator[Any]] = [_copied_video(segments, out_c, fps, counter)]
        vindex = out_c.streams.video[0].index
        for track, mode in enumerate(audio_modes):
            sources.append(_audio_track(out_c, plans, track, mode, opened))
        try:
            out_c.start_encoding()
        except _AV_ERRORS as exc:
            raise OutputError(f"{out}: cannot write ({_reason(exc)})") from exc
        for packet in _interleave(*sources):
            try:
                out_c.mux(packet)
            except _AV_ERRORS as exc:
                raise OutputError(f"{out}: writing failed ({_reason(exc)})") from exc
            if progress is not None and packet.stream_index == vindex:
                progress(counter[0], total)
        if counter[0] != total:
            raise SegmentError(f"{out}: the segments hold {counter[0]} frames, the plan expects {total}")
        try:
            out_c.close()
        except _AV_ERRORS as exc:
            raise OutputError(f"{out}: cannot finish writing ({_reason(exc)})") from exc
        ok = True
    except _AV_ERRORS as exc:
        raise OutputError(f"{out}: joining the segments failed ({_reason(exc)})") from exc
    finally:
        for source in opened:
            source.close()
        if not ok:
            try:
                out_c.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                out.unlink()
            except OSError:
                pass
