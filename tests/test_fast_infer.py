"""Inference speed options keep Darknet's numbers: one-exp mish, compiled activations,
channels_last through fuse()."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import UPSTREAM_CFG, needs_shared

import darknet_cfg
from darknet_cfg.layers.activations import _mish_one_exp, _mish_one_exp_, compiled_activation


def test_one_exp_mish_matches_darknet_mish():
    x = torch.cat([torch.linspace(-120, 120, 200_001),
                   torch.tensor([-1e30, -88.0, -20.0, -1e-30, 0.0, 1e-30, 19.999, 20.0, 20.001,
                                 1e30, float("inf"), float("-inf")])])
    want = F.mish(x.double()).float()  # darknet: x * tanh(softplus(x)), softplus(x > 20) = x
    got = _mish_one_exp(x)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs() / want[fin].abs().clamp(min=1e-30)
    assert float(err.max()) <= 1e-6


def test_inplace_one_exp_mish_equals_formula():
    x = torch.cat([torch.linspace(-120, 120, 20_001),
                   torch.tensor([-1e30, -88.0, 19.999, 20.0, 20.001, 1e30, float("inf")])])
    want = _mish_one_exp(x)
    y = x.clone()
    got = _mish_one_exp_(y)
    assert got.data_ptr() == y.data_ptr()  # in place: no output buffer
    torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)
    xc = (torch.randn(1, 16, 9, 9) * 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_mish_one_exp_(xc.clone()), _mish_one_exp(xc), rtol=2e-7, atol=1e-7)


def test_conv_mish_inplace_only_without_grad():
    """ConvBnAct runs the in-place mish on its own conv output in no-grad inference only;
    with gradients it is torch's mish and autograd works."""
    from darknet_cfg.layers.conv import ConvBnAct
    torch.manual_seed(0)
    m = ConvBnAct(4, 6, 3, (1, 1), 1, activation="mish").eval()
    x = torch.randn(2, 4, 9, 9) * 3
    ref = F.mish(F.conv2d(x, m.conv.weight, m.conv.bias, padding=1).double()).float()
    with torch.no_grad():
        x0 = x.clone()
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(x, x0)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_compiled_mish_equals_eager_formula():
    x = torch.randn(2, 8, 13, 17) * 6
    fn = compiled_activation("mish")
    torch.testing.assert_close(fn(x), _mish_one_exp(x), rtol=2e-7, atol=1e-7)
    xc = torch.randn(1, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fn(xc), _mish_one_exp(xc), rtol=2e-7, atol=1e-7)


@needs_shared
def test_compile_activations_inference_only_and_fuse_keeps_channels_last():
    model = darknet_cfg.build_model(UPSTREAM_CFG / "yolov4-csp.cfg", 64, 64).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    model.to(memory_format=torch.channels_last).fuse().compile_activations()
    conv = model.layers[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # with gradients the eager torch op runs (compiled kernels are inference-only)
    model.train()
    heads = model(x.requires_grad_())
    sum(h.sum() for h in heads).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_prepacked_conv_equals_conv2d_and_follows_weight_changes():
    """model.prepack(): oneDNN with packed weights and the activation fused == the plain path;
    a batch size or weights change repacks; deepcopy works; gradients use the plain path."""
    import copy
    from darknet_cfg.layers.conv import ConvBnAct
    torch.manual_seed(0)
    layers = [ConvBnAct(8, 16, 3, (1, 1), 1, activation=a) for a in
              ("leaky", "linear", "logistic", "swish", "mish", "relu")]
    layers.append(ConvBnAct(8, 16, 3, (2, 2), 1, groups=2, dilation=1, activation="leaky"))
    for m in layers:
        m.eval()
        with torch.no_grad():
            m.conv.bias.uniform_(-1, 1)
        for shape in ((1, 8, 13, 11), (3, 8, 13, 11)):
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                m.prepacked = False
                ref = m(x)
                m.prepacked = True
                got = m(x)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            m.conv.weight.mul_(-0.5)
            m.prepacked = False
            ref = m(x)
            m.prepacked = True
            torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        copy.deepcopy(m)
        y = m(x.requires_grad_())  # grad mode: the autograd path
        assert y.grad_fn is not None


@needs_shared
def test_detector_defaults_on_cpu():
    from darknet_cfg.infer import Detector
    model = darknet_cfg.build_model(UPSTREAM_CFG / "yolov4-tiny.cfg", 96, 96).fuse()
    det = Detector(model)
    assert det.memory_format == torch.channels_last
    assert all(m.prepacked for m in model.modules() if hasattr(m, "prepacked"))
    plain = Detector(darknet_cfg.build_model(UPSTREAM_CFG / "yolov4-tiny.cfg", 96, 96).fuse(),
                     channels_last=False, prepack=False)
    plain.model.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 96, 96).numpy()
    for a, b in zip(det.forward(x), plain.forward(x)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
