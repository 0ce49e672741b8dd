"""The int8 weights' rounding (GPTQ on synthetic calibration frames) and its cache."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from clipexport import config
from clipexport.upscale import int8_weights, load_upscaler


def _anime():
    net = load_upscaler("realesr-animevideov3", device="cpu", precision="fp32").net
    return net, list(net.body)[0::2]


def test_gptq_leaves_less_output_error_than_rounding_each_weight_alone():
    """On the calibration inputs of a middle layer, ||(W - Wq) X|| is smaller for GPTQ's codes."""
    net, convs = _anime()
    conv = convs[8]
    seen = []
    handle = conv.register_forward_pre_hook(lambda _m, inp: seen.append(F.unfold(inp[0], 3, padding=1)[0]))
    with torch.inference_mode():
        for frame in int8_weights.calibration_frames():
            net(frame)
    handle.remove()
    x = torch.cat(seen, dim=1).double()
    w = conv.weight.detach().double().reshape(conv.weight.shape[0], -1)
    codes, scales = int8_weights._gptq(conv.weight.detach().float(), x @ x.T)
    gptq = codes.double().reshape(w.shape) * scales.double()[:, None]
    nearest = torch.clamp(torch.round(w / scales.double()[:, None]), -127, 127) * scales.double()[:, None]
    err = {name: float(((w - q) @ x).pow(2).sum()) for name, q in (("gptq", gptq), ("nearest", nearest))}
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert err["gptq"] < 0.5 * err["nearest"], err


def test_the_rounded_weights_are_computed_once_and_then_read_from_the_cache(monkeypatch):
    net, convs = _anime()
    first = int8_weights.rounded(net, convs, "realesr-animevideov3")
    files = list((config.cache_dir() / "int8").glob("realesr-animevideov3-*-gptq1.npz"))
    assert len(files) == 1 and len(first) == len(convs) == 18

    def fail(*_args):
        raise AssertionError("computed again")

    monkeypatch.setattr(int8_weights, "_compute", fail)
    again = int8_weights.rounded(net, convs, "realesr-animevideov3")
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))


def test_a_damaged_cache_file_is_computed_again_and_replaced():
    net, convs = _anime()
    int8_weights.rounded(net, convs, "realesr-animevideov3")
    (path,) = (config.cache_dir() / "int8").glob("realesr-animevideov3-*.npz")
    path.write_bytes(b"not a zip")
    again = int8_weights.rounded(net, convs, "realesr-animevideov3")
    fresh = int8_weights._compute(net, convs)  # what computing now gives
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, fresh))
    with np.load(path) as kept:  # written whole again
        assert np.array_equal(kept["q17"], fresh[17][0].numpy())


def test_the_codes_do_not_depend_on_the_nets_memory_format():
    """An fp32 Upscaler's net is channels_last, an int8 one's is not: both must give the same codes
    (oneDNN's calibration pass rounds differently in each layout; CI saw the cache and a recomputation differ)."""
    net, convs = _anime()
    plain = load_upscaler("realesr-animevideov3", device="cpu", precision="fp32", tile=0).net
    plain = plain.to(memory_format=torch.contiguous_format)
    assert convs[5].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.body[10].weight.is_contiguous()
    a = int8_weights._compute(net, convs)
    b = int8_weights._compute(plain, list(plain.body)[0::2])
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_the_calibration_frames_are_the_same_every_time():
    a, b = int8_weights.calibration_frames(), int8_weights.calibration_frames()
    assert len(a) == int8_weights.CALIBRATION_FRAMES
    assert all(torch.equal(x, y) and x.shape == (1, 3, 128, 128) for x, y in zip(a, b))
