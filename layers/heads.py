"""Output layers: yolo, Gaussian_yolo, region, detection (YOLOv1), softmax, cost."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn


def grouped_softmax(x: Tensor, sizes: Optional[List[int]], dim: int) -> Tensor:
    """Softmax over consecutive groups of ``sizes`` along ``dim`` (darknet's softmax_tree);
    one group over everything when sizes is None."""
    if sizes is None:
        return torch.softmax(x, dim=dim)
    if sizes == [-1]:
        raise RuntimeError("this layer needs its tree= class hierarchy file, which was not found "
                           "when the model was built")
    covered = sum(sizes)
    parts = torch.split(x, sizes + [x.shape[dim] - covered], dim=dim)
    # entries beyond the tree (a short tree file) stay raw, as darknet leaves them
    return torch.cat([torch.softmax(p, dim=dim) for p in parts[:-1]] + [parts[-1]], dim=dim)


class YoloLayer(nn.Module):
    """[yolo] forward (CPU): per anchor channels [x, y, w, h, obj, cls...]; logistic on x, y,
    obj and classes (nothing with new_coords=1: the conv before it is logistic already), then
    x, y <- x*scale_x_y - 0.5*(scale_x_y - 1). w, h stay raw. In training mode: identity."""

    def __init__(self, n_anchors: int, classes: int, scale_x_y: float = 1.0,
                 new_coords: bool = False, per_anchor: int = 5):
        super().__init__()
        self.n, self.classes, self.per_anchor = n_anchors, classes, per_anchor
        self.scale_x_y, self.new_coords = float(scale_x_y), bool(new_coords)
        k = classes + per_anchor
        logistic = torch.zeros(k, dtype=torch.bool)
        xy = torch.zeros(k, dtype=torch.bool)
        self._set_channels(logistic, xy)
        self.register_buffer("logistic", logistic.repeat(n_anchors).view(1, -1, 1, 1), False)
        self.register_buffer("xy", xy.repeat(n_anchors).view(1, -1, 1, 1), False)

    def _set_channels(self, logistic: Tensor, xy: Tensor) -> None:
        if not self.new_coords:
            logistic[[0, 1]] = True
            logistic[4:] = True
        xy[[0, 1]] = True

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return x
        y = torch.where(self.logistic, torch.sigmoid(x), x)
        s = self.scale_x_y
        return torch.where(self.xy, y * s - 0.5 * (s - 1), y)


class GaussianYoloLayer(YoloLayer):
    """[Gaussian_yolo]: per anchor [x, x_sigma, y, y_sigma, w, w_sigma, h, h_sigma, obj, cls...];
    logistic on everything but w and h; scale_x_y affine on x and y."""

    def __init__(self, n_anchors: int, classes: int, scale_x_y: float = 1.0):
        super().__init__(n_anchors, classes, scale_x_y, False, per_anchor=9)

    def _set_channels(self, logistic: Tensor, xy: Tensor) -> None:
        logistic[:] = True
        logistic[[4, 6]] = False
        xy[[0, 2]] = True


class RegionLayer(nn.Module):
    """[region] (YOLOv2) forward (CPU): logistic on objectness, softmax over the classes of each
    anchor (softmax=1); x, y, w, h raw (their logistic comes at decode time).

    Darknet's CPU buffer is cell-major (H, W, num, K); we return the same values as
    (N, num*K, H, W)."""

    def __init__(self, num: int, classes: int, coords: int = 4, softmax: bool = True,
                 tree: Optional[List[int]] = None):
        super().__init__()
        self.num, self.classes, self.coords, self.softmax = num, classes, coords, bool(softmax)
        self.tree = tree  # softmax group sizes of a class hierarchy (yolo9000)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return x
        n, _, h, w = x.shape
        k = self.coords + 1 + self.classes
        v = x.view(n, self.num, k, h, w)
        parts = [v[:, :, :self.coords], torch.sigmoid(v[:, :, self.coords:self.coords + 1])]
        cls = v[:, :, self.coords + 1:]
        if self.tree is not None:  # darknet: the tree softmax takes precedence over softmax=1
            cls = grouped_softmax(cls, self.tree, dim=2)
        elif self.softmax:
            cls = torch.softmax(cls, dim=2)
        parts.append(cls)
        return torch.cat(parts, dim=2).view(n, -1, h, w)


class DetectionLayer(nn.Module):
    """[detection] (YOLOv1): flat output; classes come first (side*side*classes), softmax per
    cell when softmax=1."""

    def __init__(self, side: int, classes: int, softmax: bool = False):
        super().__init__()
        self.side, self.classes, self.softmax = side, classes, bool(softmax)

    def forward(self, x: Tensor) -> Tensor:
        y = x.flatten(1)
        if self.training or not self.softmax:
            return y
        cells = self.side * self.side * self.classes
        probs = torch.softmax(y[:, :cells].view(-1, self.side * self.side, self.classes), dim=2)
        return torch.cat([probs.flatten(1), y[:, cells:]], dim=1)


class Softmax(nn.Module):
    """[softmax]: exp((x - max)/temperature) normalised over each of ``groups`` contiguous
    slices of the flat input; spatial=1 normalises over channels at every pixel."""

    def __init__(self, groups: int = 1, temperature: float = 1.0, spatial: bool = False,
                 tree: Optional[List[int]] = None):
        super().__init__()
        self.groups, self.temperature, self.spatial = groups, float(temperature), bool(spatial)
        self.tree = tree

    def forward(self, x: Tensor) -> Tensor:
        t = x / self.temperature if self.temperature != 1.0 else x
        if self.tree is not None:  # hierarchical softmax over the channels (darknet's tree)
            return grouped_softmax(t, self.tree, dim=1)
        if self.spatial:
            return torch.softmax(t, dim=1)
        n = x.shape[0]
        return torch.softmax(t.reshape(n, self.groups, -1), dim=2).view_as(x)


class Passthrough(nn.Module):
    """Layers that do nothing at inference: dropout, cost, contrastive, empty/silence."""

    def forward(self, x: Tensor) -> Tensor:
        return x
