"""Winograd 3x3 convolutions (opt-in CPU inference path): exact algebra, float error no worse
than expected, caching, tile choice, and Darknet parity of Detector(winograd=True)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import IMAGES, ORACLE, needs_shared
from test_infer_parity import _assert_outputs_close, _detectors, load_oracle_model
from test_postprocess import _probs_dense

import darknet_cfg
from darknet_cfg.infer import Detector
from darknet_cfg.layers import winograd


@pytest.fixture(params=["compiled", "torch"])
def impl(request, monkeypatch):
    """Both ways of computing the transforms: layers/_winograd.c (built by setup.py) and the torch
    operators used where it is not built or a shape's channels are not multiples of 8."""
    if request.param == "compiled":
        if winograd._LIB is None:
            pytest.skip("layers/_winograd.c not built (no C compiler at install, or no AVX2)")
    else:
        monkeypatch.setattr(winograd, "_LIB", None)
    return request.param


def test_compiled_transforms_are_built_where_ci_runs():
    """CI installs with a C compiler on x86-64: the compiled transforms must be there."""
    import os
    import platform
    if not os.environ.get("CI") or platform.machine() != "x86_64":
        pytest.skip("checked in CI on x86-64")
    assert winograd._LIB is not None


def _conv(c, k, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, k, 3, 1, 1, bias=bias)
    with torch.no_grad():
        conv.weight.normal_(0, (2.0 / (9 * c)) ** 0.5)
        if bias:
            conv.bias.normal_()
    return conv


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 13), (1, 16, 8, 13, 13), (1, 3, 4, 1, 6),
                                   (3, 32, 24, 17, 8), (1, 8, 16, 1, 1), (2, 24, 40, 10, 6)])
@pytest.mark.parametrize("bias,leaky", [(True, True), (False, False)])
def test_winograd_equals_direct_convolution(m, shape, bias, leaky, impl):
    n, c, k, h, w = shape
    conv = _conv(c, k, bias).requires_grad_(False)
    x = torch.randn(n, c, h, w)
    ref = F.conv2d(x.double(), conv.weight.double(),
                   None if conv.bias is None else conv.bias.double(), padding=1)
    ref = F.leaky_relu(ref, 0.1) if leaky else ref
    direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    direct = F.leaky_relu(direct, 0.1) if leaky else direct
    direct_err = float((direct.double() - ref).abs().max())
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            y = winograd.conv3x3(conv, xin, m, leaky=leaky)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        err = float((y.double() - ref).abs().max())
        # F(2x2) rounds about as a direct float32 convolution; F(4x4)'s transforms add ~4e-6
        # of the output's scale (measured 2-5e-6; a direct convolution: 0.2-2e-6)
        scale = float(ref.abs().max())
        bound = 1.5 * direct_err + 1e-7 * scale if m == 2 else 1e-5 * scale
        assert err <= bound, (err, direct_err, scale)


