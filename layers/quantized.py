"""int8 [convolutional] for opt-in CPU inference (``Detector(precision="int8")``, lowp.py).

Not Darknet's arithmetic: the input is quantized to uint8 with one calibrated range per layer
(asymmetric, 0 included), the folded weights to int8 per output channel (symmetric, max |w| ->
127), and oneDNN's VNNI convolution (``torch.ops.onednn.qconv2d_pointwise``, weights prepacked
once) accumulates in int32 and writes bfloat16 (float32 on a CPU without bfloat16) with the
bias added. Activations oneDNN cannot fuse into a quantized convolution run after it (mish
compiled, leaky in place).
"""
from __future__ import annotations

import ctypes
from typing import Callable, Dict

import torch
from torch import Tensor, nn

from ._native import load
from .activations import eager_inference

# Darknet activation -> oneDNN post-op of the int8 convolution (it has no leaky_relu or mish)
FUSED: Dict[str, str] = {"linear": "none", "relu": "relu", "swish": "swish"}
_KERNELS: Dict[str, Callable] = {}


def available() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    return torch.backends.mkldnn.is_available() and ops is not None \
        and hasattr(ops, "qconv_prepack") and hasattr(ops, "qconv2d_pointwise")


def _quantize_eager(x: Tensor, inv_scale: Tensor, zero_point: Tensor) -> Tensor:
    return (x.float() * inv_scale).round_().add_(zero_point).clamp_(0, 255).to(torch.uint8)


def _kernel(name: str, fn: Callable) -> Callable:
    """``fn`` compiled (dynamic shapes, one fused loop), or eager where compiling fails."""
    if name not in _KERNELS:
        compiled = torch.compile(fn, dynamic=True)

        def run(*args):
            if _KERNELS[name] is not run:
                return _KERNELS[name](*args)
            try:
                return compiled(*args)
            except Exception:  # noqa: BLE001 (no C++ compiler ...): same numbers, slower
                _KERNELS[name] = fn
                return fn(*args)
        _KERNELS[name] = run
    return _KERNELS[name]


def _load_quantize():
    lib = load("_quantize")
    if lib is not None:
        lib.quantize_u8.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float,
                                    ctypes.c_float, ctypes.c_void_p]
        lib.quantize_u8.restype = None
    return lib


_LIB = _load_quantize()  # tests set this to None to check the torch kernel


def quantize(x: Tensor, inv_scale: Tensor, zero_point: Tensor) -> Tensor:
    """uint8 of ``round(x / scale) + zero_point`` clamped to [0, 255], in one pass: the C kernel
    (layers/_quantize.c) for a dense CPU tensor, else a compiled torch kernel (same bytes; the
    compiled call alone costs ~50 us, a third of the tiny model's quantizing)."""
    if not eager_inference():
        return _quantize_eager(x, inv_scale, zero_point)
    if _LIB is not None and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) \
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        q = torch.empty_like(x, dtype=torch.uint8)  # same dense layout
        _LIB.quantize_u8(x.data_ptr(), int(x.dtype == torch.bfloat16), x.numel(),
                         float(inv_scale), float(zero_point), q.data_ptr())
        return q
    return _kernel("quantize", _quantize_eager)(x, inv_scale, zero_point)


def quantize_weight(w: Tensor):
    """(int8 weights, float32 per-output-channel scales): symmetric, max |w| of a filter -> 127."""
    w = w.detach().float()
    scale = (w.abs().flatten(1).amax(1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale.view(-1, 1, 1, 1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def input_qparams(lo: float, hi: float):
    """(scale, zero point) of the uint8 grid over [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(min(max(round(-lo / scale), 0), 255))


class QuantizedConv(nn.Module):
    """A fused ``ConvBnAct`` run in int8; ``layer`` stays attached (its float weights are what
    ``.weights`` I/O, ``fuse`` and ``prepack`` see) and runs where the int8 kernel does not apply
    (grad mode, compiling, export)."""

    def __init__(self, layer: nn.Module, lo: float, hi: float,
                 out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        conv = layer.source.conv
        if conv.bias is None or layer.source.bn is not None:
            raise ValueError("QuantizedConv needs a fused convolution (model.fuse())")
        self.layer = layer
        self.lo, self.hi = float(lo), float(hi)
        self.scale, self.zero_point = input_qparams(lo, hi)
        self.register_buffer("_inv", torch.tensor(1.0 / self.scale), persistent=False)
        self.register_buffer("_zp", torch.tensor(float(self.zero_point)), persistent=False)
        qw, self.w_scale = quantize_weight(conv.weight)
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        stride, pad, dil, groups = self.geometry
        # packed once, kept outside state_dict (an opaque oneDNN tensor)
        self._packed = torch.ops.onednn.qconv_prepack(qw, self.w_scale, self.scale,
                                                      self.zero_point, stride, pad, dil, groups,
                                                      None)
        self._w_zp = torch.zeros(len(self.w_scale), dtype=torch.int32)
        self._bias = conv.bias.detach().float().clone()
        self.act = layer.act
        self.out_dtype = out_dtype
        self.attr = FUSED.get(self.act.name)

    def forward(self, x: Tensor) -> Tensor:
        if not eager_inference() or x.device.type != "cpu":
            return self.layer(x)
        stride, pad, dil, groups = self.geometry
        q = quantize(x, self._inv, self._zp)
        y = torch.ops.onednn.qconv2d_pointwise(
            q, self.scale, self.zero_point, self._packed, self.w_scale, self._w_zp, self._bias,
            stride, pad, dil, groups, 1.0, 0, self.out_dtype, self.attr or "none", [], "")
        if self.attr is not None:
            return y
        if self.act.name == "leaky":  # torch's own kernel: 2x faster than a compiled one here
            return torch.nn.functional.leaky_relu_(y, 0.1)
        return self.act(y)  # mish: compiled when the model's activations are (lowp.to_bf16)

    def extra_repr(self) -> str:
        return f"input range [{self.lo:.4g}, {self.hi:.4g}], uint8 x int8 -> {self.out_dtype}"
