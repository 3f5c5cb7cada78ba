"""Resampling layers: upsample (and sum-downsample), reorg3d, darknet's old reorg, crop."""
from __future__ import annotations

from torch import Tensor, nn


class Upsample(nn.Module):
    """[upsample]: nearest neighbour x stride, times ``scale``; stride < 0 sums each
    |stride| x |stride| block (not an average), times ``scale``."""

    def __init__(self, stride: int = 2, scale: float = 1.0):
        super().__init__()
        self.stride, self.scale = stride, scale

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        s = abs(self.stride)
        if self.stride > 0:
            y = x[:, :, :, None, :, None].expand(n, c, h, s, w, s).reshape(n, c, h * s, w * s)
            return y * self.scale if self.scale != 1.0 else y
        ho, wo = h // s, w // s
        x = x[:, :, :ho * s, :wo * s]
        if self.scale != 1.0:
            x = x * self.scale  # darknet adds scale*x for each tap
        return x.reshape(n, c, ho, s, wo, s).sum(dim=(3, 5))


def space_to_depth(x: Tensor, s: int) -> Tensor:
    """out[(dy*s + dx)*C + c, j, i] = in[c, j*s + dy, i*s + dx]."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, s * s * c, h // s, w // s)


def depth_to_space(x: Tensor, s: int) -> Tensor:
    """Inverse of space_to_depth."""
    n, c, h, w = x.shape
    x = x.view(n, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c // (s * s), h * s, w * s)


class Reorg(nn.Module):
    """[reorg3d] (darknet type 'reorg'): space-to-depth, or depth-to-space with reverse=1."""

    def __init__(self, stride: int, reverse: bool = False):
        super().__init__()
        self.stride, self.reverse = stride, bool(reverse)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        return depth_to_space(x, s) if self.reverse else space_to_depth(x, s)


class ReorgOld(nn.Module):
    """[reorg] (darknet type 'reorg_old', YOLOv2): darknet reads the (C, H, W) input buffer as
    (C/s^2, H*s, W*s), applies space-to-depth, and reads the result as (C*s^2, H/s, W/s)."""

    def __init__(self, stride: int, reverse: bool = False):
        super().__init__()
        self.stride, self.reverse = stride, bool(reverse)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        s = self.stride
        if self.reverse:
            return depth_to_space(x, s)
        y = space_to_depth(x.reshape(n, c // (s * s), h * s, w * s), s)
        return y.reshape(n, c * s * s, h // s, w // s)


class Crop(nn.Module):
    """[crop]: at inference the centred crop ((h-ch)/2, (w-cw)/2), then x*2-1 unless noadjust
    (darknet's random crop and flip are training-time augmentation)."""

    def __init__(self, crop_hw, noadjust: bool = False):
        super().__init__()
        self.crop_hw, self.noadjust = tuple(crop_hw), bool(noadjust)

    def forward(self, x: Tensor) -> Tensor:
        ch, cw = self.crop_hw
        dh, dw = (x.shape[2] - ch) // 2, (x.shape[3] - cw) // 2
        y = x[:, :, dh:dh + ch, dw:dw + cw]
        return y if self.noadjust else y * 2 - 1
