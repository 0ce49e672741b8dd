"""Which floating-point precision the network runs in: ``auto``, ``fp32``, ``bf16``, ``fp16``.

``auto`` picks what the hardware runs natively, because that is both the
fastest and the one whose speed the ETA model knows:

* CUDA: ``fp16`` (tensor cores; what the reference tool's ``--half`` does);
* a CPU with AMX bfloat16 tiles (``amx_bf16`` in ``/proc/cpuinfo``): ``bf16``,
  about 51 dB PSNR against fp32 on the compact nets, far above what an x264
  encode at crf 18 keeps;
* any other CPU: ``fp32``. That includes CPUs with only the AVX-512 bfloat16
  dot product (``avx512_bf16``): measured on one (`bench/upscale_fps.py`,
  quiet, 2 threads, 320x180 x4), fp32 ran 3.84 frames/s and bf16 2.26, so
  oneDNN's bf16 convolutions pay off only with AMX.

``fp16`` on the CPU is refused: torch runs half-precision convolutions on the
CPU only on a few recent chips, and several times slower than fp32 elsewhere.
``bf16`` on a CPU without the instructions is allowed (it is correct, only
slow). This module needs no torch: the CLI validates with it before any job.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from clipexport.errors import UsageError

__all__ = ["PRECISIONS", "cpu_flags", "fast_bf16", "normalise", "resolve"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
FAST_BF16_FLAGS = ("amx_bf16",)
CPUINFO = Path("/proc/cpuinfo")


def normalise(value: str) -> str:
    """``value`` as one of PRECISIONS (torch's dtype names accepted too)."""
    name = str(value).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision {value!r}: use {', '.join(PRECISIONS)}")
    return name


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where unknown).

    torch has no query for bfloat16 instructions (its CPU capability says
    only "AVX512"), so the kernel's list is the source.
    """
    try:
        text = (cpuinfo or CPUINFO).read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return frozenset(value.split())
    return frozenset()


def fast_bf16(flags: Iterable[str]) -> bool:
    """Whether these CPU flags make bf16 faster than fp32 (AMX tiles, not the AVX-512 dot product alone)."""
    return any(flag in FAST_BF16_FLAGS for flag in flags)


def resolve(precision: str, device_type: str, flags: Iterable[str] | None = None) -> str:
    """The precision that runs on ``device_type`` ("cpu" or "cuda"): never "auto".

    ``flags`` are the CPU's feature flags (read from /proc/cpuinfo when None).
    """
    name = normalise(precision)
    if device_type == "cuda":
        return "fp16" if name == "auto" else name
    if name == "fp16":
        raise UsageError("precision fp16 does not run on the CPU: use bf16, fp32 or auto")
    if name == "auto":
        return "bf16" if fast_bf16(cpu_flags() if flags is None else flags) else "fp32"
    return name
