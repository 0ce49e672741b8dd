"""Frames per second of clipexport's upscale pipeline against a naive loop, same run.

A fixed clip is generated here with PyAV (a moving gradient, libx264), then
upscaled and re-encoded (libx264) twice, alternating, best of --repeat:

* naive: the reference Real-ESRGAN video script's way: decode every frame
  first, then per frame float32 numpy -> NCHW tensor -> model -> .cpu() ->
  numpy clamp * 255 round astype uint8 (sync after each frame), encode it.
* ours: decode in a generator -> ``Upscaler.stream`` (reader thread, batched
  worker thread, uint8 in/out, channels_last, inference_mode) -> encode as
  frames come out.

Both use the same weights (offline conversion unless CLIPEXPORT_WEIGHTS_SOURCE
says otherwise) and the same torch threads; their upscaled frames are compared.

    python bench/upscale_fps.py [--frames 48] [--size 160x90] [--model realesr-animevideov3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("CLIPEXPORT_WEIGHTS_SOURCE", "offline")

import torch  # noqa: E402

from clipexport.upscale import MODELS, load_upscaler  # noqa: E402
from clipexport.upscale.archs import build  # noqa: E402

FPS = 24


def make_clip(path: Path, frames: int, width: int, height: int) -> None:
    """A moving colour gradient with a square crossing it: deterministic, cheap, not flat."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=FPS)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"crf": "16"}
        for i in range(frames):
            t = i / max(frames - 1, 1)
            img = np.stack(
                [
                    127 + 100 * np.sin((x / width + t) * 2 * np.pi),
                    127 + 100 * np.cos((y / height - t) * 2 * np.pi),
                    255 * ((x + y + i * 3) % (width / 2)) / (width / 2),
                ],
                -1,
            )
            cx = int(t * (width - height // 3))
            img[height // 3 : 2 * height // 3, cx : cx + height // 3] = (250, 250, 40)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            out.mux(st.encode(frame))
        out.mux(st.encode())


def decode(path: Path):
    with av.open(str(path)) as src:
        for frame in src.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


class Encoder:
    def __init__(self, path: Path, width: int, height: int) -> None:
        self.out = av.open(str(path), "w")
        self.st = self.out.add_stream("libx264", rate=FPS)
        self.st.width, self.st.height, self.st.pix_fmt = width, height, "yuv420p"
        self.st.options = {"crf": "18"}

    def write(self, rgb: np.ndarray) -> None:
        self.out.mux(self.st.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))

    def close(self) -> None:
        self.out.mux(self.st.encode())
        self.out.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_naive(clip: Path, dst: Path, net: torch.nn.Module, device: torch.device, scale: int, keep: list) -> float:
    dtype = next(net.parameters()).dtype  # float32; float16 on CUDA, as the reference's --half
    start = time.perf_counter()
    frames = list(decode(clip))  # the reference reads everything first
    h, w = frames[0].shape[:2]
    enc = Encoder(dst, w * scale, h * scale)
    for img in frames:
        x = img.astype(np.float32) / 255.0
        x = torch.from_numpy(np.transpose(x, (2, 0, 1))).float().unsqueeze(0).to(device=device, dtype=dtype)
        with torch.no_grad():
            y = net(x)
        sync(device)
        y = y.data.squeeze().float().cpu().clamp_(0, 1).numpy()
        out = (np.transpose(y, (1, 2, 0)) * 255.0).round().astype(np.uint8)
        enc.write(out)
        keep.append(out)
    enc.close()
    return time.perf_counter() - start


def run_ours(clip: Path, dst: Path, up, batch: int, keep: list) -> float:
    start = time.perf_counter()
    enc = None
    for out in up.stream(decode(clip), batch=batch):
        if enc is None:
            enc = Encoder(dst, out.shape[1], out.shape[0])
        enc.write(out)
        keep.append(out)
    assert enc is not None
    enc.close()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", default="160x90", help="WIDTHxHEIGHT of the generated clip (even numbers)")
    ap.add_argument("--model", default="realesr-animevideov3", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each pipeline; the best is reported")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the opt-in CPU bfloat16 row")
    args = ap.parse_args()
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size!r}: expected WIDTHxHEIGHT")
    if width % 2 or height % 2 or width < 16 or height < 16:
        ap.error("--size: width and height must be even and at least 16 (x264, yuv420p)")
    if args.frames < 1 or args.repeat < 1:
        ap.error("--frames and --repeat must be at least 1")

    up = load_upscaler(args.model, device=args.device)
    up_bf16 = None
    if up.device == "cpu" and args.bf16:
        os.environ["CLIPEXPORT_CPU_DTYPE"] = "bfloat16"  # the engine's opt-in
        try:
            up_bf16 = load_upscaler(args.model, device="cpu")
        finally:
            del os.environ["CLIPEXPORT_CPU_DTYPE"]
    device = torch.device(up.device)
    spec = MODELS[args.model]
    naive_net = build(spec.arch, spec.arch_kwargs)  # default NCHW float32 (half on CUDA, as the reference)
    naive_net.load_state_dict({k: v.float().cpu() for k, v in up.net.state_dict().items()})
    naive_net = naive_net.to(device=device, dtype=up.dtype).eval()

    with tempfile.TemporaryDirectory(prefix="upscale-fps-") as tmp:
        tmpdir = Path(tmp)
        clip = tmpdir / "clip.mp4"
        make_clip(clip, args.frames, width, height)
        n = sum(1 for _ in decode(clip))
        warm = next(decode(clip))  # first-call set-up (oneDNN/cuDNN plans) kept out of both timings
        up.upscale(warm[None])
        if up_bf16 is not None:
            up_bf16.upscale(warm[None])
        with torch.no_grad():
            naive_net(torch.from_numpy(warm.transpose(2, 0, 1) / 255.0).to(device=device, dtype=up.dtype)[None])

        naive_t, ours_t, bf16_t = [], [], []
        naive_frames: list = []
        ours_frames: list = []
        bf16_frames: list = []
        for _ in range(args.repeat):  # alternating, so that a noisy neighbour hits all alike
            for kept in (naive_frames, ours_frames, bf16_frames):
                kept.clear()
            naive_t.append(run_naive(clip, tmpdir / "naive.mp4", naive_net, device, up.scale, naive_frames))
            ours_t.append(run_ours(clip, tmpdir / "ours.mp4", up, args.batch, ours_frames))
            if up_bf16 is not None:
                bf16_t.append(run_ours(clip, tmpdir / "bf16.mp4", up_bf16, args.batch, bf16_frames))
        assert len(naive_frames) == len(ours_frames) == n

    def largest_diff(frames: list) -> int:
        return max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(naive_frames, frames))

    dt = str(up.dtype).replace("torch.", "")
    print(
        f"clip: {n} frames {width}x{height} -> {width * up.scale}x{height * up.scale}, {args.model} x{up.scale}, "
        f"{up.device}, torch threads {torch.get_num_threads()}, best of {args.repeat} alternating runs"
    )
    rows = [(f"naive (reference loop, {dt})", naive_t, None), (f"ours (stream, batch {args.batch}, {dt})", ours_t, ours_frames)]
    if bf16_t:
        rows.append((f"ours (stream, batch {args.batch}, bfloat16 opt-in)", bf16_t, bf16_frames))
    naive_best = min(naive_t)
    print(f"{'pipeline':<44}{'seconds':>9}{'fps':>8}{'x naive':>9}{'max diff':>10}   all runs (s)")
    for name, times, frames in rows:
        best = min(times)
        diff = "-" if frames is None else str(largest_diff(frames))
        runs = " ".join(f"{t:.2f}" for t in times)
        print(f"{name:<44}{best:>9.2f}{n / best:>8.2f}{naive_best / best:>9.2f}{diff:>10}   {runs}")
    print("max diff: the largest difference from the naive loop's frames, in levels of 255")


if __name__ == "__main__":
    main()
