"""Opt-in low precision (Detector precision="bf16" / "int8", darknet_cfg/lowp.py).

Tolerances against float32 (README: Low-precision CPU inference), head outputs of the oracle's yolov4-tiny
(synthetic weights) at 224x224: bf16 |diff| <= 0.06 * max(1, |x|), int8 <= 0.3 * max(1, |x|);
decoded boxes both keep: coordinates (relative to the image) bf16 <= 0.05, int8 <= 0.12, class
probabilities (where both pass thresh) bf16 <= 0.02, int8 <= 0.04; at least 80% of the float32
boxes kept. Measured here: 0.029 / 0.143 (outputs), 0.021 / 0.059 (boxes), 0.004 / 0.019
(probabilities), 18 of 18 / 18 of 18 boxes: the tolerances are ~2x the measured worst case.
On a CPU without the instructions each path must fall back to float32 with a warning, so
every test passes with or without them.
"""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import IMAGES, ORACLE, REPO, needs_shared, oracle_io

import darknet_cfg
from darknet_cfg import lowp
from darknet_cfg.errors import DarknetError
from darknet_cfg.infer import Detector
from darknet_cfg.layers.quantized import QuantizedConv

TOL = {"bf16": dict(out=0.06, box=0.05, prob=0.02), "int8": dict(out=0.3, box=0.12, prob=0.04)}
SIZE = 224


def _mini(size=96):
    torch.manual_seed(0)
    return darknet_cfg.build_model(REPO / "cfg" / "yolov4-tiny-mini.cfg", size, size).eval()


def _oracle_tiny(tmp_path):
    oio = oracle_io()
    m = oio.load_model("yolov4-tiny")
    w = tmp_path / "yolov4-tiny.weights"
    w.write_bytes(oio.weights_bytes(m.layout, m.meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", darknet_cfg.CfgWarning)
        return lambda: darknet_cfg.load(ORACLE / "models" / "yolov4-tiny" / "model.cfg", w,
                                        width=SIZE, height=SIZE)


def _close(det32, det, tol):
    x, size = det32.prepare(IMAGES / "dog.png")
    o32, o = det32.forward(x[None])[0], det.forward(x[None])[0]
    for k in o32:
        assert np.all(np.abs(o[k] - o32[k]) <= tol["out"] * np.maximum(1, np.abs(o32[k]))), \
            f"layer {k}: {np.abs(o[k] - o32[k]).max():.3f}"
    a, b = det32.decode(o32, size), det.decode(o, size)
    key = lambda d: {t: i for i, t in enumerate(zip(d.layer.tolist(), d.anchor.tolist(),
                                                    d.row.tolist(), d.col.tolist()))}
    ka, kb = key(a), key(b)
    common = sorted(set(ka) & set(kb))
    assert len(common) >= 0.8 * len(ka) > 0  # objectness near thresh may cross it
    ia, ib = [ka[t] for t in common], [kb[t] for t in common]
    assert np.abs(a.boxes[ia] - b.boxes[ib]).max() <= tol["box"]
    pa, pb = a.probs[ia], b.probs[ib]
    both = (pa > 0) & (pb > 0)  # a class prob is 0 at or below thresh: crossing it is no measure
    assert np.abs(pa - pb)[both].max() <= tol["prob"]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_falls_back_to_float32_without_the_instructions(precision, monkeypatch):
    monkeypatch.setattr(lowp, "cpu_supports", lambda p: p == "fp32")
    x = np.random.default_rng(0).random((1, 3, 96, 96), np.float32)
    ref = Detector(_mini()).forward(x)[0]
    with pytest.warns(UserWarning, match="running float32"):
        det = Detector(_mini(), precision=precision)
    assert det.precision == "fp32" and det.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in det.model.parameters())
    out = det.forward(x)[0]
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])


def test_int8_falls_back_without_onednn_int8_kernels(monkeypatch):
    from darknet_cfg.layers import quantized
    monkeypatch.setattr(lowp, "cpu_supports", lambda p: True)
    monkeypatch.setattr(quantized, "available", lambda: False)
    with pytest.warns(UserWarning, match="no oneDNN int8 convolution.*running float32"):
        det = Detector(_mini(), precision="int8", calib=[np.zeros((3, 96, 96), np.float32)])
    assert det.precision == "fp32"


def test_float32_stays_the_default():
    det = Detector(_mini())
    assert det.precision == "fp32" and det._run is det.model
    with pytest.raises(DarknetError, match="precision 'fp16'"):
        Detector(_mini(), precision="fp16")


