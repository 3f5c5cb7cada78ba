"""Pooling with Darknet's geometry: TOTAL padding p, window start at -p/2, taps outside ignored."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG = -3.4028234663852886e38  # darknet's -FLT_MAX for out-of-range taps


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
                x = F.pad(x, (0, 0, 0, 0, 0, groups * self.out_channels - c), value=NEG)
            return x.view(n, groups, self.out_channels, h, w).amax(1)
        if any(self.pads):
            x = F.pad(x, self.pads, value=NEG)
        return F.max_pool2d(x, self.size, self.stride)


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
