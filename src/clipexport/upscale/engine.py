"""Running a Real-ESRGAN network over video frames: batches, tiles, a pipelined stream.

Frames are ``(N, H, W, 3)`` uint8 RGB numpy arrays in and out. They travel to
the device as uint8, are turned into float there in channels_last layout (the
permuted NHWC tensor already has those strides, so no copy), and come back
quantised to uint8 on the device: ``clamp(0, 1) * 255``, rounded, in float32,
as the reference tool does on the host.

* Precision: see :mod:`clipexport.upscale.precision` (``auto``: float16 on
  CUDA, with ``cudnn.benchmark``; bfloat16 on CPUs with AMX; int8 on CPUs
  with VNNI for the compact nets, :mod:`clipexport.upscale.int8`; float32
  elsewhere). ``Upscaler.net`` stays the float32 network as loaded; the
  engine runs a copy in the chosen precision.

* Batches: a call runs all its frames in one forward pass when they fit the
  memory budget, else in chunks, else tile by tile.
* Tiles: ``tile`` (input pixels per side) with ``tile_pad`` pixels of overlap
  on every side, cropped away after the model (the reference tool's scheme).
  For the compact nets the default overlap covers the whole receptive field,
  so tiling changes nothing but float rounding. ``tile=None`` chooses from
  free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: MemAvailable) or
  ``$CLIPEXPORT_TILE``; ``tile=0`` never tiles.
* Odd sizes: the x2 network pixel-unshuffles its input, so frames are
  reflect-padded at the bottom and right to even size and the output cropped.
* Scale below the model's: the model output is resized with bicubic
  interpolation (no antialias, align_corners=False), which is what the
  official x2/x3 animevideov3 ncnn exports do after their x4 network.
* :meth:`Upscaler.stream`: a reader thread pulls input frames into a bounded
  queue, a worker thread batches them through the model into a second bounded
  queue, and the caller receives output frames one by one, in order, while
  both keep working (decode, inference and the caller's encode overlap).

This module imports no video library.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clipexport.errors import ModelError, UsageError
from clipexport.options import env_value
from clipexport.stopping import deferred
from clipexport.upscale import precision as _precision
from clipexport.upscale.archs import SRVGGNetCompact, build, input_multiple
from clipexport.upscale.cpu import usable_cpus
from clipexport.upscale.registry import ModelSpec, get_spec
from clipexport.upscale.weights import load_weights

__all__ = ["Upscaler", "load_upscaler", "resolve_device", "usable_cpus"]

ENV_TILE = "CLIPEXPORT_TILE"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
MEMORY_FRACTION = 0.5  # of free memory one forward pass may use
_CL = torch.channels_last

_threads_set = False


def _configure_cpu_threads() -> None:
    """Never run more intra-op threads than CPUs we can use (oversubscription is slow)."""
    global _threads_set
    if _threads_set:
        return
    _threads_set = True
    n = usable_cpus()
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes_per_input_pixel(net: nn.Module, native_scale: int, itemsize: int) -> int:
    """A generous estimate of activation memory per input pixel of one forward pass."""
    if isinstance(net, SRVGGNetCompact):
        # 64-channel features at input size (a few alive), 16x output pixels at the end.
        return itemsize * (64 * 4 + native_scale * native_scale * 3 * 6)
    # RRDB: 64-channel features at the output size dominate (conv_up2, conv_hr).
    return itemsize * (native_scale * native_scale * 64 * 4 + 192 * 4)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be a (N, H, W, 3) uint8 RGB array, got {desc}")
    return np.ascontiguousarray(frames)


class Upscaler:
    """A loaded model on a device; see :func:`load_upscaler`."""

    def __init__(
        self,
        net: nn.Module,
        *,
        spec: ModelSpec,
        scale: int,
        device: str | torch.device = "cpu",
        tile: int | None = None,
        tile_pad: int | None = None,
        weights: str = "",
        precision: str = "auto",
    ) -> None:
        self.spec = spec
        self.model: str = spec.name
        self.native_scale: int = spec.native_scale
        self.scale: int = scale
        self._device = torch.device(device)
        self.device: str = str(self._device)
        self.precision: str = _precision.resolve(precision, self._device.type, model=spec)
        self.dtype: torch.dtype = DTYPES[self.precision]  # the input's: int8 takes float frames
        self.weights: str = weights
        if self._device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        else:
            _configure_cpu_threads()
        self.net = net.to(device=self._device, dtype=torch.float32).eval().requires_grad_(False)
        self._net = self._runner()
        self.multiple = input_multiple(net)
        if tile is None:
            tile = env_value(ENV_TILE)
        if tile is not None and tile < 0:
            raise UsageError(f"tile size must be >= 0, not {tile}")
        self.tile: int | None = tile
        if tile_pad is None:
            if isinstance(net, SRVGGNetCompact):
                # Receptive field radius: one pixel per 3x3 conv.
                tile_pad = sum(isinstance(m, nn.Conv2d) for m in net.modules())
            else:
                tile_pad = 16
        self.tile_pad = tile_pad + (-tile_pad) % self.multiple
        # Frames per forward pass in stream(): 4 keeps a GPU busy; on the CPU one frame's
        # activations stay closer to the caches, and 4 measured slower (bench/upscale_fps.py).
        self.default_batch = 4 if self._device.type == "cuda" else 1
        self._max_pixels = self._pixel_budget()

    def _runner(self) -> nn.Module:
        """What runs: `net` itself in fp32, else a copy or an int8 rebuild, so `net` keeps the float32 weights."""
        if self.precision == "int8":  # resolve() allowed it: a compact net
            from clipexport.upscale.int8 import Int8Compact

            return Int8Compact(self.net, self.model)
        run = self.net if self.dtype == torch.float32 else copy.deepcopy(self.net).to(dtype=self.dtype)
        return run.to(memory_format=_CL)

    def __repr__(self) -> str:
        return f"Upscaler(model={self.model!r}, scale={self.scale}, device={self.device!r}, precision={self.precision!r})"

    def _pixel_budget(self) -> int | None:
        """Input pixels one forward pass may take (None: no limit known)."""
        avail = _available_memory(self._device)
        if avail is None:
            return None
        per_px = _bytes_per_input_pixel(self.net, self.native_scale, torch.finfo(self.dtype).bits // 8)
        return max(64 * 64, int(avail * MEMORY_FRACTION) // per_px)

    # --- one call ---------------------------------------------------------------------

    def upscale(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, H*scale, W*scale, 3) uint8 RGB."""
        frames = _check_frames(frames)
        n, h, w, _ = frames.shape
        oh, ow = h * self.scale, w * self.scale
        if n == 0:
            return np.empty((0, oh, ow, 3), np.uint8)
        with torch.inference_mode():
            t = torch.from_numpy(frames)
            if self._device.type == "cuda":
                t = t.pin_memory().to(self._device, non_blocking=True)
            x = t.permute(0, 3, 1, 2).to(self.dtype).div_(255.0)  # channels_last strides
            ph, pw = (-h) % self.multiple, (-w) % self.multiple
            if ph or pw:
                mode = "reflect" if h > ph and w > pw else "replicate"
                x = F.pad(x, (0, pw, 0, ph), mode=mode)
            y = self._forward(x)
            s = self.native_scale
            if ph or pw:
                y = y[:, :, : h * s, : w * s]
            # Resize and quantise in float32, as the reference does after `.float()`:
            # 255 * y in half precision would move values across rounding edges.
            y = y.float()
            if self.scale != s:
                y = F.interpolate(y, size=(oh, ow), mode="bicubic", align_corners=False)
            y = y.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
            # NHWC on the device (a no-op for channels_last), then one copy to the host.
            return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x.contiguous(memory_format=_CL))

    def _tile_side(self, h: int, w: int) -> int | None:
        if self.tile is not None:
            if self.tile == 0 or (h <= self.tile and w <= self.tile):
                return None
            side = self.tile
        elif self._max_pixels is not None and h * w > self._max_pixels:
            side = int(math.isqrt(self._max_pixels)) - 2 * self.tile_pad
        else:
            return None
        side -= side % self.multiple
        return max(side, 16 + (-16) % self.multiple)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        side = self._tile_side(h, w)
        if side is not None:
            return self._tiled(x, side)
        per = n
        if self._max_pixels is not None:
            per = max(1, min(n, self._max_pixels // (h * w)))
        if per >= n:
            return self._run(x)
        return torch.cat([self._run(x[i : i + per]) for i in range(0, n, per)])

    def _tiled(self, x: torch.Tensor, side: int) -> torch.Tensor:
        n, c, h, w = x.shape
        s, pad = self.native_scale, self.tile_pad
        out = torch.empty((n, c, h * s, w * s), dtype=x.dtype, device=x.device, memory_format=_CL)
        px = (side + 2 * pad) ** 2
        per = n if self._max_pixels is None else max(1, min(n, self._max_pixels // px))
        for y0 in range(0, h, side):
            y1 = min(y0 + side, h)
            ya, yb = max(y0 - pad, 0), min(y1 + pad, h)
            for x0 in range(0, w, side):
                x1 = min(x0 + side, w)
                xa, xb = max(x0 - pad, 0), min(x1 + pad, w)
                for i in range(0, n, per):
                    o = self._run(x[i : i + per, :, ya:yb, xa:xb])
                    out[i : i + per, :, y0 * s : y1 * s, x0 * s : x1 * s] = o[
                        :, :, (y0 - ya) * s : (y1 - ya) * s, (x0 - xa) * s : (x1 - xa) * s
                    ]
        return out

    # --- a pipelined stream ---------------------------------------------------------

    def stream(self, frames: Iterable[np.ndarray], *, batch: int | None = None) -> Iterator[np.ndarray]:
        """Upscale an iterable of (H, W, 3) uint8 frames, yielding output frames in order.

        A reader thread pulls ``frames`` into a bounded queue and a worker thread
        runs batches of up to ``batch`` same-sized frames (None: ``default_batch``,
        4 on CUDA, 1 on the CPU) while the caller consumes results. An exception raised by ``frames`` (or the model) is
        raised here after the frames before it. Closing the generator early
        stops both threads (and closes ``frames`` if it is a generator).
        """
        if batch is None:
            batch = self.default_batch
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        return self._stream(frames, batch)

    def _stream(self, frames: Iterable[np.ndarray], batch: int) -> Iterator[np.ndarray]:
        stop = threading.Event()
        q_in: queue.Queue = queue.Queue(maxsize=2 * batch)
        q_out: queue.Queue = queue.Queue(maxsize=2)
        reader = threading.Thread(target=_read, args=(frames, q_in, stop), name="upscale-reader", daemon=True)
        worker = threading.Thread(
            target=self._work, args=(q_in, q_out, stop, batch), name="upscale-worker", daemon=True
        )
        try:
            with deferred():  # a stop inside start() would leave a thread no `finally` joins
                reader.start()
                worker.start()
            while True:
                try:
                    item = q_out.get(timeout=0.5)
                except queue.Empty:
                    if not worker.is_alive() and q_out.empty():
                        raise RuntimeError("upscale worker thread died") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield from item
        finally:
            stop.set()
            _join(worker, reader)

    def _work(self, q_in: queue.Queue, q_out: queue.Queue, stop: threading.Event, batch: int) -> None:
        pending: list[np.ndarray] = []
        ended: object = None
        try:
            while not stop.is_set() and ended is None:
                item = _get(q_in, stop)
                if item is None:
                    return  # stopped
                if item is _END or isinstance(item, _Failure):
                    ended = item
                else:
                    if pending and item.shape != pending[0].shape:
                        if not _put(q_out, self.upscale(np.stack(pending)), stop):
                            return
                        pending = []
                    pending.append(item)
                if pending and (len(pending) >= batch or ended is not None):
                    if not _put(q_out, self.upscale(np.stack(pending)), stop):
                        return
                    pending = []
            if ended is not None:
                _put(q_out, ended, stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _put(q_out, _Failure(exc), stop)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> object | None:
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def _join(worker: threading.Thread, reader: threading.Thread) -> None:
    """Wait for both threads, even when a stop signal's exception lands during the wait.

    Leaving early would let the caller close ``frames`` while the reader is
    still inside it ("generator already executing"), and exit with torch
    mid-batch; the stop has already been asked for, so the wait is short.
    A thread that failed to start (no thread could be made) is skipped.
    """
    with deferred():
        if worker.ident is not None:
            worker.join()
        if reader.ident is not None:
            reader.join(timeout=5.0)


def _read(frames: Iterable[np.ndarray], q: queue.Queue, stop: threading.Event) -> None:
    it = iter(frames)
    try:
        for frame in it:
            if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
                desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
                raise ValueError(f"stream frames must be (H, W, 3) uint8 RGB arrays, got {desc}")
            if not _put(q, frame, stop):
                return
        _put(q, _END, stop)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        _put(q, _Failure(exc), stop)
    finally:
        if stop.is_set():
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - the consumer already left
                    pass


# --- construction ---------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return dev


def load_upscaler(
    model: str,
    *,
    scale: int | None = None,
    weights: Path | str | None = None,
    device: str = "auto",
    progress: Callable[[int, int | None], None] | None = None,
    tile: int | None = None,
    precision: str = "auto",
) -> Upscaler:
    """Load ``model``'s weights (see :mod:`clipexport.upscale.weights`) onto a device.

    ``scale`` None means the model's native scale; a smaller one in (2, 4)
    resizes the model's output; anything else raises ModelError.
    ``progress(done_bytes, total_bytes)`` reports a weights download.
    ``tile``: input tile side in pixels, 0 never tiles, None chooses.
    ``precision``: auto, fp32, bf16, fp16 or int8 (see :mod:`clipexport.upscale.precision`).
    """
    spec = get_spec(model)
    if scale is None:
        scale = spec.native_scale
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in spec.scales:
        allowed = ", ".join(str(s) for s in spec.scales)
        raise ModelError(f"model {spec.name} supports scales {allowed}, not {scale}")
    dev = resolve_device(device)
    with torch.device("meta"):
        net = build(spec.arch, spec.arch_kwargs)  # no random init; weights are assigned
    origin = load_weights(spec, net, weights=weights, progress=progress)
    return Upscaler(net, spec=spec, scale=scale, device=dev, tile=tile, weights=origin, precision=precision)
