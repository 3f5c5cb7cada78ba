"""Winograd convolution for 3x3 stride-1 [convolutional] layers on the CPU.

A 3x3 convolution computed on m x m output tiles as Y = A^T [ (G g G^T) . (B^T d B) ] A
(Lavin & Gray 2015): per tile, (m+2)^2 channel-mixing products instead of 9 m^2, so F(2x2,3x3)
does 2.25x and F(4x4,3x3) 4x fewer multiply-adds than a direct convolution. The channel mixing
is one batched GEMM (torch.bmm) per band of tile rows. The input and output transforms run in
C (layers/_winograd.c, AVX2, built by setup.py: one pass over memory each, zero padding,
bias and leaky ReLU fused) and otherwise as GEMMs with the Kronecker matrices B^T (x) B^T and
A^T (x) A^T (slower: only wide layers gain then).

- Inference (``conv3x3``, via ``DarknetModel.prepack(winograd=2|4)``, ``Detector(winograd=...)``,
  ``detect --winograd``; opt-in): the weights are transformed once, in double precision, and
  cached per layer.
- Training (``conv3x3_train``, via ``DarknetModel.winograd_training()``, the Trainer's CPU
  default): forward, input gradient (the same convolution with flipped, transposed filters) and
  weight gradient (a batched GEMM of transformed inputs and output gradients summed over every
  tile of the batch) by Winograd.

Accuracy against float64 (tests/test_winograd.py, bench/winograd.py), as a fraction of the output's
scale: F(2x2) 0.3-0.6e-6, less than oneDNN's direct float32 convolution (1-4e-6); F(4x4) 2-7e-6.
Outputs stay within the oracle tolerance, but inference keeps Darknet's direct convolutions by
default because the rounding differs from Darknet's: a class probability within ~1e-5 of a
threshold can fall on the other side (yolov4-csp's oracle has one 4.6e-6 under it, flipped by
F(4x4)), and with F(2x2) a box centre near the edge of yolov4-csp-swish's image lies 3.1e-6 from
Darknet's, more than the parity tests allow there (1.8e-6), although a float64 forward lies
2.2e-6 from it too: F(2x2) is closer to exact arithmetic, the direct path closer to Darknet's
own float32 rounding (1.4e-6).
"""
from __future__ import annotations

import ctypes
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._native import load

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


def _load_kernels():
    """The compiled transforms (layers/_winograd.c, built by setup.py when a C compiler is
    there), or None: not built, or a CPU without AVX2/FMA."""
    lib = load("_winograd")
    if lib is not None:
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.wino_input.argtypes = [p, ctypes.c_long, i, i, i, i, i, i, i, i, p, i]
        lib.wino_input.restype = lib.wino_grad_tiles.restype = i
        lib.wino_output.argtypes = [p, i, i, i, i, i, i, i, i, p, ctypes.c_float, i, p, i]
        lib.wino_grad_tiles.argtypes = [p, ctypes.c_long, i, i, i, i, i, i, i, i, p, i]
    return lib


_LIB = _load_kernels()   # tests set this to None to check the torch fallback


