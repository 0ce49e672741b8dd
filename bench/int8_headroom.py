"""How much faster int8 would be on this CPU, and what it costs in quality: the measurement behind #11.

    python bench/int8_headroom.py [--frames 8] [--size 320x180] [--threads 2] [--repeat 3]

Not a clipexport path: a prototype of static int8 quantisation (PyTorch's
FX graph mode, the x86/oneDNN backend: u8 activations, s8 per-channel
weights, VNNI where the CPU has it) of ``realesr-animevideov3``, beside
Tencent ncnn fp32 and clipexport's fp32 on the same frames, same weights,
alternating, best of --repeat. The activation ranges are calibrated on
other frames of the clip than the ones measured (a render would calibrate
on frames it has not upscaled yet).

Every row prints fps, its ratio to ncnn and its PSNR against clipexport's
fp32 output. The issue asks for 1.5x ncnn at 45 dB or more: this says
whether int8 post-training quantisation gets there (on this machine: about
3x the speed, about 42 dB).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from upscale_fps import decode, make_clip, ncnn_engine, psnr, quantise, stream_engine

from clipexport.upscale import MODELS, load_upscaler
from clipexport.upscale.archs import build

MODEL = "realesr-animevideov3"


def _tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> NCHW float in [0, 1], as the reference loop feeds the model."""
    return torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255.0).unsqueeze(0)


def int8_engine(up, calibration: list[np.ndarray]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """`up`'s network quantised to int8, its activation ranges calibrated on `calibration`."""
    from torch.ao.quantization import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver, QConfig
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    spec = MODELS[up.model]
    net = build(spec.arch, spec.arch_kwargs)
    net.load_state_dict({k: v.float() for k, v in up.net.state_dict().items()})
    net.eval()
    acts = HistogramObserver.with_args(reduce_range=False, quant_min=0, quant_max=255, dtype=torch.quint8)
    conv = QConfig(activation=acts, weight=PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    prelu = QConfig(activation=acts, weight=MinMaxObserver)  # a PReLU's slopes: one scale for the tensor
    mapping = get_default_qconfig_mapping("x86").set_global(conv)
    for i, layer in enumerate(net.body):
        mapping = mapping.set_module_name(f"body.{i}", prelu if isinstance(layer, torch.nn.PReLU) else conv)
    tensors = [_tensor(img) for img in calibration]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantisation is deprecated in favour of torchao
        prepared = prepare_fx(copy.deepcopy(net), mapping, (tensors[0],))
        with torch.no_grad():
            for x in tensors:
                prepared(x)
        qnet = convert_fx(prepared)

    def run(frames: list[np.ndarray]) -> list[np.ndarray]:
        outs = []
        for img in frames:
            with torch.no_grad():
                outs.append(quantise(qnet(_tensor(img)).squeeze(0).numpy()))
        return outs

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8, help="frames measured (as many again calibrate)")
    ap.add_argument("--size", default="320x180", help="WIDTHxHEIGHT of the generated clip (even numbers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size!r}: expected WIDTHxHEIGHT")
    if args.frames < 1 or args.repeat < 1 or args.threads < 1:
        ap.error("--frames, --repeat and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        make_clip(clip, 2 * args.frames, width, height)
        everything = decode(clip)
    calibration, frames = everything[::2], everything[1::2]
    up = load_upscaler(MODEL, device="cpu", precision="fp32", tile=0)
    rows = {"ncnn fp32 (baseline)": ncnn_engine(MODEL, args.threads),
            "clipexport fp32": stream_engine(up, 1),
            "int8 (oneDNN, static, prototype)": int8_engine(up, calibration)}
    reference = rows["clipexport fp32"](frames)
    best = {name: float("inf") for name in rows}
    outs: dict[str, list[np.ndarray]] = {}
    for _ in range(args.repeat):
        for name, run in rows.items():
            start = time.perf_counter()
            outs[name] = run(frames)
            best[name] = min(best[name], time.perf_counter() - start)
    base = len(frames) / best["ncnn fp32 (baseline)"]
    print(f"{len(frames)} frames {width}x{height} -> x4, {MODEL}, {args.threads} threads, best of {args.repeat}")
    print(f"{'row':<34} {'fps':>7} {'x ncnn':>7} {'PSNR vs fp32':>13}")
    for name in rows:
        fps = len(frames) / best[name]
        print(f"{name:<34} {fps:>7.2f} {fps / base:>7.2f} {psnr(outs[name], reference):>10.1f} dB")


if __name__ == "__main__":
    main()
