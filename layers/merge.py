"""Layers that read several earlier outputs: route, shortcut, scale_channels, sam."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .activations import Activation


class Route(nn.Module):
    """[route]: concatenate inputs along channels; with groups=g, group_id=k each input
    contributes its k-th block of c/g channels."""

    def __init__(self, groups: int = 1, group_id: int = 0):
        super().__init__()
        self.groups, self.group_id = groups, group_id

    def forward(self, *xs: Tensor) -> Tensor:
        if self.groups > 1:
            xs = [x.chunk(self.groups, dim=1)[self.group_id] for x in xs]
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)


def _add_channels(out: Tensor, add: Tensor) -> Tensor:
    """out + add over the channels both have (darknet adds where flat index < add's size)."""
    c, ca = out.shape[1], add.shape[1]
    if ca == c:
        return out + add
    if ca > c:
        return out + add[:, :c]
    return torch.cat([out[:, :ca] + add, out[:, ca:]], dim=1)


class Shortcut(nn.Module):
    """[shortcut]: x + sum(from), optionally weighted per layer (per_feature) or per channel
    (per_channel) with relu/softmax weight normalisation, then the activation.

    Weights are stored as darknet's [n+1][c] (index 0 = the previous layer). In eval mode the
    normalisation is the one darknet applies at load time (relu: max(w, 0.001)); in training
    darknet's forward uses max(w, 0)."""

    def __init__(self, n_from: int, channels: int, activation: str = "linear",
                 weights_type: str = "none", weights_normalization: str = "none"):
        super().__init__()
        self.act = Activation(activation)
        self.normalization = weights_normalization
        if weights_type == "none":
            self.weight = None
        else:
            per = channels if weights_type == "per_channel" else 1
            self.weight = nn.Parameter(torch.ones(n_from + 1, per))

    def normalized_weights(self) -> Tensor:
        w = self.weight
        if self.normalization == "relu":
            floor = 0.0 if self.training else 0.001  # darknet: relu in training, lrelu when fused
            w = torch.clamp(w, min=floor)
            w = w / (0.0001 + w.sum(0, keepdim=True))
        elif self.normalization == "softmax":
            e = torch.exp(w - w.amax(0, keepdim=True))
            w = e / (0.0001 + e.sum(0, keepdim=True))
        return w

    def forward(self, x: Tensor, *sources: Tensor) -> Tensor:
        if self.weight is None:
            out = x
            for s in sources:
                out = _add_channels(out, s)
            return self.act(out)
        w = self.normalized_weights()
        c = x.shape[1]

        def scaled(t: Tensor, i: int) -> Tensor:
            wi = w[i]
            if wi.numel() > 1:
                wi = wi[: t.shape[1]] if t.shape[1] <= c else torch.cat(
                    [wi, wi.new_zeros(t.shape[1] - c)])
                return t * wi.view(1, -1, 1, 1)
            return t * wi

        out = scaled(x, 0)
        for i, s in enumerate(sources, start=1):
            out = _add_channels(out, scaled(s, i))
        return self.act(out)

    def darknet_tensors(self):
        return [("weights", self.weight)] if self.weight is not None else []


class ScaleChannels(nn.Module):
    """[scale_channels]: out = layer[from] * previous (c x 1 x 1, or 1 x h x w with scale_wh)."""

    def __init__(self, activation: str = "linear"):
        super().__init__()
        self.act = Activation(activation)

    def forward(self, scale: Tensor, x: Tensor) -> Tensor:
        return self.act(x * scale)


class Sam(nn.Module):
    """[sam]: out = previous * layer[from], elementwise."""

    def __init__(self, activation: str = "linear"):
        super().__init__()
        self.act = Activation(activation)

    def forward(self, attention: Tensor, x: Tensor) -> Tensor:
        return self.act(x * attention)
