"""Darknet's activation functions (activations.h/.c), float32, as a name -> function table."""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _hard_mish(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.where(x > -2, x * x * 0.5 + x, torch.zeros_like(x)))


def _mish(x: Tensor) -> Tensor:
    # darknet: x * tanh(softplus(x)) with softplus threshold 20 (x > 20 -> x), as torch's mish
    return F.mish(x)


def _mish_clamp(x: Tensor) -> float:
    """Largest exponent the one-exp mish takes: 20 (Darknet's softplus threshold), or 5 in
    float16, where e^(2x) overflows past x = 5.5 (inf/inf would be NaN); there n / (n + 2)
    already rounds to 1 in float16, so the result is still x * 1."""
    return 5.0 if x.dtype == torch.float16 else 20.0


def _mish_one_exp(x: Tensor) -> Tensor:
    """mish with one exp: tanh(log(1 + e)) = n / (n + 2), n = e * (e + 2), e = exp(x).
    Within 1e-6 relative of darknet's; 4-5x faster once compiled (one fused loop)."""
    e = torch.exp(torch.clamp(x, max=_mish_clamp(x)))
    n = e * (e + 2)
    return torch.where(x > 20, x, x * (n / (n + 2)))  # darknet's softplus threshold: x > 20 -> x


def _mish_one_exp_(x: Tensor) -> Tensor:
    """``_mish_one_exp`` computed in place on ``x`` (a temporary the caller owns), in eager
    PyTorch: 7 vectorised passes and 2 buffers, 2x faster than torch's mish (one exp instead of
    exp + log1p + tanh). x > 20: e is clamped, n / (n + 2) rounds to 1, so the result is x."""
    e = torch.clamp(x, max=_mish_clamp(x)).exp_()
    n = e.add(2).mul_(e)
    torch.add(n, 2, out=e)
    return x.mul_(n.div_(e))


def eager_inference() -> bool:
    """True in a plain no-grad forward: where the inference-only fast paths (compiled
    activations, prepacked convolutions) may run; never while training, compiling or exporting."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
        and not torch.jit.is_tracing()


_KERNELS: Dict[str, Callable[[Tensor], Tensor]] = {}   # name -> compiled fn (or eager fallback)
_RUNNERS: Dict[str, Callable[[Tensor], Tensor]] = {}


def compiled_activation(name: str) -> Callable[[Tensor], Tensor]:
    """An inference-only compiled kernel for ``name`` (torch.compile, dynamic shapes; the first
    call compiles for a few seconds, later processes reuse inductor's disk cache). Falls back
    to the eager function, with one warning, where compiling fails (e.g. no C++ compiler)."""
    if name not in _RUNNERS:
        _KERNELS[name] = torch.compile({"mish": _mish_one_exp}.get(name, ACTIVATIONS[name]),
                                       dynamic=True)

        def run(x: Tensor) -> Tensor:
            fn = _KERNELS[name]
            try:
                return fn(x)
            except Exception as exc:  # noqa: BLE001 (inductor raises many kinds)
                if fn is ACTIVATIONS[name]:
                    raise
                import warnings
                first = str(exc).splitlines()[0] if str(exc) else ""
                warnings.warn(f"torch.compile of activation {name!r} failed "
                              f"({type(exc).__name__}: {first}); using eager")
                _KERNELS[name] = ACTIVATIONS[name]
                return ACTIVATIONS[name](x)

        _RUNNERS[name] = run
    return _RUNNERS[name]


COMPILABLE = {"mish"}  # where a compiled kernel is measurably faster than torch's own op
# in-place eager kernels for inference on temporaries (conv outputs): faster than torch's op
INPLACE: Dict[str, Callable[[Tensor], Tensor]] = {"mish": _mish_one_exp_}


def _selu(x: Tensor) -> Tensor:
    # darknet's rounded constants, not torch's exact ones
    return torch.where(x >= 0, 1.0507 * x, 1.0507 * 1.6732 * (torch.exp(x) - 1))


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(0.797885 * x + 0.035677 * x * x * x))


def _plse(x: Tensor) -> Tensor:
    return torch.where(x < -4, 0.01 * (x + 4), torch.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5))


def _lhtan(x: Tensor) -> Tensor:
    return torch.where(x < 0, 0.001 * x, torch.where(x > 1, 0.001 * (x - 1) + 1, x))


def _stair(x: Tensor) -> Tensor:
    n = torch.floor(x)
    odd = torch.remainder(n, 2) != 0
    return torch.where(odd, (x - n) + torch.floor(x / 2), torch.floor(x / 2))


def _normalize_channels(x: Tensor) -> Tensor:
    """Per pixel: positive values divided by (0.0001 + their sum over channels); others 0."""
    pos = torch.clamp(x, min=0)
    return pos / (0.0001 + pos.sum(dim=1, keepdim=True))


def _normalize_channels_softmax(x: Tensor, use_max: bool = False) -> Tensor:
    """Per pixel: exp(x - m) / (0.0001 + sum over channels), m = 0 or the channel max."""
    m = x.amax(dim=1, keepdim=True) if use_max else 0.0
    e = torch.exp(x - m)
    return e / (0.0001 + e.sum(dim=1, keepdim=True))


ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda x: x,
    "logistic": torch.sigmoid,
    "loggy": lambda x: 2 * torch.sigmoid(x) - 1,
    "relu": F.relu,
    "relu6": lambda x: torch.clamp(x, 0, 6),
    "elu": F.elu,
    "selu": _selu,
    "gelu": _gelu,
    "relie": lambda x: torch.where(x > 0, x, 0.01 * x),
    "plse": _plse,
    "hardtan": lambda x: torch.clamp(x, -1, 1),
    "lhtan": _lhtan,
    "ramp": lambda x: x * (x > 0) + 0.1 * x,
    "leaky": lambda x: F.leaky_relu(x, 0.1),
    "revleaky": lambda x: F.leaky_relu(x, 0.1),  # darknet maps revleaky to leaky's forward
    "tanh": torch.tanh,
    "stair": _stair,
    "swish": F.silu,
    "mish": _mish,
    "hard_mish": _hard_mish,
    "normalize_channels": _normalize_channels,
    "normalize_channels_softmax": _normalize_channels_softmax,
    "normalize_channels_softmax_maxval": lambda x: _normalize_channels_softmax(x, True),
}


class Activation(nn.Module):
    """A Darknet activation by name (``leaky``, ``mish``, ...)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}")
        self.name = name
        self.fn = ACTIVATIONS[name]
        self.compiled = False  # set by DarknetModel.compile_activations (inference only)

    def forward(self, x: Tensor) -> Tensor:
        if self.compiled and eager_inference():
            return compiled_activation(self.name)(x)
        return self.fn(x)

    def forward_owned(self, x: Tensor) -> Tensor:
        """``forward`` for a temporary the caller owns (a conv output): in a no-grad forward,
        an in-place kernel may overwrite it (mish: one-exp, 2x faster than torch's)."""
        fn = INPLACE.get(self.name)
        if fn is not None and not self.compiled and x.dtype == torch.float32 and eager_inference():
            return fn(x)
        return self.forward(x)

    def extra_repr(self) -> str:
        return self.name