def _compiled(c: int, k: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled transforms take this convolution (float32, 8-channel vectors)."""
    return _LIB is not None and c % 8 == 0 and k % 8 == 0 and dtype == torch.float32


def transform_weight(weight: Tensor, m: int, dtype=torch.float64) -> Tensor:
    """G g G^T of every 3x3 filter, as (a^2, C_in, C_out) float32 (computed in ``dtype``): one
    GEMM with the Kronecker matrix G (x) G, in chunks of columns that stay in cache."""
    t = _TRANSFORMS[m]
    gg = torch.kron(t.g, t.g).to(dtype)                                  # (a^2, 9)
    k, c = weight.shape[:2]
    w = weight.detach().permute(2, 3, 1, 0).reshape(9, c * k)           # (3x3, C_in*C_out)
    out = torch.empty(t.a * t.a, c * k, dtype=torch.float32)
    step = 1 << 14
    for s in range(0, c * k, step):
        out[:, s:s + step] = gg @ w[:, s:s + step].to(dtype)
    return out.view(t.a * t.a, c, k)


class _Plan:
    """Transformed weights (computed once, in double precision) and bias of one layer."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], m: int):
        self.u = transform_weight(weight.detach(), m)
        self.bias = None if bias is None else bias.detach().float()


def tile_for(c_in: int, c_out: int, h: int, w: int, training: bool = False,
             batch: int = 1, largest: int = 4) -> int:
    """Winograd tile size (2 or 4, at most ``largest``) worth using for a 3x3 stride-1
    convolution, or 0 (direct).

    Measured here (2 threads, bench/winograd.py) against oneDNN's prepacked direct convolution.
    ``hm`` = c_in*c_out/(c_in+c_out) measures how much channel mixing the batched GEMM gets.

    - Inference with the compiled transforms (channels multiples of 8): F(4x4) from 16x16 maps
      on hm >= 16 (1.2-2.6x; thin layers too, 32 channels at 104: 1.6x); F(2x2) on smaller maps
      with hm >= 128 and >= 10x10 (1.1-1.5x; 4x4 tiles would waste 34% of a 13x13 map).
      With ``largest=2``: F(2x2) where it wins (1.3-1.9x on hm >= 32 from 48x48, on hm >= 64
      from 20x20).
    - Inference with the torch transforms: they cost more, so only wide layers pay: F(4x4) from
      16x16 (1.2-1.6x), F(2x2) on 13x13 maps with >= 512 channels.
    - Training (forward + both gradients, ``batch`` x h x w >= 3000 pixels; oneDNN's weight
      gradient is slow): with the compiled transforms F(4x4) wins everywhere from hm >= 16 and
      6x6 maps (``bench/winograd.py --train``, batch 64: 1.1x for 32 channels at 56, 1.6-2.6x
      from 64 channels, 1.6-1.9x at 7x7; batch 16: 1.2-1.4x, but 32 channels at 14: 0.93x,
      hence >= 8000 pixels for hm < 32); with the torch transforms F(4x4) from 24x24 (128
      channels at 28: 1.5x) and F(2x2) below, down to 7x7 (1.05-1.6x), on hm >= 64."""
    hm = c_in * c_out / (c_in + c_out)
    compiled = _compiled(c_in, c_out)
    if training and compiled:
        px = batch * h * w
        m = 4 if hm >= 16 and px >= 3000 and min(h, w) >= 6 and (hm >= 32 or px >= 8000) else 0
    elif training:
        if hm < 64 or batch * h * w < 3000:
            return 0
        m = 4 if min(h, w) >= 24 else 2 if h * w >= 36 else 0
    elif compiled:
        if largest >= 4 and hm >= 16 and min(h, w) >= 16:
            m = 4
        elif largest >= 4:
            m = 2 if hm >= 128 and h * w >= 100 else 0
        else:
            m = 2 if (hm >= 32 and h * w >= 48 * 48) or (hm >= 64 and h * w >= 400) or \
                (hm >= 128 and h * w >= 100) else 0
    else:
        if hm < 64 or (hm < 85 and h * w < 48 * 48):
            return 0
        m = 4 if min(h, w) >= 16 else \
            2 if h * w >= 144 and c_in * c_out >= 512 * 512 else 0
    return m if m <= largest else 0


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


def _nhwc_view(x: Tensor) -> Tensor:
    """x (NCHW) whose memory is NHWC with channels contiguous and any pixel stride >= C (e.g. a
    [route] group's channel slice of a channels_last tensor: no copy); else a channels_last
    copy."""
    n, c, h, w = x.shape
    s = x.stride()
    if s[1] == 1 and s[3] >= c and s[2] == w * s[3] and (n == 1 or s[0] == h * s[2]):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _input_tiles(x: Tensor, m: int, k: int
                 ) -> Tuple[Callable[[int, int], Tensor], int, int, bool]:
    """(band -> B^T d B of the tiles in tile rows [r0, r1) as (a^2, tiles, C), tile rows, tile
    columns, whether the compiled transforms run) for NCHW x and K output channels; tiles are
    ordered (image, tile row, tile column)."""
    t = _TRANSFORMS[m]
    a = t.a
    n, c, h, w = x.shape
    compiled = _compiled(c, k, x.dtype)
    if compiled:
        th, tw = -(-h // m), -(-w // m)
        xc = _nhwc_view(x)
        ldx = xc.stride(3)
        threads = torch.get_num_threads()

        def band(r0: int, r1: int) -> Tensor:
            v = x.new_empty((a * a, n * (r1 - r0) * tw, c))
            if _LIB.wino_input(xc.data_ptr(), ldx, n, h, w, c, m, r0, r1, tw, v.data_ptr(),
                               threads):
                raise MemoryError("Winograd input transform: out of memory")
            return v
        return band, th, tw, True
    xp, th, tw = _padded_nhwc(x, m)

    def band(r0: int, r1: int) -> Tensor:
        tiles = xp[:, m * r0:m * r1 + 2].unfold(1, a, m).unfold(2, a, m)  # n, rows, tw, c, a, a
        d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(a * a, -1)
        return torch.mm(t.bt2, d).view(a * a, -1, c)
    return band, th, tw, False


def _forward(x: Tensor, u: Tensor, bias: Optional[Tensor], m: int, leaky: bool) -> Tensor:
    t = _TRANSFORMS[m]
    a = t.a
    n, c, h, w = x.shape
    k = u.shape[2]
    tiles, th, tw, compiled = _input_tiles(x, m, k)
    out = torch.empty((n, h, w, k), dtype=x.dtype)
    if compiled and bias is not None:
        bias = bias.detach().float().contiguous()
    for r0, r1 in _bands(n, th, tw, a, max(c, k)):
        prod = torch.bmm(tiles(r0, r1), u)                              # (a^2, tiles, K)
        if compiled:   # A^T . A, bias and leaky ReLU straight into the output
            _LIB.wino_output(prod.data_ptr(), n, h, w, k, m, r0, r1, tw,
                             None if bias is None else bias.data_ptr(), 0.1, int(leaky),
                             out.data_ptr(), torch.get_num_threads())
            continue
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
    tiles, th, tw, compiled = _input_tiles(x, m, k)
    if compiled:
        dyc = _nhwc_view(dy)
        threads = torch.get_num_threads()
    else:   # dY as whole m x m tiles (zero beyond the map): (n, th, m, tw, m, K)
        dyp = F.pad(dy.permute(0, 2, 3, 1), (0, 0, 0, m * tw - w, 0, m * th - h))
        dyt = dyp.view(n, th, m, tw, m, k)
    du = torch.zeros(a * a, c, k, dtype=x.dtype)
    for r0, r1 in _bands(n, th, tw, a, max(c, k)):
        if compiled:
            dm = x.new_empty((a * a, n * (r1 - r0) * tw, k))                  # A dY A^T
            if _LIB.wino_grad_tiles(dyc.data_ptr(), dyc.stride(3), n, h, w, k, m, r0, r1, tw,
                                    dm.data_ptr(), threads):
                raise MemoryError("Winograd gradient transform: out of memory")
        else:
            g = dyt[:, r0:r1].permute(2, 4, 0, 1, 3, 5).reshape(m * m, -1)      # (m^2, P*K)
            dm = torch.mm(t.at2.t(), g).view(a * a, -1, k)                      # (a^2, P, K)
        du.baddbmm_(tiles(r0, r1).transpose(1, 2), dm)
    gg = torch.kron(t.g, t.g).to(x.dtype)                              # G^T dU G
    return (gg.t() @ du.view(a * a, c * k)).view(3, 3, c, k).permute(3, 2, 0, 1).contiguous()


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