@needs_shared
def test_bf16_close_to_float32(tmp_path, monkeypatch):
    load = _oracle_tiny(tmp_path)
    det32 = Detector(load().fuse())
    if not lowp.cpu_supports("bf16") and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        monkeypatch.setattr(lowp, "cpu_supports", lambda p: True)  # oneDNN emulates: numbers only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = Detector(load(), precision="bf16")
    if det.precision == "fp32":  # no bfloat16 here at all: the fallback said so
        assert any("running float32" in str(w.message) for w in caught)
        return
    assert det.dtype == torch.bfloat16
    feeders = lowp.head_feeders(det.model)
    assert all(det.model.layers[i].conv.weight.dtype == torch.float32 for i in feeders)
    assert det.model.layers[0].conv.weight.dtype == torch.bfloat16
    _close(det32, det, TOL["bf16"])


@needs_shared
def test_int8_close_to_float32(tmp_path):
    load = _oracle_tiny(tmp_path)
    det32 = Detector(load().fuse())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = Detector(load(), precision="int8", calib=IMAGES)
    if det.precision == "fp32":  # no VNNI: the fallback said so
        assert any("running float32" in str(w.message) for w in caught)
        return
    q = [i for i, m in enumerate(det.model.layers) if isinstance(m, QuantizedConv)]
    assert q == lowp.int8_layers(det.model) and len(q) == 18  # 21 convolutions, 3 kept float
    assert det.model.layers[0].conv.weight.dtype != torch.float32 or not lowp.cpu_supports("bf16")
    _close(det32, det, TOL["int8"])


def test_int8_without_bfloat16(monkeypatch):
    """VNNI without AVX512-BF16 (e.g. Cascade Lake): int8 convolutions, the rest float32."""
    monkeypatch.setattr(lowp, "cpu_supports", lambda p: p != "bf16")
    rng = np.random.default_rng(0)
    images = [rng.random((3, 96, 96), np.float32) for _ in range(2)]
    det = Detector(_mini(), precision="int8", calib=images)
    assert det.precision == "int8" and det.dtype == torch.float32
    q = [m for m in det.model.layers if isinstance(m, QuantizedConv)]
    assert q and all(m.out_dtype == torch.float32 for m in q)
    out, ref = det.forward(images[0][None])[0], Detector(_mini()).forward(images[0][None])[0]
    for k in ref:
        assert out[k].dtype == np.float32
        assert np.abs(out[k] - ref[k]).max() <= TOL["int8"]["out"] * max(1, np.abs(ref[k]).max())