@pytest.mark.parametrize("m", [2, 4])
def test_channel_slice_input(m, impl):
    """A [route] group's channel slice of a channels_last tensor is read in place."""
    conv = _conv(16, 8)
    full = torch.randn(2, 48, 9, 11).contiguous(memory_format=torch.channels_last)
    x = full[:, 16:32]
    with torch.no_grad():
        y = winograd.conv3x3(conv, x, m)
        ref = F.conv2d(x.contiguous(), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_bands_of_tile_rows_give_the_same_result(monkeypatch, impl):
    conv = _conv(8, 8)
    x = torch.randn(1, 8, 30, 11)
    with torch.no_grad():
        whole = winograd.conv3x3(conv, x, 4)
        monkeypatch.setattr(winograd, "_BAND_BYTES", 1)   # one tile row per band
        torch.testing.assert_close(winograd.conv3x3(conv, x, 4), whole, rtol=0, atol=0)


def test_transformed_weights_follow_weight_changes():
    conv = _conv(6, 4)
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        winograd.conv3x3(conv, x, 2)
        conv.weight.mul_(2)
        conv.bias.add_(1)
        torch.testing.assert_close(winograd.conv3x3(conv, x, 2),
                                   F.conv2d(x, conv.weight, conv.bias, padding=1)
                                   .contiguous(memory_format=torch.channels_last),
                                   rtol=1e-5, atol=1e-5)
    # a conv made under inference_mode (no version counter) works too
    with torch.inference_mode():
        c2 = nn.Conv2d(6, 4, 3, 1, 1)
        winograd.conv3x3(c2, x, 2)


def test_tile_choice(impl):
    tile = winograd.tile_for
    if impl == "compiled":
        assert tile(64, 64, 104, 104) == 4          # cheap transforms: thin layers pay too
        assert tile(32, 32, 104, 104) == 4
        assert tile(8, 8, 104, 104) == 0            # too thin for the batched GEMM
        assert tile(128, 128, 26, 26) == 4
        assert tile(512, 512, 13, 13) == 2          # 4x4 tiles would waste 34% at 13
        assert tile(128, 128, 13, 13) == 0
        assert tile(1024, 1024, 7, 7) == 0
        assert tile(64, 64, 104, 104, largest=2) == 2
        assert tile(32, 32, 104, 104, largest=2) == 0
        assert tile(512, 512, 13, 13, largest=2) == 2
        assert tile(12, 12, 104, 104) == 0          # channels not multiples of 8: torch rule
    else:
        assert tile(64, 64, 104, 104) == 0          # thin: the transforms cost more
        assert tile(128, 128, 52, 52) == 4
        assert tile(128, 128, 26, 26) == 0
        assert tile(256, 512, 26, 26) == 4
        assert tile(256, 512, 26, 26, largest=2) == 0
        assert tile(512, 1024, 13, 13) == 2
        assert tile(256, 256, 13, 13) == 0
        assert tile(1024, 1024, 7, 7) == 0
    assert tile(128, 128, 52, 52, training=True, batch=8) == 4
    assert tile(128, 128, 64, 64, training=True, batch=1) == 4
    assert tile(128, 128, 7, 7, training=True, batch=1) == 0      # too few pixels
    if impl == "compiled":
        assert tile(32, 32, 52, 52, training=True, batch=8) == 4
        assert tile(256, 256, 7, 7, training=True, batch=64) == 4
        assert tile(256, 256, 5, 5, training=True, batch=64) == 0
        assert tile(8, 8, 52, 52, training=True, batch=8) == 0
        assert tile(32, 32, 14, 14, training=True, batch=16) == 0   # thin and small: 0.93x
    else:
        assert tile(32, 32, 52, 52, training=True, batch=8) == 0
        assert tile(256, 256, 7, 7, training=True, batch=64) == 2
    conv = nn.Conv2d(8, 8, 3, 1, 1)
    assert winograd.applies(conv)
    assert not winograd.applies(nn.Conv2d(8, 8, 3, 2, 1))
    assert not winograd.applies(nn.Conv2d(8, 8, 3, 1, 2, dilation=2))
    assert not winograd.applies(nn.Conv2d(8, 8, 3, 1, 1, groups=2))
    assert not winograd.applies(nn.Conv2d(8, 8, 1))


WIDE_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=128
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=256
size=3
stride=1
pad=1
activation=mish

[convolutional]
filters=128
size=3
stride=1
pad=1
activation=linear
"""


def test_model_uses_winograd_only_when_asked(tmp_path, monkeypatch):
    cfg = tmp_path / "wide.cfg"
    cfg.write_text(WIDE_CFG)
    torch.manual_seed(0)
    model = darknet_cfg.build_model(cfg).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)[0]
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model.fuse().to(memory_format=torch.channels_last).prepack()
    with torch.inference_mode():
        model(x)
    assert calls == []                                   # off by default
    model.prepack(winograd=True)
    with torch.inference_mode():
        y = model(x.contiguous(memory_format=torch.channels_last))[0]
    assert calls == [4, 4]        # the 3->128 layer is thin; 128->256 and 256->128 use F(4x4)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    calls.clear()
    model.train()  # training and autograd never take the path
    model(x.requires_grad_())[0].sum().backward()
    assert calls == []


def _assert_same_detections_near_thresh(dets, after, ref, margin):
    """Same boxes in Darknet's order; class sets equal except for classes whose probability
    (Darknet's or ours) is within ``margin`` of the threshold; values within 1e-4."""
    boxes = ref["boxes"]
    mine = list(zip(dets.layer.tolist(), dets.anchor.tolist(), dets.row.tolist(), dets.col.tolist()))
    assert mine == [(b["layer"], b["anchor"], b["row"], b["col"]) for b in boxes]
    np.testing.assert_allclose(dets.objectness, [b["objectness"] for b in boxes], rtol=0, atol=1e-4)
    for key, got in (("probs_pre_nms", dets.probs), ("probs", after.probs)):
        want = _probs_dense(boxes, key, dets.classes)
        flipped = (got != 0) != (want != 0)
        near = np.abs(np.where(got != 0, got, want) - ref["thresh"]) <= margin
        assert not (flipped & ~near).any(), f"{key}: class sets differ away from the threshold"
        both = (got != 0) & (want != 0)
        assert np.abs(got - want)[both].max(initial=0) <= 1e-4


@needs_shared
@pytest.mark.parametrize("tiles", [2, 4])
@pytest.mark.parametrize("name", _detectors())
def test_detector_with_winograd_matches_darknet(name, tiles, tmp_path):
    """The opt-in path keeps Darknet's outputs within the oracle tolerance and its detections,
    up to classes within 2e-5 of the threshold (float rounding differs from Darknet's)."""
    model, meta = load_oracle_model(name, tmp_path)
    ref = json.loads((ORACLE / "models" / name / "detections.json").read_text())
    det = Detector(model.fuse(), thresh=ref["thresh"], nms=ref["nms"], winograd=tiles)
    used = []
    real = winograd.conv3x3
    winograd.conv3x3 = lambda *a, **k: used.append(a[2]) or real(*a, **k)
    try:
        x, size = det.prepare(IMAGES / "dog.png")
        out = det.forward(x[None])[0]
    finally:
        winograd.conv3x3 = real
    _assert_outputs_close(name, out)
    dets = det.decode(out, size)
    _assert_same_detections_near_thresh(dets, det.suppress(dets), ref, 2e-5)
    print(f"{name}: {len(used)} Winograd layers (F2: {used.count(2)}, F4: {used.count(4)})")


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 9), (3, 8, 4, 5, 13), (1, 16, 16, 12, 12),
                                   (2, 8, 24, 9, 14)])
