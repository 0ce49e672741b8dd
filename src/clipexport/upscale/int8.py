"""The compact nets in int8 on the CPU: VNNI convolutions at 47-52 dB PSNR against float32.

Why not plain int8: with 8-bit activations (PyTorch's static quantisation,
oneDNN, VNNI) ``realesr-animevideov3`` ran 3.5x as fast as float32 but at
42 dB, under the 45 dB floor. Per-layer fake quantisation showed where it
goes: int8 weights alone keep 47 dB; 8-bit activations alone give 42 dB,
each of the 17 layers adding its share; ten bits would be needed.

So each activation goes in as two u8 tensors: ``hi``, the value rounded to
one step of its range, and ``lo``, what that rounding left, in steps 254
times finer (about 16 bits in all). Each convolution runs twice on the same
int8 weights (``hi`` with the bias, ``lo`` without) and its two float32
outputs are summed on the way into the next; the error left is the
weights', which GPTQ keeps small (:mod:`.int8_weights`): 52 dB on the
sample clip, 47 dB on a frame of small text (sharp detail is where int8
weights err most; rounded to the nearest step, 47 and 40 dB). Measured on this project's 2-core AVX512-VNNI machine
(`bench/upscale_fps.py`): two int8 passes take half the time of one float32
convolution, and the whole net runs about 1.6x as fast as float32.

* Weights: symmetric int8 per output channel, rounded by GPTQ
  (:mod:`.int8_weights`); packed once for oneDNN (``onednn::qconv_prepack``),
  which does not depend on the activations' scale.
* Activations: the scale is each frame's own range (min and max after
  PReLU), so nothing is calibrated, any content fits, and a frame's output
  depends on that frame alone (segments and resumes give the same frames).
* The first convolution takes the 8-bit frame itself (scale 1/255): exact.
* Between convolutions, two fused numba passes (:mod:`.int8_kernels`).
* glibc hands large blocks back to the kernel at every free, and this net
  frees two 64-channel outputs per layer: page faults cost a quarter of its
  time. :func:`keep_freed_memory` raises glibc's thresholds so they are reused.

Only for :class:`~clipexport.upscale.archs.SRVGGNetCompact`; needs numba
(the ``local`` extra).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clipexport.upscale import int8_weights
from clipexport.upscale.precision import int8_caches
from clipexport.upscale.archs import SRVGGNetCompact

__all__ = ["Int8Compact", "keep_freed_memory"]

_ONE = [1, 1]
_CL = torch.channels_last
KEEP_FREED_BYTES = 1 << 30  # glibc: blocks up to this size come from (and go back to) the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_lock = threading.Lock()  # numba's fallback thread pool must not be entered from two threads at once


def _kernels():
    """The numba kernels, compiled once per machine into clipexport's cache (``<cache>/numba``)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(int8_caches()[1]))
    from clipexport.upscale import int8_kernels

    return int8_kernels


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks up to KEEP_FREED_BYTES for reuse (nothing where libc is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    except (OSError, AttributeError):
        return


@dataclass(frozen=True)
class _Conv:
    packed: torch.Tensor
    scales: torch.Tensor  # per output channel
    zero_points: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def of(cls, conv: nn.Conv2d, codes: torch.Tensor, scales: torch.Tensor) -> _Conv:
        """``conv`` with its weights as int8 ``codes`` times per-output-channel ``scales``."""
        packed = torch.ops.onednn.qconv_prepack(codes, scales, 1.0, 0, _ONE, _ONE, _ONE, 1, None)
        return cls(packed, scales, torch.zeros(len(scales), dtype=torch.long), conv.bias.detach().float())

    def __call__(self, u8: torch.Tensor, scale: float, zero_point: int, *, bias: bool = True) -> torch.Tensor:
        """float32 output (channels_last) of the convolution of u8 codes meaning ``scale * (u8 - zero_point)``."""
        return torch.ops.onednn.qconv2d_pointwise(
            u8, scale, zero_point, self.packed, self.scales, self.zero_points, self.bias if bias else None,
            _ONE, _ONE, _ONE, 1, 1.0, 0, torch.float32, "none", [], "")


class Int8Compact(nn.Module):
    """``net`` (an SRVGGNetCompact) with int8 weights and two-part u8 activations; float in, float out."""

    def __init__(self, net: SRVGGNetCompact, name: str) -> None:
        """``name``: the model's, for the cache of its rounded weights (:mod:`.int8_weights`)."""
        super().__init__()
        self._k = _kernels()
        import numba

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        layers = list(net.body)
        convs = layers[0::2]
        self._convs = [_Conv.of(conv, *w) for conv, w in zip(convs, int8_weights.rounded(net, convs, name))]
        self._slopes = [prelu.weight.detach().float().contiguous().numpy() for prelu in layers[1::2]]
        self.upscale = net.upscale
        self._range = np.empty((self._k.CHUNKS, 2), np.float32)
        keep_freed_memory()
        self._compile()

    def _compile(self) -> None:
        """Compile the kernels now (about 3 s the first time on a machine; then read from the cache),
        so that the model's load, not its first frame, takes that time."""
        tiny = torch.zeros((1, len(self._slopes[0]), 1, 1)).contiguous(memory_format=_CL)
        with _lock:
            self._split(tiny, tiny, self._slopes[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, 3, H, W) float in [0, 1], as the float net takes it (values k/255).

        Frame by frame: each frame's activations are scaled to its own range,
        so a frame comes out the same whatever it was batched with.
        """
        if len(x) > 1:
            return torch.cat([self(x[i : i + 1]) for i in range(len(x))])
        frame = torch.empty(x.shape, dtype=torch.uint8, memory_format=_CL)
        frame.copy_(x.mul(255.0).round_())
        hi, lo = self._convs[0](frame, 1 / 255, 0), None
        with _lock:
            for conv, slopes in zip(self._convs[1:], self._slopes):
                q_hi, q_lo, scale, zero_point = self._split(hi, lo, slopes)
                hi = conv(q_hi, scale, zero_point)
                lo = conv(q_lo, scale / self._k.LO_STEPS, 128, bias=False)
        return F.pixel_shuffle(self._plus_nearest(hi.add_(lo), x), self.upscale)

    def _plus_nearest(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` plus the input, before the pixel shuffle: the float net adds the input upsampled
        (nearest) after it, the same sums on 16x the pixels, and the upsampling alone took 3 % of a frame."""
        y.unflatten(1, (x.shape[1], self.upscale**2)).add_(x.unsqueeze(2))
        return y

    def _split(self, hi: torch.Tensor, lo: torch.Tensor | None, slopes: np.ndarray):
        """prelu(hi + lo) as two u8 tensors, with the high part's scale and zero point."""
        h = _pixels(hi)
        low, has_lo = (_pixels(lo), True) if lo is not None else (h, False)  # the kernels take an array either way
        self._k.feature_range(h, low, has_lo, slopes, self._range)
        least, most = float(self._range[:, 0].min()), float(self._range[:, 1].max())
        scale = max(most - least, 1e-8) / 254  # one spare step: rounding never needs a 256th code
        zero_point = min(255, max(0, round(-least / scale)))
        q_hi = torch.empty(hi.shape, dtype=torch.uint8, memory_format=_CL)
        q_lo = torch.empty(hi.shape, dtype=torch.uint8, memory_format=_CL)
        self._k.split(h, low, has_lo, slopes, scale, float(zero_point), _pixels(q_hi), _pixels(q_lo))
        return q_hi, q_lo, scale, zero_point


def _pixels(t: torch.Tensor) -> np.ndarray:
    """A channels_last (N, C, H, W) tensor's memory as a (N*H*W, C) array, no copy."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n * h * w, c).numpy()  # view: raises rather than copy
