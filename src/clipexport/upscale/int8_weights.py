"""The compact nets' weights rounded to int8 by GPTQ, computed once per machine and kept in the cache.

Rounding each weight to its nearest int8 step (per output channel) leaves
an error the network amplifies on sharp detail: 47 dB PSNR against fp32 on
the sample clip, but 42 dB on a frame of small text and 30 dB on noise
(fake quantisation, the activations exact). GPTQ (Frantar et al., 2022)
rounds one input column at a time and moves each rounding's error onto the
columns not yet rounded, weighted by how the layer's inputs correlate
(``H = X Xᵀ`` over calibration pixels), so that the layer's *output* error
is what is kept small. Same int8 grid, same kernels: 52 dB on the sample
clip, 47 dB on the text frame, 50 dB with grain (sigma 8), 34 dB on noise,
all frames the calibration never saw.

* Calibration: synthetic frames made here (gradients, shapes, lines, text
  in Pillow's default font, grain), the same on every machine; the inputs
  each convolution sees in the float32 net, 1024 random pixels per frame
  (a fixed seed).
* ``H`` and the rounding in float64: in float32, GPTQ's error feedback
  turned summation-order noise into 129 different codes (of 619,200)
  between 1 and 2 threads; in float64, none.
* Cache: ``<cache>/int8/<model>-<sha256 of the weights>-<INT8_METHOD>.npz``,
  written atomically; about 4 s to compute where it is missing (on 2 cores,
  mostly ``H``). A new
  rounding method gets a new ``precision.INT8_METHOD`` and so a new file.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clipexport.upscale.precision import INT8_METHOD, int8_caches

__all__ = ["rounded"]

CALIBRATION_FRAMES = 6
CALIBRATION_SIZE = (128, 128)  # width, height
PIXELS_PER_FRAME = 1024
DAMPING = 0.01  # of H's mean diagonal: keeps the inverse well conditioned
BLOCK = 64  # columns rounded between two updates of the rest (the result is the same; only speed)


def rounded(net: nn.Module, convs: list[nn.Conv2d], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(int8 weights, per-output-channel scales) of each of ``convs`` (layers of ``net``): cached, else computed."""
    state = net.state_dict()  # all of it: biases and PReLU slopes shape the calibration's activations
    digest = hashlib.sha256(b"".join(state[k].detach().float().numpy().tobytes() for k in sorted(state))).hexdigest()
    path = int8_caches()[0] / f"{name}-{digest[:16]}-{INT8_METHOD}.npz"
    try:
        with np.load(path) as kept:
            return [(torch.from_numpy(kept[f"q{i}"]), torch.from_numpy(kept[f"s{i}"])) for i in range(len(convs))]
    except (OSError, KeyError, ValueError):
        pass
    out = _compute(net, convs)
    _save(path, out)
    return out


def _compute(net: nn.Module, convs: list[nn.Conv2d]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ on a private float32 NCHW copy of ``net``: oneDNN computes a channels_last net's
    calibration pass with other roundings, and GPTQ would turn those into other codes."""
    names = {id(module): name for name, module in net.named_modules()}
    canonical = copy.deepcopy(net).float().to(memory_format=torch.contiguous_format)
    convs = [canonical.get_submodule(names[id(conv)]) for conv in convs]
    hessians = _input_correlations(canonical, convs)
    return [_gptq(conv.weight.detach().float(), h) for conv, h in zip(convs, hessians)]


def _save(path: Path, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Atomically (a private temporary file renamed into place); a cache that cannot be written is skipped."""
    arrays = {}
    for i, (q, s) in enumerate(weights):
        arrays[f"q{i}"], arrays[f"s{i}"] = q.numpy(), s.numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".int8-", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        return


def _input_correlations(net: nn.Module, convs: list[nn.Conv2d]) -> list[torch.Tensor]:
    """Per convolution, ``X Xᵀ`` of its 3x3 input patches (rows: channel x 9) over the calibration pixels."""
    sums: list[torch.Tensor | None] = [None] * len(convs)
    pick = torch.Generator().manual_seed(0)

    def hook(i: int):
        def collect(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            patches = F.unfold(inputs[0], 3, padding=1)[0]
            patches = patches[:, torch.randperm(patches.shape[1], generator=pick)[:PIXELS_PER_FRAME]].double()
            s = patches @ patches.T
            sums[i] = s if sums[i] is None else sums[i] + s

        return collect

    handles = [conv.register_forward_pre_hook(hook(i)) for i, conv in enumerate(convs)]
    try:
        with torch.inference_mode():
            for frame in calibration_frames():
                net(frame)
    finally:
        for h in handles:
            h.remove()
    return [s for s in sums if s is not None]


def _gptq(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (out, in, 3, 3) as int8 codes and per-output-channel scales, rounded column by column."""
    packed_scales = (w.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(1e-12)  # float32, as oneDNN gets them
    weights, scales = w.reshape(w.shape[0], -1).double(), packed_scales.double()[:, None]
    n = weights.shape[1]
    h = h.to(torch.float64, copy=True)  # a normal tensor (the sums are inference tensors)
    diag = torch.diagonal(h)
    dead = diag == 0  # an input never non-zero in the calibration: its weights do not matter
    h[dead, dead] = 1.0
    weights[:, dead] = 0.0
    h += DAMPING * diag.mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(weights)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        block, errors = weights[:, b0:b1].clone(), torch.zeros(weights.shape[0], b1 - b0, dtype=h.dtype)
        for j in range(b1 - b0):
            q = torch.clamp(torch.round(block[:, j : j + 1] / scales), -127, 127)
            codes[:, b0 + j : b0 + j + 1] = q
            e = (block[:, j : j + 1] - q * scales) / u[b0 + j, b0 + j]
            block[:, j + 1 :] -= e @ u[b0 + j : b0 + j + 1, b0 + j + 1 : b1]
            errors[:, j : j + 1] = e
        weights[:, b1:] -= errors @ u[b0:b1, b1:]
    return codes.to(torch.int8).reshape(w.shape), packed_scales


def calibration_frames() -> list[torch.Tensor]:
    """CALIBRATION_FRAMES synthetic (1, 3, H, W) float frames in [0, 1]: the same on every machine."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    width, height = CALIBRATION_SIZE
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    fonts = [ImageFont.load_default(size=14), ImageFont.load_default(size=12)]
    frames = []
    for k in range(CALIBRATION_FRAMES):
        base = np.stack([127 + 100 * np.sin(2 * np.pi * (xx * (k + 1) + 0.1 * k)),
                         127 + 100 * np.cos(2 * np.pi * yy * (k + 2)), 255 * xx], -1)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for j in range(4):
            x0, y0 = (int(v) for v in rng.integers(0, (width - 30, height - 30)))
            box = (x0, y0, x0 + int(rng.integers(8, 30)), y0 + int(rng.integers(8, 30)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if j % 3 == 0:
                draw.rectangle(box, fill=colour)
            elif j % 3 == 1:
                draw.ellipse(box, fill=colour)
            else:
                draw.line(box, fill=colour, width=2)
        draw.text((4, 4 + 20 * k % (height - 20)), "Abc xyz 0123 !?", fill=(255, 255, 255) if k % 2 else (0, 0, 0),
                  font=fonts[k % 2])
        pixels = np.asarray(image).astype(np.float64)
        if k >= 3:
            pixels += rng.normal(0, 4 * (k - 2), pixels.shape)  # grain, up to sigma 12
        u8 = np.clip(pixels, 0, 255).astype(np.uint8)
        frames.append(torch.from_numpy(u8).permute(2, 0, 1).unsqueeze(0).float() / 255)
    return frames
