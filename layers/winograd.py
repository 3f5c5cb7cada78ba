"""Winograd convolution for 3x3 stride-1 [convolutional] layers on the CPU.

A 3x3 convolution computed on m x m output tiles as Y = A^T [ (G g G^T) . (B^T d B) ] A
(Lavin & Gray 2015): per tile, (m+2)^2 channel-mixing products instead of 9 m^2, so F(2x2,3x3)
does 2.25x and F(4x4,3x3) 4x fewer multiply-adds than a direct convolution. Here the input and
output transforms are small GEMMs with the Kronecker matrices B^T (x) B^T and A^T (x) A^T, and
the channel mixing is one batched GEMM. Work runs in bands of tile rows so that a band's
transformed tiles stay in cache.

- Inference (``conv3x3``, via ``DarknetModel.prepack(winograd=True)``): the weights are
  transformed once, in double precision, and cached per layer.
- Training (``conv3x3_train``, via ``DarknetModel.winograd_training()``, the Trainer's CPU
  default): forward, input gradient (the same convolution with flipped, transposed filters) and
  weight gradient (a batched GEMM of transformed inputs and output gradients summed over every
  tile of the batch) by Winograd.

Accuracy against float64 (tests/test_winograd.py, bench/winograd.py), as a fraction of the output's
scale: F(2x2) 0.3-0.6e-6, less than oneDNN's direct float32 convolution (1-4e-6); F(4x4) 3-7e-6.
Darknet's parity tests pass with both; a class probability within ~1e-5 of a threshold can fall
on the other side, which is why inference keeps the direct convolution unless asked.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_BAND_BYTES = 8 << 20        # transformed input/output of one band of tile rows (fits L3)
# conv -> {tile: (weights' identity, _Plan)}: transformed weights per tile size used
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _matrices(m: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(B^T, G, A^T) of F(m x m, 3x3) in float64 (interpolation points 0, ±1 [, ±2], inf)."""
    d = torch.float64
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"Winograd tile {m} not supported (2 or 4)")
    return torch.tensor(bt, dtype=d), torch.tensor(g, dtype=d), torch.tensor(at, dtype=d)


class _Transforms:
    """The float32 Kronecker transform matrices of F(m x m, 3x3) and where the bias goes."""

    def __init__(self, m: int):
        bt, g, at = _matrices(m)
        self.a = m + 2
        self.g = g
        self.bt2 = torch.kron(bt, bt).float()        # (a^2, a^2): tile -> B^T d B
        self.at2 = torch.kron(at, at).float()        # (m^2, a^2): A^T M A -> output tile
        # A^T's column of the point 1 is all ones (1^k = 1): a bias added there reaches every
        # output of the tile once
        one = int((at == 1).all(0).nonzero()[0])
        self.bias_row = one * self.a + one


_TRANSFORMS = {m: _Transforms(m) for m in (2, 4)}


def transform_weight(weight: Tensor, m: int, dtype=torch.float64) -> Tensor:
    """G g G^T of every 3x3 filter, as (a^2, C_in, C_out) float32 (computed in ``dtype``)."""
    t = _TRANSFORMS[m]
    g = t.g.to(dtype)
    k, c = weight.shape[:2]
    u = torch.einsum("xi,kcij,yj->xykc", g, weight.to(dtype), g)
    return u.reshape(t.a * t.a, k, c).transpose(1, 2).float().contiguous()


