"""Probe: what a clip is (:class:`ClipInfo`, :func:`probe`), exact frame counts, truncation checks.

Conventions (time origin, frame rate and VFR, rotation, odd sizes): see the
package docstring, :mod:`clipexport.media`.
"""

from __future__ import annotations

import bisect
import stat
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import av
import av.error

from ..errors import ClipexportError, InputError
from ._util import _AV_ERRORS, _reason, _seconds

# Demuxers whose container duration comes from a header or an index (not
# estimated from the bit rate), so "packets end far before it" means truncation.
_HEADER_DURATION_FORMATS = ("matroska", "webm", "mov", "mp4", "avi", "flv", "asf", "nut", "mxf")


# --------------------------------------------------------------------------- probe


@runtime_checkable
class StreamSource(Protocol):
    """A clip that is not a local file (one in an object store): read through the stream it opens.

    `str()` of it names the clip in error messages.
    """

    def open_stream(self) -> IO[bytes]: ...


@dataclass(frozen=True)
class ClipInfo:
    """What :func:`probe` learned about one clip (see the module docstring for conventions)."""

    path: Path | StreamSource  # a StreamSource only where a worker decodes a stored clip in ranges
    width: int  # display size: rotation applied (90/270 swap)
    height: int
    fps: Fraction  # average frame rate
    frames: int  # exact number of video frames (packets) in the file
    duration: float  # video duration in seconds
    rotation: int  # clockwise degrees to display upright: 0, 90, 180, 270
    has_audio: bool
    audio_codec: str | None
    size_bytes: int
    codec: str
    sar: Fraction = Fraction(1)  # sample (pixel) aspect ratio on the display axes; 2 = pixels twice as wide
    audio_tracks: int = 0  # audio streams the file holds (has_audio and audio_codec describe the first)
    crowded: bool = False  # some frames come closer together than one frame at `fps` (bursts): see plan.pushed_slots
    pace: Fraction | None = None  # a crowded clip's usual rate (median spacing) where pauses pull `fps` below it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (fps as "num/den")."""
        return {
            "path": str(self.path),
            "width": self.width,
            "height": self.height,
            "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "frames": self.frames,
            "duration": self.duration,
            "rotation": self.rotation,
            "has_audio": self.has_audio,
            "audio_codec": self.audio_codec,
            "size_bytes": self.size_bytes,
            "codec": self.codec,
            "sar": f"{self.sar.numerator}/{self.sar.denominator}",
            "audio_tracks": self.audio_tracks,
            "crowded": self.crowded,
            "pace": None if self.pace is None else f"{self.pace.numerator}/{self.pace.denominator}",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipInfo:
        return cls(
            path=Path(data["path"]),
            width=int(data["width"]),
            height=int(data["height"]),
            fps=Fraction(data["fps"]),
            frames=int(data["frames"]),
            duration=float(data["duration"]),
            rotation=int(data["rotation"]),
            has_audio=bool(data["has_audio"]),
            audio_codec=data.get("audio_codec"),
            size_bytes=int(data["size_bytes"]),
            codec=str(data["codec"]),
            sar=Fraction(data.get("sar", "1")),
            audio_tracks=int(data.get("audio_tracks", 1 if data["has_audio"] else 0)),
            crowded=bool(data.get("crowded", False)),
            pace=None if data.get("pace") is None else Fraction(data["pace"]),
        )


def _video_stream(container: Any) -> Any | None:
    for stream in container.streams.video:
        if not (int(stream.disposition) & int(av.stream.Disposition.attached_pic)):
            return stream
    return None


def _frame_rate(stream: Any) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def _index_past_eof(container: Any, size: int) -> bool:
    """True when a stream's sample index points past the end of the file.

    MP4/MOV (and AVI with an idx1) carry the byte offset of every sample in the
    header: a file cut short keeps its index, and its last samples lie beyond
    the file's size. Only the last few entries of each stream are checked.
    """
    for stream in container.streams:
        entries = stream.index_entries
        n = len(entries)
        if n == 0:
            continue
        for entry in entries[max(0, n - 16) : n]:
            if entry.pos >= 0 and entry.pos + max(entry.size, 0) > size:
                return True
    return False


@dataclass
class _Demuxed:
    """What demuxing every packet (no decoding) tells about a clip."""

    frames: int = 0  # video packets
    lead: int = 0  # video packets before the first with a timestamp
    pts: list[int] = field(default_factory=list)  # the video packets' pts, in file order
    span: Fraction | None = None  # seconds from the first video packet with a timestamp to the end of the last
    all_end: Fraction | None = None  # end of all streams, seconds from the container's start


def _count_by_demux(path: Path, container: Any, vindex: int) -> _Demuxed:
    """Demux every packet (no decoding): count the video frames, collect their timestamps.

    Raises InputError when demuxing fails part way (truncated or corrupt file).
    """
    found = _Demuxed()
    vfirst: Fraction | None = None
    vend: Fraction | None = None
    try:
        for packet in container.demux():
            if packet.size == 0:
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            tb = packet.time_base
            if ts is not None and tb is not None:
                start = ts * tb
                end = (ts + max(packet.duration or 0, 0)) * tb
                found.all_end = end if found.all_end is None else max(found.all_end, end)
            else:
                start = end = None
            if packet.stream_index == vindex and not packet.is_discard:
                found.frames += 1
                if packet.pts is not None:
                    found.pts.append(int(packet.pts))
                if start is not None:
                    vfirst = start if vfirst is None else min(vfirst, start)
                    vend = end if vend is None else max(vend, end)
                elif vfirst is None:
                    found.lead += 1
    except _AV_ERRORS as exc:
        raise InputError(
            f"{path}: corrupt or truncated video, reading failed after {found.frames} frames ({_reason(exc)})"
        ) from exc
    found.span = (vend - vfirst) if (vfirst is not None and vend is not None) else None
    if found.all_end is not None and container.start_time is not None:
        found.all_end -= Fraction(container.start_time, av.time_base)
    return found


def _gaps(pts: list[int]) -> list[int]:
    """The spacings between the frames' distinct timestamps, smallest first (ticks of the time base)."""
    ticks = sorted(set(pts))
    return sorted(b - a for a, b in zip(ticks, ticks[1:]))


def _crowded(gaps: list[int], tb: Fraction, fps: Fraction) -> bool:
    """Whether two frames come closer together than one frame at `fps` (allowing a tick of rounding).

    Sampled by time at `fps`, such frames would share an output slot and one
    of them would be lost: the plan pushes them apart instead.
    """
    return bool(gaps) and gaps[0] * tb < 1 / fps - 2 * tb


_RATES = (Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(48),
          Fraction(50), Fraction(60000, 1001), Fraction(60), Fraction(90), Fraction(100), Fraction(120))


def _pace(gaps: list[int], tb: Fraction, fps: Fraction) -> Fraction | None:
    """The rate of a clip's usual frame spacing (the median), when pauses pull its average `fps` below it.

    A screen recording at 30 fps that holds still for seconds averages a
    few frames a second: rendered at that average, its moving parts would
    need many more slots than their time holds. Rendered at its pace,
    they keep their timing and the pauses repeat a frame. Snapped to a
    common rate within 2 %, at most 120 fps; None when within 5 % of `fps`.
    """
    if not gaps or gaps[len(gaps) // 2] <= 0:
        return None
    pace = 1 / (gaps[len(gaps) // 2] * tb)
    if pace <= fps * Fraction(105, 100):
        return None
    common = [rate for rate in _RATES if abs(rate - pace) <= pace / 50]
    if common:
        return min(common, key=lambda rate: abs(rate - pace))
    return min(Fraction(120), pace.limit_denominator(1001))


def _index_regular(stream: Any) -> bool:
    """Whether the sample index's timestamps (decode times) are evenly spaced, to a tick: constant frame rate."""
    ticks = [entry.timestamp for entry in stream.index_entries]
    steps = {b - a for a, b in zip(ticks, ticks[1:])}
    return not steps or max(steps) - min(steps) <= 1


def _ends_late(path: Path, stream_dur: Fraction) -> bool:
    """Whether a frame near the end is shown after the duration the header gives (by more than a frame).

    Evenly spaced decode times can still carry presentation times that jump
    (an encoder's reordering delay on variable-rate input): the last frames
    then lie past the header's duration, which would cut the clip short.
    Only the packets from the last keyframe on are read.
    """
    with _open_input(path) as container:
        v = _video_stream(container)
        tb = Fraction(v.time_base)
        keys = [e.timestamp for e in v.index_entries if e.is_keyframe]
        if keys:
            container.seek(keys[-1], stream=v, backward=True, any_frame=False)
        origin = v.start_time or 0
        frame = stream_dur / max(1, v.frames)
        for packet in container.demux(v):
            if packet.pts is not None and (packet.pts - origin) * tb > stream_dur + frame:
                return True
    return False


def _codec_rate(stream: Any) -> Fraction:
    """The rate a stream without timestamps (raw H.264/HEVC) declares in its own headers, else 25.

    A raw stream's demuxer reports its own default (25) as the average;
    the codec's timing information (the SPS's, when the encoder wrote it) is
    the stream's real rate.
    """
    ctx = stream.codec_context
    for rate in ((ctx.framerate if ctx is not None else None), stream.guessed_rate):
        if rate is not None and 0 < rate <= 1000:
            return Fraction(rate)
    return Fraction(25)


def probe(path: Path) -> ClipInfo:
    """Read a clip's properties; raise :class:`InputError` (one line naming the file) if unusable.

    Frame count: ``nb_frames`` from the header is trusted only when it agrees
    (within one frame) with stream duration x average rate *and* the container
    has a complete per-sample index (MP4/MOV, AVI) that was checked against the
    file size, evenly spaced (constant frame rate), with no frame shown past
    the header's duration. Otherwise packets are counted by demuxing the whole
    file (no decoding; Matroska, MPEG-TS, variable-rate MP4, ...), which also
    tells whether the clip is *crowded* and, for a raw stream without
    timestamps, gives its rate from the codec.

    Truncation/corruption rule, documented here because it is a judgement call:

    * the container cannot be opened or demuxing fails part way -> corrupt;
    * a sample index entry points past the end of the file -> truncated
      (MP4/MOV with the index at the front, AVI);
    * when packets are counted and the container's duration comes from its
      header (Matroska, MP4, AVI, FLV, ...), the last packet ends more than
      max(3 frames, 2 % of the duration) before that duration -> truncated.

    The first video frame is decoded to read the rotation (display matrix) and
    to prove the stream decodes.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a video file")
    try:
        st = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({_reason(exc)})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file ({_file_kind(st.st_mode)}); give a video file")
    size = st.st_size
    if size == 0:
        if _has_bytes(path):
            raise InputError(f"{path}: reports a size of 0 but has content (a /proc or /sys file?), not a video")
        raise InputError(f"{path}: empty file (0 bytes), not a video")
    try:
        return _probe(path, size)
    except ClipexportError:
        raise
    except Exception as exc:  # the last line of defence: no traceback for a bad file
        raise InputError(f"{path}: not a readable video ({_reason(exc)})") from exc


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _has_bytes(path: Path) -> bool:
    """Whether a file of size 0 yields bytes anyway (pseudo files do)."""
    try:
        with open(path, "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


def _sample_aspect(stream: Any) -> Fraction:
    """The stream's pixel aspect ratio; 1 when unset (0/1) or absurd."""
    ctx = stream.codec_context
    value = stream.sample_aspect_ratio or (ctx.sample_aspect_ratio if ctx is not None else None)
    if not value or not (Fraction(1, 16) <= Fraction(value) <= 16):
        return Fraction(1)
    return Fraction(value)


def _open_input(path: Path | StreamSource) -> Any:
    try:
        source = path.open_stream() if isinstance(path, StreamSource) else str(path)
        return av.open(source, metadata_errors="replace")
    except _AV_ERRORS as exc:
        raise InputError(f"{path}: not a readable video ({_reason(exc)})") from exc


def _probe(path: Path, size: int) -> ClipInfo:
    with _open_input(path) as container:
        v = _video_stream(container)
        if v is None:
            if container.streams.audio:
                raise InputError(f"{path}: no video stream (audio only)")
            raise InputError(f"{path}: no video stream")
        ctx = v.codec_context
        codec = ctx.name if ctx is not None else (v.codec.name if v.codec else "unknown")
        fps = _frame_rate(v)
        if fps is None:
            raise InputError(f"{path}: video stream has no frame rate")
        audio = container.streams.audio[0] if container.streams.audio else None
        has_audio = audio is not None and audio.codec_context is not None
        audio_codec = audio.codec_context.name if has_audio else None
        audio_tracks = sum(1 for a in container.streams.audio if a.codec_context is not None) if has_audio else 0
        vindex = v.index
        coded_w, coded_h = (ctx.width, ctx.height) if ctx is not None else (0, 0)

        if _index_past_eof(container, size):
            raise InputError(f"{path}: truncated video (its index points past the end of the file)")

        tb = v.time_base
        stream_dur = Fraction(v.duration) * tb if (v.duration and tb) else None
        nb = v.frames or 0
        index_complete = len(v.index_entries) >= nb > 0
        frames: int
        duration: Fraction | None
        crowded, pace = False, None
        if (nb > 0 and stream_dur is not None and index_complete and abs(nb - stream_dur * fps) <= 1
                and _index_regular(v) and not _ends_late(path, stream_dur)):
            frames, duration = nb, stream_dur
        else:
            demuxed = _count_by_demux(path, container, vindex)
            frames, all_end = demuxed.frames, demuxed.all_end
            if not demuxed.pts:  # no timestamps at all (a raw stream): frames follow each other at its rate
                fps = _codec_rate(v)
                stream_dur = None
            vdur = demuxed.span
            if vdur is not None and demuxed.lead:  # leading frames without timestamps, one frame apart
                vdur, stream_dur = vdur + demuxed.lead / fps, None
            duration = stream_dur or vdur
            if vdur and frames > 1 and abs(frames - vdur * fps) > 1:  # a variable rate the header misstates
                fps, duration = (Fraction(frames) / vdur).limit_denominator(1_000_000), vdur
            gaps = _gaps(demuxed.pts)
            crowded = _crowded(gaps, Fraction(tb), fps)
            pace = _pace(gaps, Fraction(tb), fps) if crowded else None
            header = container.duration
            fmt = container.format.name if container.format else ""
            if (
                frames > 0
                and header
                and all_end is not None
                and any(name in fmt for name in _HEADER_DURATION_FORMATS)
            ):
                header_s = Fraction(header, av.time_base)
                tolerance = max(3 / fps, header_s / 50)
                if header_s - all_end > tolerance:
                    raise InputError(
                        f"{path}: truncated video (data ends at {_seconds(all_end)} "
                        f"of {_seconds(header_s)})"
                    )
        if frames == 0:
            raise InputError(f"{path}: the video stream has no frames")
        if duration is None or duration <= 0:
            duration = Fraction(frames) / fps

    # Decode the first frame in a fresh container: proves decodability, gives rotation.
    with _open_input(path) as container:
        v = _video_stream(container)
        first = None
        try:
            for packet in container.demux(v):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    continue
                if decoded:
                    first = decoded[0]
                    break
            if first is None:
                decoded = v.decode(None) if v.codec_context is not None else []
                first = decoded[0] if decoded else None
        except _AV_ERRORS as exc:
            raise InputError(f"{path}: cannot decode the video ({_reason(exc)})") from exc
        if first is None:
            raise InputError(f"{path}: the video stream has no decodable frames")
        ccw = first.rotation or 0
        rotation = int(round(-float(ccw) / 90.0)) * 90 % 360
        width, height = coded_w or first.width, coded_h or first.height
        sar = _sample_aspect(v)
    if rotation in (90, 270):
        width, height, sar = height, width, 1 / sar
    return ClipInfo(
        path=path,
        width=int(width),
        height=int(height),
        fps=fps,
        frames=int(frames),
        duration=float(duration),
        rotation=rotation,
        has_audio=has_audio,
        audio_codec=audio_codec,
        size_bytes=size,
        codec=codec,
        sar=sar,
        audio_tracks=audio_tracks,
        crowded=crowded,
        pace=pace,
    )


# --------------------------------------------------------------------------- frame times


def video_origin(path: Path, fps: Fraction) -> Fraction | None:
    """Container time (s) of the clip's first frame: its time 0. None when no frame has a timestamp.

    Leading packets without a timestamp (a stream cut mid-way, a broken
    muxer) come one frame (at `fps`) apart before the first that has one,
    so they keep their place instead of all landing on time 0.
    """
    try:
        with _open_input(path) as container:
            v = _video_stream(container)
            lead, first = 0, None
            for packet in container.demux(v):
                if packet.size == 0:
                    continue
                if packet.pts is not None:
                    first = int(packet.pts)
                    break
                lead += 1
            if first is None:
                return None
            start = v.start_time if v.start_time is not None else first
            return Fraction(start) * Fraction(v.time_base) - lead / fps
    except ClipexportError:
        raise
    except _AV_ERRORS as exc:
        raise InputError(f"{path}: cannot read the video's timestamps ({_reason(exc)})") from exc


_REORDER_S = 2  # packets come in decode order: a frame shown before `until` is read this far past it at most


def frame_times(path: Path, fps: Fraction, until: Fraction | None = None) -> list[Fraction]:
    """Every frame's time (s from :func:`video_origin`), in order: what a crowded clip's plan needs.

    Leading frames without a timestamp come one frame apart (as in
    :func:`video_origin`); any others without one are left out. With
    `until`, reading stops a little past that time: the frames shown before
    it are all there (and perhaps a few after).

    Every segment of a crowded clip needs the times from the clip's start
    to its own end, so what was read is kept for the process (the last few
    files, by path, size and mtime). A later segment reads on from the
    start to twice as far as before, or further: a whole clip's segments
    read the clip about twice, not once per segment.
    """
    key = _file_key(path, fps)
    seen = _TIMES.get(key) if key is not None else None
    if seen is not None and seen.covers(until):
        return seen.cut(until)
    reach = until if until is None or seen is None or seen.upto is None else max(until, 2 * seen.upto)
    read = _read_times(path, fps, reach)
    if key is not None:
        _TIMES.pop(key, None)
        _TIMES[key] = read
        while len(_TIMES) > _KEPT_FILES:
            _TIMES.pop(next(iter(_TIMES)))
    return read.cut(until)


@dataclass(frozen=True)
class _Times:
    """The frame times read from a clip's start: all of them (`upto` None), or those up to `upto`."""

    times: list[Fraction]
    upto: Fraction | None

    def covers(self, until: Fraction | None) -> bool:
        return self.upto is None or (until is not None and until <= self.upto)

    def cut(self, until: Fraction | None) -> list[Fraction]:
        if until is None:
            return list(self.times)
        return self.times[: bisect.bisect_right(self.times, until + _REORDER_S)]


_KEPT_FILES = 4
_TIMES: dict[tuple[str, int, int, Fraction], _Times] = {}


def _file_key(path: Any, fps: Fraction) -> tuple[str, int, int, Fraction] | None:
    """A clip file as it is now (a stored clip read by ranges, or a file that moved, is not kept)."""
    if not isinstance(path, (str, Path)):
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return str(path), st.st_size, st.st_mtime_ns, fps


def _read_times(path: Path, fps: Fraction, until: Fraction | None) -> _Times:
    origin = video_origin(path, fps) or Fraction(0)
    times: list[Fraction] = []
    complete = True
    try:
        with _open_input(path) as container:
            v = _video_stream(container)
            tb, timed = Fraction(v.time_base), False
            for packet in container.demux(v):
                if packet.size == 0 or packet.is_discard:
                    continue
                if packet.pts is not None:
                    times.append(packet.pts * tb - origin)
                    timed = True
                    if until is not None and times[-1] > until + _REORDER_S:
                        complete = False
                        break
                elif not timed:  # one of the leading frames
                    times.append(len(times) / fps)
    except _AV_ERRORS as exc:
        raise InputError(f"{path}: cannot read the video's timestamps ({_reason(exc)})") from exc
    return _Times(sorted(times), None if complete else until)
