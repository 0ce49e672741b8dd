"""The inference engine: shapes, the reference arithmetic, padding, tiles, batches, stream().

Real networks with the official weights converted from the offline ncnn
package (the session's shared cache), on tiny frames: the machine has 2 cores.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import closing

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from clipexport.errors import UsageError
from clipexport.stopping import stop_on_signals
from clipexport.upscale import MODELS, Upscaler, archs, load_upscaler
from clipexport.upscale.engine import usable_cpus

ANIME = "realesr-animevideov3"
X4PLUS = "realesrgan-x4plus"


@pytest.fixture(scope="module")
def anime() -> Upscaler:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPEXPORT_WEIGHTS_SOURCE", "offline")
        return load_upscaler(ANIME, device="cpu", tile=0, precision="fp32")  # the reference's arithmetic


def frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Distinct frames: a moving smooth pattern plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        base = np.stack(
            [np.sin((x + 3 * i) / 5), np.cos((y - 2 * i) / 4), np.sin((x + y + i) / 7)], -1
        ) * 0.35 + 0.5
        out.append(np.clip(base * 255 + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def reference(net: torch.nn.Module, batch: np.ndarray, multiple: int = 1) -> np.ndarray:
    """The reference tool's arithmetic, frame by frame: float32 numpy, NCHW, reflect pad, clamp*255 round."""
    outs = []
    for img in batch:
        h, w = img.shape[:2]
        x = img.astype(np.float32) / 255.0
        x = np.pad(x, ((0, (-h) % multiple), (0, (-w) % multiple), (0, 0)), mode="reflect")
        with torch.no_grad():
            y = net(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None])[0]
        s = y.shape[1] // x.shape[0]
        y = y[:, : h * s, : w * s].float().cpu().clamp_(0, 1).numpy()
        outs.append((y.transpose(1, 2, 0) * 255.0).round().astype(np.uint8))
    return np.stack(outs)


def assert_close(a: np.ndarray, b: np.ndarray, levels: int = 1) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(np.int16) - b).max() <= levels


# --- shapes and arithmetic -----------------------------------------------------------------


def test_upscaler_attributes(anime):
    assert (anime.model, anime.scale, anime.device, anime.dtype) == (ANIME, 4, "cpu", torch.float32)
    assert torch.get_num_threads() <= usable_cpus()


@pytest.mark.parametrize("scale", [4, 2])
def test_animevideov3_shapes_and_reference_arithmetic(anime, scale):
    batch = frames(3, 36, 64)
    up = anime if scale == 4 else load_upscaler(ANIME, scale=2, device="cpu", precision="fp32")
    out = up.upscale(batch)
    assert out.shape == (3, 36 * scale, 64 * scale, 3) and out.dtype == np.uint8
    ref = reference(anime.net, batch)
    if scale == 2:  # --outscale: bicubic resize of the x4 output
        x4 = torch.from_numpy(ref).permute(0, 3, 1, 2).float()
        ref = F.interpolate(x4, size=(72, 128), mode="bicubic", align_corners=False)
        ref = ref.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert_close(out, ref, levels=3)  # resized before vs after quantising
    else:
        assert_close(out, ref)


@pytest.mark.parametrize("scale", [4, 2])
def test_x4plus_tiny_frame(scale):
    up = load_upscaler(X4PLUS, scale=scale, device="cpu", precision="fp32", tile=0)
    batch = frames(1, 18, 32, seed=1)
    out = up.upscale(batch)
    assert out.shape == (1, 18 * scale, 32 * scale, 3) and out.dtype == np.uint8
    if scale == 4:
        assert_close(out, reference(up.net, batch))


