"""Pooling with Darknet's geometry: TOTAL padding p, window start at -p/2, taps outside ignored."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG = -3.4028234663852886e38  # darknet's -FLT_MAX for out-of-range taps


def _neg(x: Tensor) -> float:
    """-FLT_MAX, or the lowest value of a narrower dtype (bfloat16: lowp)."""
    return NEG if x.dtype == torch.float32 else float(torch.finfo(x.dtype).min)


class MaxPool(nn.Module):
    """[maxpool]. out = (W + padding - size)/stride + 1; left/top padding = padding/2.

    Darknet's AVX build skips some taps in the first 8 output columns of stride-1 pools (a
    bug, see the oracle README); we compute the correct max-pool, as its GPU build does.
    ``maxpool_depth``: max over channels k = g, g+out_c, ... for each output channel g."""

    def __init__(self, size: int, stride_x: int, stride_y: int, padding: int,
                 maxpool_depth: bool = False, out_channels: int = 1):
        super().__init__()
        self.size, self.stride = size, (stride_y, stride_x)
        lo = padding // 2
        self.pads = (lo, padding - lo, lo, padding - lo)  # left, right, top, bottom
        self.depth, self.out_channels = bool(maxpool_depth), out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.depth:
            n, c, h, w = x.shape
            groups = -(-c // self.out_channels)
            if groups * self.out_channels != c:
                x = F.pad(x, (0, 0, 0, 0, 0, groups * self.out_channels - c), value=_neg(x))
            return x.view(n, groups, self.out_channels, h, w).amax(1)
        if any(self.pads):
            native = self._native_padding(x.shape[-2], x.shape[-1])
            if native is not None:  # same windows without copying the input into a padded one
                pad, ceil = native
                return F.max_pool2d(x, self.size, self.stride, padding=pad, ceil_mode=ceil)
            x = F.pad(x, self.pads, value=_neg(x))
        return F.max_pool2d(x, self.size, self.stride)

    def _native_padding(self, h: int, w: int):
        """(padding, ceil_mode) for which torch's max_pool2d has darknet's windows, or None.
        Darknet pads left/top by p//2 and the rest right/bottom; torch pads both sides equally
        (and ceil_mode adds windows that run off the right/bottom edge). Every window keeps at
        least one input tap here, so torch's -inf padding equals darknet's -FLT_MAX."""
        left, right, top, bottom = self.pads
        if left != top or right != bottom:
            return None
        sy, sx = self.stride
        want = ((h + top + bottom - self.size) // sy + 1, (w + left + right - self.size) // sx + 1)
        if 2 * left > self.size:
            return None
        for ceil in (False, True):
            got = []
            for n, s in ((h, sy), (w, sx)):
                span = n + 2 * left - self.size
                o = (-(-span // s) if ceil else span // s) + 1
                if ceil and (o - 1) * s >= n + left:  # torch drops a window starting in the padding
                    o -= 1
                got.append(o)
            if tuple(got) == want:
                return left, ceil
        return None


class LocalAvgPool(nn.Module):
    """[local_avgpool]: the maxpool window, averaging only the taps inside the input."""

    def __init__(self, size: int, stride_x: int, stride_y: int, padding: int):
        super().__init__()
        self.size, self.stride = size, (stride_y, stride_x)
        lo = padding // 2
        self.pads = (lo, padding - lo, lo, padding - lo)

    def forward(self, x: Tensor) -> Tensor:
        ones = torch.ones_like(x[:1, :1])
        total = F.avg_pool2d(F.pad(x, self.pads), self.size, self.stride, divisor_override=1)
        count = F.avg_pool2d(F.pad(ones, self.pads), self.size, self.stride, divisor_override=1)
        return total / count


class GlobalAvgPool(nn.Module):
    """[avgpool]: mean over each channel's h*w values."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)
