"""Which precision the network runs in: ``auto``, ``fp32``, ``bf16``, ``fp16``, ``int8``.

``auto`` picks what the hardware runs fastest at 45 dB PSNR or more against
fp32 on the sample clip (far above what an x264 encode at crf 18 keeps):

* CUDA: ``fp16`` (tensor cores; what the reference tool's ``--half`` does);
* a CPU with AMX bfloat16 tiles (``amx_bf16`` in ``/proc/cpuinfo``): ``bf16``,
  about 51 dB on the compact nets;
* a CPU with VNNI (``avx512_vnni``, ``avx_vnni``), for a model whose int8
  quality was measured (``ModelSpec.int8``): ``int8``
  (:mod:`clipexport.upscale.int8`), 52 dB on the sample clip (47 on a frame
  of small text), and 1.6x the speed of fp32
  on a 2-core AVX512-VNNI machine (`bench/upscale_fps.py`);
* any other CPU, or model: ``fp32``. That includes CPUs with only the
  AVX-512 bfloat16 dot product (``avx512_bf16``): there oneDNN's bf16
  convolutions ran at 0.6x the speed of fp32.

``fp16`` on the CPU is refused: torch runs half-precision convolutions on the
CPU only on a few recent chips, and several times slower than fp32 elsewhere.
``int8`` runs on the CPU only, for the compact nets, and needs numba.
``bf16`` on a CPU without the instructions is allowed (it is correct, only
slow). This module needs no torch: the CLI validates with it before any job.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from clipexport import config
from clipexport.errors import UsageError
from clipexport.upscale.registry import MODELS, ModelSpec

__all__ = ["INT8_METHOD", "PRECISIONS", "cpu_flags", "fast_bf16", "fast_int8", "int8_caches", "int8_prepared",
           "normalise", "resolve"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
FAST_BF16_FLAGS = ("amx_bf16",)
FAST_INT8_FLAGS = ("avx512_vnni", "avx_vnni")
CPUINFO = Path("/proc/cpuinfo")
INT8_METHOD = "gptq1"  # how upscale.int8_weights rounds; its cache files name it, so a new one is a new file


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


def fast_int8(flags: Iterable[str]) -> bool:
    """Whether these CPU flags give oneDNN's int8 convolutions the VNNI dot product."""
    return any(flag in FAST_INT8_FLAGS for flag in flags)


def resolve(precision: str, device_type: str, flags: Iterable[str] | None = None,
            model: ModelSpec | None = None) -> str:
    """The precision that runs ``model`` on ``device_type`` ("cpu" or "cuda"): never "auto".

    ``flags`` are the CPU's feature flags (read from /proc/cpuinfo when None).
    Without a ``model``, ``auto`` never picks int8.
    """
    name = normalise(precision)
    if device_type == "cuda":
        if name == "int8":
            raise UsageError("precision int8 runs on the CPU only: use auto, fp16, bf16 or fp32 on CUDA")
        return "fp16" if name == "auto" else name
    if name == "fp16":
        raise UsageError("precision fp16 does not run on the CPU: use int8, bf16, fp32 or auto")
    if name == "int8":
        _check_int8(model)
        return name
    if name == "auto":
        flags = cpu_flags() if flags is None else flags
        if fast_bf16(flags):
            return "bf16"
        if model is not None and model.int8 and fast_int8(flags) and _numba_installed():
            return "int8"
        return "fp32"
    return name


def _check_int8(model: ModelSpec | None) -> None:
    if model is not None and model.arch != "compact":
        compact = ", ".join(sorted(m.name for m in MODELS.values() if m.arch == "compact"))
        raise UsageError(f"precision int8 runs the compact models only ({compact}), not {model.name}")
    if not _numba_installed():
        raise UsageError("precision int8 needs numba: pip install 'clipexport[local]' (or numba)")


def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def int8_caches() -> tuple[Path, Path]:
    """Where int8 keeps what it prepares once per machine: the rounded weights, numba's compiled kernels."""
    cache = config.cache_dir()
    return cache / "int8", Path(os.environ.get("NUMBA_CACHE_DIR") or cache / "numba")


def int8_prepared(model: str) -> bool:
    """Whether this machine has int8 ready for ``model``: its weights rounded and the kernels compiled.

    The first int8 render spends about 7.5 s on both while it loads the
    model (2 cores); the plan says whether it will, for the ETA's load prior.
    """
    rounded, compiled = int8_caches()
    return any(rounded.glob(f"{model}-*-{INT8_METHOD}.npz")) and any(compiled.glob("*/int8_kernels.*.nbi"))