class _Plan:
    """Transformed weights (computed once, in double precision) and bias of one layer."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], m: int):
        self.u = transform_weight(weight.detach(), m)
        self.bias = None if bias is None else bias.detach().float()


def tile_for(c_in: int, c_out: int, h: int, w: int, training: bool = False,
             batch: int = 1) -> int:
    """Winograd tile size (2 or 4) worth using for a 3x3 stride-1 convolution, or 0 (direct).

    Measured here (2 threads, bench/winograd.py) against oneDNN's direct convolution. Inference
    (batch 1, prepacked weights): the batched GEMM needs many channels to outweigh the transforms
    (thin layers, c_in*c_out/(c_in+c_out) < 64, lose at every size); F(4x4) wins from 16x16 up
    (1.2-1.6x on wide layers), F(2x2) on 13x13 maps (whose 4x4 tiles would waste 34%) with >= 512
    channels. Training (forward + both gradients, ``batch`` x h x w >= 3000 pixels): oneDNN's
    weight gradient is slow, so F(4x4) wins from 24x24 (128 channels at 28: 1.5x) and F(2x2)
    below, down to 7x7 (1.05-1.6x)."""
    hm = c_in * c_out / (c_in + c_out)
    if hm < 64:
        return 0
    if training and batch * h * w >= 3000:
        return 4 if min(h, w) >= 24 else 2 if h * w >= 36 else 0
    if hm < 85 and h * w < 48 * 48:
        return 0
    if min(h, w) >= 16:
        return 4
    return 2 if h * w >= 144 and c_in * c_out >= 512 * 512 else 0


def applies(conv) -> bool:
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1)


def forget(conv) -> None:
    _CACHE.pop(conv, None)


def _stamp(t: Optional[Tensor]):
    """Identity and version of a tensor (inference tensors have no version counter)."""
    if t is None:
        return None
    return (t.data_ptr(), 0 if t.is_inference() else t._version)


def _plan(conv, m: int) -> _Plan:
    key = (_stamp(conv.weight), _stamp(conv.bias))
    plans = _CACHE.setdefault(conv, {})
    hit = plans.get(m)
    if hit is None or hit[0] != key:
        hit = plans[m] = (key, _Plan(conv.weight, conv.bias, m))
    return hit[1]


def conv3x3(conv, x: Tensor, m: int, leaky: bool = False) -> Tensor:
    """``conv(x)`` (then leaky ReLU 0.1 when ``leaky``) by Winograd F(m x m, 3x3) with the
    layer's cached transformed weights; x is NCHW float32 on the CPU, best channels_last.
    Returns a channels_last tensor."""
    p = _plan(conv, m)
    return _forward(x, p.u, p.bias, m, leaky)


def _padded_nhwc(x: Tensor, m: int) -> Tuple[Tensor, int, int]:
    """(x as NHWC with zero padding 1 on top/left and enough on bottom/right for whole tiles,
    tile rows, tile columns). One copy: only the border is zeroed (F.pad fills everything)."""
    n, c, h, w = x.shape
    th, tw = -(-h // m), -(-w // m)
    xp = x.new_empty((n, m * th + 2, m * tw + 2, c))
    xp[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    xp[:, 0].zero_()
    xp[:, h + 1:].zero_()
    xp[:, 1:h + 1, 0].zero_()
    xp[:, 1:h + 1, w + 1:].zero_()
    return xp, th, tw


def _bands(n: int, th: int, tw: int, a: int, widest: int):
    """Ranges of tile rows whose transformed tiles fit ``_BAND_BYTES``."""
    rows = max(1, min(th, _BAND_BYTES // (a * a * 4 * n * tw * widest)))
    return [(r0, min(th, r0 + rows)) for r0 in range(0, th, rows)]


def _input_tiles(xp: Tensor, m: int, r0: int, r1: int) -> Tensor:
    """B^T d B of the tiles in tile rows [r0, r1): (a^2, tiles, C)."""
    t = _TRANSFORMS[m]
    a, c = t.a, xp.shape[3]
    tiles = xp[:, m * r0:m * r1 + 2].unfold(1, a, m).unfold(2, a, m)   # n, rows, tw, c, a, a
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(a * a, -1)
    return torch.mm(t.bt2, d).view(a * a, -1, c)


def _forward(x: Tensor, u: Tensor, bias: Optional[Tensor], m: int, leaky: bool) -> Tensor:
    t = _TRANSFORMS[m]
    a = t.a
    n, c, h, w = x.shape
    k = u.shape[2]
    xp, th, tw = _padded_nhwc(x, m)
    out = torch.empty((n, h, w, k), dtype=x.dtype)
    for r0, r1 in _bands(n, th, tw, a, max(c, k)):
        prod = torch.bmm(_input_tiles(xp, m, r0, r1), u)                # (a^2, tiles, K)
        if bias is not None:
            prod[t.bias_row].add_(bias)
        y = torch.mm(t.at2, prod.view(a * a, -1)).view(m, m, n, r1 - r0, tw, k)  # A^T . A
        for i in range(m):               # scatter tile row/column offsets into the output
            ni = -(-(min(h, m * r1) - m * r0 - i) // m)
            if ni <= 0:
                continue
            for j in range(m):
                nj = -(-(w - j) // m)
                dst = out[:, m * r0 + i:m * r0 + i + m * ni:m, j::m]
                src = y[i, j, :, :ni, :nj]
                if leaky:
                    torch._C._nn.leaky_relu(src, 0.1, out=dst)
                else:
                    dst.copy_(src)
    return out.permute(0, 3, 1, 2)


def _weight_grad(x: Tensor, dy: Tensor, m: int) -> Tensor:
    """d loss / d weight (K, C, 3, 3) of a 3x3 stride-1 pad-1 convolution by Winograd: per tile
    position, dU = V^T . (A dY A^T) summed over tiles (one batched GEMM over all images), then
    G^T dU G."""
    t = _TRANSFORMS[m]
    a = t.a
    n, c, h, w = x.shape
    k = dy.shape[1]
    xp, th, tw = _padded_nhwc(x, m)
    # dY as whole m x m tiles (zero beyond the map): (n, th, m, tw, m, K)
    dyp = F.pad(dy.permute(0, 2, 3, 1), (0, 0, 0, m * tw - w, 0, m * th - h))
    dyt = dyp.view(n, th, m, tw, m, k)
    du = torch.zeros(a * a, c, k, dtype=x.dtype)
    for r0, r1 in _bands(n, th, tw, a, max(c, k)):
        v = _input_tiles(xp, m, r0, r1)                                        # (a^2, P, C)
        g = dyt[:, r0:r1].permute(2, 4, 0, 1, 3, 5).reshape(m * m, -1)          # (m^2, P*K)
        dm = torch.mm(t.at2.t(), g).view(a * a, -1, k)                          # (a^2, P, K)
        du.baddbmm_(v.transpose(1, 2), dm)
    gm = t.g.float()
    dw = torch.einsum("xi,xyck,yj->kcij", gm, du.view(a, a, c, k), gm)
    return dw


class _Conv3x3Winograd(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) with forward, input gradient (the same convolution
    with the filters flipped and transposed) and weight gradient all by Winograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, m):
        ctx.save_for_backward(x, weight)
        ctx.m, ctx.has_bias = m, bias is not None
        u = transform_weight(weight, m, dtype=torch.float32)
        return _forward(x, u, bias, m, False)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        m = ctx.m
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            u = transform_weight(weight.flip(2, 3).transpose(0, 1), m, dtype=torch.float32)
            dx = _forward(dy, u, None, m, False)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x, dy, m)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


def conv3x3_train(x: Tensor, weight: Tensor, bias: Optional[Tensor], m: int) -> Tensor:
    """A differentiable 3x3 stride-1 pad-1 convolution by Winograd F(m x m, 3x3) (training)."""
    return _Conv3x3Winograd.apply(x, weight, bias, m)
