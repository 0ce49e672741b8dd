"""The two fused passes between int8 convolutions (numba): see :mod:`clipexport.upscale.int8`.

Each convolution hands over two float32 outputs (``hi`` and ``lo``, its two
passes). Between it and the next, torch would need seven separate passes over
the 64-channel features (add, PReLU, min/max, quantise, dequantise, subtract,
quantise), and on two cores those took as long as a third of the
convolutions. Here they are two, each one read of the features:

* :func:`feature_range`: the smallest and largest value after PReLU;
* :func:`split`: the u8 pair (``q_hi``, ``q_lo``) for the next convolution.

Arrays are ``(pixels, channels)``: the channels_last memory of an NHWC
tensor, so the inner loop runs over contiguous channels and vectorises.
Imports numba: import this module only through :mod:`clipexport.upscale.int8`,
which first points numba's on-disk cache at clipexport's cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["CHUNKS", "LO_STEPS", "feature_range", "split"]

CHUNKS = 64  # work items per pass: enough to balance any thread count, each a block of whole pixels
LO_STEPS = 254  # the low part's u8 steps per high step (its range is one high step, centred on 128)


@njit(parallel=True, fastmath=True, cache=True)
def feature_range(hi, lo, has_lo, slopes, out):  # pragma: no cover - compiled
    """Per chunk, min and max of ``prelu(hi + lo)`` (0 included) into ``out[chunk]``.

    Per-channel running extremes keep the loop free of a scalar dependency,
    so it vectorises; ``out`` then has CHUNKS rows for the caller to reduce.
    """
    pixels, channels = hi.shape
    step = (pixels + CHUNKS - 1) // CHUNKS
    for k in prange(CHUNKS):
        least = np.zeros(channels, np.float32)
        most = np.zeros(channels, np.float32)
        for p in range(k * step, min(pixels, (k + 1) * step)):
            for c in range(channels):
                v = hi[p, c] + lo[p, c] if has_lo else hi[p, c]
                v = v if v >= 0 else v * slopes[c]
                least[c] = v if v < least[c] else least[c]
                most[c] = v if v > most[c] else most[c]
        out[k, 0] = least.min()
        out[k, 1] = most.max()


@njit(parallel=True, fastmath=True, cache=True)
def split(hi, lo, has_lo, slopes, scale, zero_point, q_hi, q_lo):  # pragma: no cover - compiled
    """``v = prelu(hi + lo)`` as two u8 codes: ``v ~ scale * (q_hi - zero_point + (q_lo - 128) / LO_STEPS)``.

    ``q_hi`` is ``v`` rounded to ``scale``; ``q_lo`` is what that rounding
    left (within half a step), in steps LO_STEPS times finer. In float32
    throughout: float64 constants would stop the loop vectorising.
    """
    pixels, channels = hi.shape
    s = np.float32(scale)
    inv = np.float32(1.0) / s
    inv_lo = np.float32(LO_STEPS) * inv
    zp = np.float32(zero_point)
    half, mid = np.float32(0.5), np.float32(128.5)
    zero, top = np.float32(0.0), np.float32(255.0)
    step = (pixels + CHUNKS - 1) // CHUNKS
    for k in prange(CHUNKS):
        for p in range(k * step, min(pixels, (k + 1) * step)):
            for c in range(channels):
                v = hi[p, c] + lo[p, c] if has_lo else hi[p, c]
                v = v if v >= zero else v * slopes[c]
                h = np.floor(v * inv + half)
                rest = v - h * s
                q_hi[p, c] = np.uint8(min(max(h + zp, zero), top))
                q_lo[p, c] = np.uint8(min(max(np.floor(rest * inv_lo + mid), zero), top))
