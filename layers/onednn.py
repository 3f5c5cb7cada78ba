"""CPU inference fast path for [convolutional]: oneDNN convolution with the weights reordered
("prepacked") once into oneDNN's blocked layout and the activation fused into the same kernel.

PyTorch's eager ``conv2d`` reorders the weights on every call (for yolov4 ~250 MB per forward);
OpenCV DNN and onnxruntime pack them once. Same arithmetic otherwise (measured: identical to
1e-7). Uses PyTorch's ``torch.ops.mkldnn`` operators (what ``torch.compile`` emits for frozen
CPU convolutions); a one-time self-check against ``F.conv2d`` disables the path, with a
warning, on a PyTorch build where they are missing or disagree.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# darknet activation -> oneDNN post-op (same formulas); others run after the convolution
FUSED_ACTIVATIONS: Dict[str, Tuple[str, list]] = {
    "linear": ("none", []), "leaky": ("leaky_relu", [0.1]), "relu": ("relu", []),
    "logistic": ("sigmoid", []), "swish": ("swish", []), "tanh": ("tanh", []),
}
_DTYPES = (torch.float32, torch.bfloat16)  # bfloat16: lowp.to_bf16 (opt-in, not Darknet's numbers)
_MAX_SHAPES = 4          # packed weights kept per layer (one per input shape seen)
_state: Dict[str, Optional[bool]] = {"ok": None}
# packed weights per conv module, outside the module (mkldnn tensors neither pickle nor deepcopy)
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_reorder_convolution_weight"))


def _geometry(conv) -> Tuple[list, list, list, int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _run(x: Tensor, conv, packed: Tensor, act: str) -> Tensor:
    attr, scalars = FUSED_ACTIVATIONS.get(act, ("none", []))
    pad, stride, dil, groups = _geometry(conv)
    return torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, pad, stride, dil, groups,
                                                   attr, scalars, "")


def forget(conv) -> None:
    _CACHE.pop(conv, None)


def packed_conv(conv, act: str, x: Tensor) -> Optional[Tensor]:
    """conv (+ the activation when oneDNN can fuse it) of ``x``, or None where the fast path
    does not apply (then the caller runs the plain modules). Packed weights are cached per
    module, input shape and weight version (reloaded weights are packed again)."""
    if _state["ok"] is False or conv.weight.dtype != x.dtype or x.dtype not in _DTYPES:
        return None
    key = (tuple(x.shape), conv.weight._version, conv.weight.data_ptr())
    cache = _CACHE.setdefault(conv, {})
    packed = cache.get(key)
    try:
        if packed is None:
            if len(cache) >= _MAX_SHAPES or any(k[1:] != key[1:] for k in cache):
                cache.clear()  # too many shapes, or the weights changed: drop stale packs
            pad, stride, dil, groups = _geometry(conv)
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                conv.weight.detach(), pad, stride, dil, groups, list(x.shape))
            cache[key] = packed
        y = _run(x, conv, packed, act)
    except Exception as exc:  # noqa: BLE001 (missing operator, unsupported geometry ...)
        return _disable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    attr = FUSED_ACTIVATIONS.get(act, ("none", []))[0]
    if _state["ok"] is None and attr in ("none", "leaky_relu") and x.dtype == torch.float32:
        # first checkable use in this process: compare with the reference path once
        ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                       conv.groups)
        ref = F.leaky_relu(ref, 0.1) if attr == "leaky_relu" else ref
        if not torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
            return _disable(f"results differ from F.conv2d by {float((y - ref).abs().max()):.2e}")
        _state["ok"] = True
    return y


def _disable(why: str) -> None:
    """Turn the fast path off for this process (one warning)."""
    _state["ok"] = False
    warnings.warn(f"oneDNN prepacked convolution disabled ({why}); using torch's conv2d")
    return None