def test_quantized_conv_error_bound():
    """One int8 convolution against float32: within the rounding of its two grids."""
    from darknet_cfg.layers.conv import ConvBnAct
    from darknet_cfg.layers.quantized import input_qparams
    torch.manual_seed(0)
    for size, stride, act in ((3, 1, "linear"), (3, 2, "leaky"), (1, 1, "mish"), (3, 1, "relu")):
        layer = ConvBnAct(16, 24, size, (stride, stride), pad=size // 2, batch_normalize=True,
                          activation=act).eval()
        with torch.no_grad():
            layer.bn.running_mean.uniform_(-0.2, 0.2)
            layer.bn.running_var.uniform_(0.5, 2)
        layer.fuse()
        x = (torch.rand(1, 16, 20, 20) * 3 - 0.5).contiguous(memory_format=torch.channels_last)
        q = QuantizedConv(layer, float(x.min()), float(x.max()), out_dtype=torch.float32)
        with torch.no_grad():
            conv = F.conv2d(x, layer.conv.weight, layer.conv.bias, stride, size // 2)
            ref = layer(x)
            got = q(x)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        s, _ = input_qparams(float(x.min()), float(x.max()))
        w = layer.conv.weight
        w_step = w.abs().flatten(1).amax(1) / 127
        # |dy| <= sum |w| * s/2 + sum |x| * w_step/2, per output channel
        bound = (w.abs().flatten(1).sum(1) * s / 2 +
                 x.abs().max() * w[0].numel() * w_step / 2).view(1, -1, 1, 1)
        # linear/leaky/relu pass an error on at most unchanged, mish at most 1.1x (the
        # bound, a worst case over every input, is far from tight)
        assert (got - ref).abs().le(bound * 1.01 + 1e-5).all(), act
        assert float((got - ref).abs().max()) < 0.25 * float(conv.abs().max())


def test_int8_calibration_saved_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(lowp, "cpu_supports", lambda p: True)  # the file round trip runs anywhere
    rng = np.random.default_rng(0)
    images = [rng.random((3, 96, 96), np.float32) for _ in range(3)]
    cache = tmp_path / "mini.int8.json"
    first = Detector(_mini(), precision="int8", calib=images, calib_cache=cache)
    assert first.precision == "int8" and cache.is_file()
    doc = json.loads(cache.read_text())
    assert doc["calibration_images"] == 3
    assert len(doc["ranges"]) == len(lowp.int8_layers(first.model))

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again")
    monkeypatch.setattr(lowp, "calibrate", no_calibration)
    again = Detector(_mini(), precision="int8", calib_cache=cache)  # no images needed
    x = np.stack(images[:2])
    a, b = first.forward(x), again.forward(x)
    for k in a[0]:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    other = _mini()
    with torch.no_grad():
        other.layers[0].conv.weight.mul_(2)
    with pytest.raises(DarknetError, match="is for another model"):
        Detector(other, precision="int8", calib_cache=cache)
    cache.write_text('{"format": 1, "fingerprint"')  # truncated: calibrated again, rewritten
    monkeypatch.undo()
    monkeypatch.setattr(lowp, "cpu_supports", lambda p: True)
    Detector(_mini(), precision="int8", calib=images, calib_cache=cache)
    assert json.loads(cache.read_text())["ranges"] == doc["ranges"]


def test_bf16_padded_maxpool():
    """Darknet's -FLT_MAX padding does not fit bfloat16: its lowest value pads instead."""
    from darknet_cfg.layers.pooling import MaxPool
    x = torch.randn(1, 4, 7, 7)
    pool = MaxPool(3, 1, 1, 3)  # padding 3: uneven, so the input is padded explicitly
    np.testing.assert_array_equal(pool(x.bfloat16()).float().numpy(),
                                  pool(x.bfloat16().float()).numpy())


def test_detect_cli_flags(tmp_path, monkeypatch):
    from test_infer_cli import TINY_CFG, _image, _run
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_CFG)
    weights = tmp_path / "tiny.weights"
    darknet_cfg.save_weights(darknet_cfg.build_model(cfg), weights)
    img = _image(tmp_path / "a.png")
    r = _run("detect", cfg, weights, img, "--bf16", "--int8")
    assert r.exit_code != 0 and "choose one" in r.output
    monkeypatch.setattr(lowp, "cpu_supports", lambda p: p == "fp32")
    r = _run("detect", cfg, weights, img, "--bf16")
    assert r.exit_code == 0 and "warning: precision='bf16'" in r.output and "running float32" in r.output
    monkeypatch.setattr(lowp, "cpu_supports", lambda p: True)
    r = _run("detect", cfg, weights, img, "--int8")  # no --calib and nothing saved yet
    assert r.exit_code != 0 and "int8 needs calibration images" in r.output


def test_quantize_kernel_matches_torch(monkeypatch):
    """The C kernel (layers/_quantize.c) writes the bytes of the torch expression it replaces,
    for bfloat16 and float32, both dense layouts, odd sizes, extremes and NaN; a non-dense
    input (a channel slice) takes the compiled torch kernel."""
    from darknet_cfg.layers import quantized
    if quantized._LIB is None:
        pytest.skip("layers/_quantize.c not built here (no C compiler or no AVX2)")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((1, 3, 5, 7), (2, 64, 13, 13), (1, 32, 52, 52)):
            x = (torch.randn(shape, generator=g) * 4).to(dtype)
            x.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30,
                                           -1e30, 0.0], dtype=dtype)
            for fmt in (torch.contiguous_format, torch.channels_last):
                xs = x.contiguous(memory_format=fmt)
                inv, zp = torch.tensor(1 / 0.037), torch.tensor(71.0)
                want = quantized._quantize_eager(xs, inv, zp)
                want[0, 0, 0, 0] = 0  # NaN: the kernel writes 0 (torch leaves it unspecified)
                with torch.no_grad():
                    got = quantized.quantize(xs, inv, zp)
                assert got.stride() == xs.stride()
                assert torch.equal(got, want), (dtype, shape, fmt)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)[:, 2:6]
    calls = []
    monkeypatch.setattr(quantized._LIB, "quantize_u8", lambda *a: calls.append(a))
    with torch.no_grad():
        out = quantized.quantize(x, torch.tensor(10.0), torch.tensor(3.0))
    assert not calls and torch.equal(out, quantized._quantize_eager(x, torch.tensor(10.0),
                                                                    torch.tensor(3.0)))