def test_training_convolution_gradients(m, shape, impl):
    """Forward, input gradient and weight gradient by Winograd equal float64 autograd."""
    n, c, k, h, w = shape
    conv = _conv(c, k)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    y = winograd.conv3x3_train(x, weight, bias, m)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y64 = F.conv2d(x64, w64, b64, padding=1)
    (y64 * g.double()).sum().backward()
    for got, want in ((y, y64), (x.grad, x64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        scale = float(want.abs().max())
        assert float((got.double() - want).abs().max()) <= 2e-5 * scale


def test_training_uses_winograd_only_when_asked(tmp_path, monkeypatch):
    cfg = tmp_path / "wide.cfg"
    cfg.write_text(WIDE_CFG)
    torch.manual_seed(0)
    model = darknet_cfg.build_model(cfg).train()
    x = torch.rand(4, 3, 32, 32)
    ref = model(x)[0]
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []
    real = winograd.conv3x3_train
    monkeypatch.setattr(winograd, "conv3x3_train", lambda *a: calls.append(a[3]) or real(*a))
    model.winograd_training()
    y = model(x)[0]
    assert calls == [4, 4]                 # 4 images x 32 x 32 >= 3000 pixels: training tiles
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    for p, want in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    calls.clear()
    with torch.no_grad():                  # no gradients: the plain path
        model(x)
    model.winograd_training(False)
    model(x)
    assert calls == []
