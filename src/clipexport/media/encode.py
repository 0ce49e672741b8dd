"""Encode: :class:`VideoWriter` writes one video-only segment file (libx264/libx265, yuv420p)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..errors import OutputError, UsageError
from ._util import _AV_ERRORS, _reason

# --------------------------------------------------------------------------- encoding

_VIDEO_CODECS = {
    "h264": ("libx264", 18),
    "libx264": ("libx264", 18),
    "avc": ("libx264", 18),
    "hevc": ("libx265", 20),
    "h265": ("libx265", 20),
    "libx265": ("libx265", 20),
}


def _writer_format(path: Path) -> str:
    return {".mkv": "matroska", ".mov": "mov"}.get(path.suffix.lower(), "mp4")


class VideoWriter:
    """Encodes one video-only segment file. Context manager.

    libx264 (``codec="h264"``) or libx265 (``"hevc"``), yuv420p, BT.709
    limited range (tagged), CRF 18 (h264) / 20 (hevc) unless ``crf`` is given,
    ``preset`` "medium" unless given; ``options`` adds encoder options.
    ``threads`` 0 lets the encoder choose.

    Timing: the encoder time base is ``1/fps`` and frame ``i`` gets ``pts = i``,
    so a segment of n frames lasts exactly n/fps.

    Container: MP4 unless the path ends in ``.mkv``/``.mov``. Segments should
    be ``.mp4``: the MP4 muxer picks a timescale that is an exact multiple of
    the frame rate (1/12288 s at 24 fps), stores dts explicitly (B-frames) and
    a per-sample index, so stream-copy concatenation can offset pts/dts by an
    exact number of frames. Matroska rounds every timestamp to 1 ms.

    Odd sizes: yuv420p needs an even width and height. A writer created with
    an odd width or height encodes ``width & ~1`` x ``height & ~1`` (see
    :attr:`encoded_size`) and drops the last column/row of each frame.

    On an exception inside ``with``, or :meth:`abort`, the partial file is
    deleted; closing a writer that got no frame deletes the file and returns 0.
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: Fraction,
        *,
        codec: str = "h264",
        crf: int | None = None,
        threads: int = 0,
        preset: str = "medium",
        options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.width = int(width)
        self.height = int(height)
        self.fps = Fraction(fps)
        self.frames = 0
        self._closed = False
        if codec not in _VIDEO_CODECS:
            raise UsageError(f"unknown video codec {codec!r} (choose h264 or hevc)")
        encoder, default_crf = _VIDEO_CODECS[codec]
        ew, eh = self.width & ~1, self.height & ~1
        if ew < 2 or eh < 2:
            raise ValueError(f"VideoWriter: frame size {width}x{height} is too small")
        if self.fps <= 0:
            raise ValueError("VideoWriter: fps must be positive")
        self.encoded_size = (ew, eh)
        opts = {"crf": str(default_crf if crf is None else crf), "preset": preset}
        if encoder == "libx265":
            opts["x265-params"] = "log-level=error"
        opts.update(options or {})
        try:
            self._container = av.open(str(self.path), "w", format=_writer_format(self.path))
        except _AV_ERRORS as exc:
            raise OutputError(f"{self.path}: cannot create ({_reason(exc)})") from exc
        try:
            stream = self._container.add_stream(encoder, rate=self.fps)
            stream.width, stream.height = ew, eh
            stream.pix_fmt = "yuv420p"
            ctx = stream.codec_context
            ctx.time_base = 1 / self.fps
            ctx.thread_count = int(threads)
            ctx.color_range = 1  # MPEG (limited)
            ctx.colorspace = 1  # BT.709
            ctx.color_primaries = 1
            ctx.color_trc = 1
            ctx.options = opts
            if encoder == "libx265" and _writer_format(self.path) in ("mp4", "mov"):
                ctx.codec_tag = "hvc1"  # what Apple players expect for HEVC in MP4/MOV
            stream.time_base = 1 / self.fps
            self._stream = stream
        except _AV_ERRORS as exc:
            self._abort_quietly()
            raise OutputError(f"{self.path}: cannot set up the {encoder} encoder ({_reason(exc)})") from exc

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray) -> None:
        """Encode one RGB uint8 frame of shape (height, width, 3) as given to the constructor."""
        if self._closed:
            raise ValueError("VideoWriter: write after close")
        if frame.dtype != np.uint8 or frame.shape != (self.height, self.width, 3):
            raise ValueError(
                f"VideoWriter: expected uint8 ({self.height}, {self.width}, 3), got {frame.dtype} {frame.shape}"
            )
        ew, eh = self.encoded_size
        if (ew, eh) != (self.width, self.height):
            frame = frame[:eh, :ew]
        try:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            vf.pts = self.frames
            vf.time_base = self._stream.codec_context.time_base
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        except _AV_ERRORS as exc:
            self.abort()
            raise OutputError(f"{self.path}: encoding failed ({_reason(exc)})") from exc
        self.frames += 1

    def close(self) -> int:
        """Flush the encoder and close the file; return the number of frames written."""
        if self._closed:
            return self.frames
        if self.frames == 0:
            self.abort()
            return 0
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        except _AV_ERRORS as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing ({_reason(exc)})") from exc
        self._closed = True
        return self.frames

    def abort(self) -> None:
        """Stop and delete the partial file."""
        if self._closed:
            return
        self._abort_quietly()

    def _abort_quietly(self) -> None:
        self._closed = True
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        try:
            self.path.unlink()
        except OSError:
            pass