def test_x2plus_pads_odd_sizes_like_the_reference(tmp_path):
    torch.manual_seed(0)
    net = archs.build("rrdb", MODELS["realesrgan-x2plus"].arch_kwargs)
    path = tmp_path / "x2.safetensors"
    save_file({k: (v * 0.1).contiguous() for k, v in net.state_dict().items()}, str(path))
    up = load_upscaler("realesrgan-x2plus", weights=path, device="cpu", precision="fp32", tile=0)
    assert up.scale == 2 and up.multiple == 2
    batch = frames(2, 9, 15, seed=2)
    out = up.upscale(batch)
    assert out.shape == (2, 18, 30, 3)
    assert_close(out, reference(up.net, batch, multiple=2))


def test_batch_equals_frame_by_frame(anime):
    batch = frames(4, 20, 24, seed=3)
    one_by_one = np.concatenate([anime.upscale(batch[i : i + 1]) for i in range(4)])
    assert_close(anime.upscale(batch), one_by_one)


def test_empty_batch_and_bad_input(anime):
    assert anime.upscale(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 32, 32, 3)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        anime.upscale(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        anime.upscale(np.zeros((1, 8, 8, 3), np.float32))


def test_non_contiguous_input_is_accepted(anime):
    batch = frames(2, 16, 16, seed=4)
    flipped = batch[:, ::-1]
    assert_close(anime.upscale(flipped), anime.upscale(np.ascontiguousarray(flipped)), levels=0)


# --- tiles ------------------------------------------------------------------------------


def test_tiles_cover_the_receptive_field_of_the_compact_net(anime):
    tiled = load_upscaler(ANIME, device="cpu", precision="fp32", tile=16)
    assert tiled.tile == 16 and tiled.tile_pad >= 18
    batch = frames(2, 36, 52, seed=5)
    assert_close(tiled.upscale(batch), anime.upscale(batch))


def test_x4plus_tiled_close_to_untiled():
    whole = load_upscaler(X4PLUS, device="cpu", precision="fp32", tile=0)
    tiled = load_upscaler(X4PLUS, device="cpu", precision="fp32", tile=16)
    y, x = np.mgrid[0:32, 0:48].astype(np.float32)
    img = np.stack([0.5 + 0.3 * np.sin(x / 23 + y / 31), 0.5 + 0.3 * np.cos(x / 19 - y / 29), (x + y) / 80], -1)
    batch = (img * 255).round().astype(np.uint8)[None]
    a, b = whole.upscale(batch), tiled.upscale(batch)
    diff = np.abs(a.astype(np.int16) - b)
    assert diff.mean() < 1.0 and diff.max() <= 16  # measured 0.38 / 6: the RRDB sees past any overlap


def test_tile_from_environment(monkeypatch):
    monkeypatch.setenv("CLIPEXPORT_TILE", "24")
    assert load_upscaler(ANIME, device="cpu").tile == 24
    monkeypatch.setenv("CLIPEXPORT_TILE", "big")
    with pytest.raises(UsageError, match="CLIPEXPORT_TILE"):
        load_upscaler(ANIME, device="cpu")


def test_automatic_tiling_when_the_budget_is_small(anime):
    auto = load_upscaler(ANIME, device="cpu", precision="fp32")
    assert auto.tile is None
    batch = frames(2, 40, 40, seed=6)
    auto._max_pixels = 30 * 30  # as if memory were short: forces batch chunks and tiles
    assert auto._tile_side(40, 40) is not None
    assert_close(auto.upscale(batch), anime.upscale(batch))


def test_devices():
    with pytest.raises(UsageError, match="not supported|unknown device"):
        load_upscaler(ANIME, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            load_upscaler(ANIME, device="cuda")
        assert load_upscaler(ANIME, device="auto").device == "cpu"


def test_cpu_bfloat16_is_close_and_keeps_net_in_float32(anime):
    bf16 = load_upscaler(ANIME, device="cpu", tile=0, precision="bf16")
    assert (bf16.precision, bf16.dtype, anime.dtype) == ("bf16", torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.float32 for p in bf16.net.parameters())  # the weights as loaded
    batch = frames(2, 24, 32, seed=10)
    assert_close(bf16.upscale(batch), anime.upscale(batch), levels=8)
    with pytest.raises(UsageError, match="fp16 does not run on the CPU"):
        load_upscaler(ANIME, device="cpu", precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_matches_cpu(anime):
    gpu = load_upscaler(ANIME, device="cuda")
    assert gpu.dtype == torch.float16
    batch = frames(4, 36, 64)
    assert_close(gpu.upscale(batch), anime.upscale(batch), levels=3)


# --- stream() ---------------------------------------------------------------------------


def test_stream_yields_the_same_frames_in_order(anime):
    batch = frames(7, 16, 20, seed=7)
    expected = anime.upscale(batch)
    got = list(anime.stream(iter(batch), batch=3))
    assert len(got) == 7
    for g, e in zip(got, expected):
        assert_close(g, e)


def test_stream_handles_size_changes(anime):
    a, b = frames(3, 12, 16, seed=8), frames(2, 8, 8, seed=9)
    seq = [a[0], a[1], b[0], a[2], b[1]]
    got = list(anime.stream(seq, batch=4))
    assert [g.shape for g in got] == [(48, 64, 3), (48, 64, 3), (32, 32, 3), (48, 64, 3), (32, 32, 3)]
    assert_close(got[2], anime.upscale(b[:1])[0])


def test_stream_raises_the_readers_exception_after_earlier_frames(anime):
    batch = frames(3, 8, 8)

    def source():
        yield from batch
        raise RuntimeError("decoder broke")

    got = []
    with pytest.raises(RuntimeError, match="decoder broke"):
        for frame in anime.stream(source(), batch=2):
            got.append(frame)
    assert len(got) == 3


def test_stream_rejects_bad_frames(anime):
    with pytest.raises(ValueError, match="uint8"):
        list(anime.stream([np.zeros((8, 8, 3), np.float64)]))


def test_stream_stops_cleanly_when_the_consumer_stops(anime):
    closed = threading.Event()
    pulled = []

    def source():
        try:
            for i in range(1000):
                pulled.append(i)
                yield frames(1, 8, 8, seed=i)[0]
        finally:
            closed.set()

    gen = anime.stream(source(), batch=2)
    first = [next(gen), next(gen)]
    gen.close()
    assert closed.wait(5.0)  # the source is closed by the reader thread
    assert len(first) == 2 and len(pulled) < 50  # bounded read-ahead, not the whole source
    deadline = time.monotonic() + 5
    while any(t.name.startswith("upscale-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name.startswith("upscale-") for t in threading.enumerate())


def test_stream_batch_must_be_positive(anime):
    with pytest.raises(ValueError):
        anime.stream([], batch=0)
    assert list(anime.stream([])) == []


def test_a_stop_signal_inside_thread_start_waits_for_both_threads(anime, monkeypatch):
    """The CI failure "generator already executing": a stop landed while start() waited for a thread.

    Forced: SIGINT is raised as the worker thread starts, while the reader is
    inside the source generator. The stop must come out of the stream only
    once both threads are done, so that closing the source cannot fail.
    """
    inside = threading.Event()

    def source():
        yield frames(1, 8, 8, seed=0)[0]
        inside.set()
        time.sleep(0.3)  # the reader is in here when the stop lands
        yield frames(1, 8, 8, seed=1)[0]

    real_start = threading.Thread.start

    def start(thread):
        real_start(thread)
        if thread.name == "upscale-worker":
            assert inside.wait(5.0)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(threading.Thread, "start", start)
    src = source()
    with pytest.raises(KeyboardInterrupt), stop_on_signals() as stop:
        stop.announcer = lambda: None
        with closing(src), closing(anime.stream(src, batch=1)) as upscaled:
            next(upscaled)
    assert not any(t.name.startswith("upscale-") for t in threading.enumerate())
