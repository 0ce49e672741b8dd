"""Real-ESRGAN upscaling: architectures, weights registry and cache, inference engine.

::

    from clipexport.upscale import MODELS, load_upscaler
    up = load_upscaler("realesr-animevideov3", scale=2)
    big = up.upscale(frames)                 # (N,H,W,3) uint8 -> (N,2H,2W,3) uint8
    for frame in up.stream(decoded_frames):  # pipelined, in order
        ...

The registry (``MODELS``, ``ModelSpec``) needs no torch; ``load_upscaler`` and
``Upscaler`` import torch on first use. Where the weights come from is
described in :mod:`clipexport.upscale.weights`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipexport.upscale.registry import MODELS, ModelSpec, get_spec

if TYPE_CHECKING:
    from clipexport.upscale.engine import Upscaler, load_upscaler

__all__ = ["MODELS", "ModelSpec", "Upscaler", "get_spec", "load_upscaler"]


def __getattr__(name: str) -> Any:
    if name in ("Upscaler", "load_upscaler"):
        from clipexport.upscale import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
