"""Weight-bearing layers: convolution (+BN +activation), connected, local, batchnorm, crnn.

Each module lists its tensors in Darknet's .weights order through ``darknet_tensors()``; the
converters use that list for both reading and writing, so round trips are exact.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import onednn, winograd
from .activations import Activation, eager_inference

BN_EPS = 1e-5  # darknet's batch-norm epsilon (OpenCV's importer uses 1e-6)
TensorList = List[Tuple[str, Tensor]]


def _bn_tensors(bn: nn.BatchNorm2d, prefix: str = "", with_bias: bool = True) -> TensorList:
    out = [(prefix + "biases", bn.bias)] if with_bias else []
    return out + [(prefix + "scales", bn.weight), (prefix + "rolling_mean", bn.running_mean),
                  (prefix + "rolling_variance", bn.running_var)]


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Darknet's fuse_conv_batchnorm, in double precision:
    w' = w * scale/sqrt(var + eps), b' = bias - scale*mean/sqrt(var + eps)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    w = (weight.double() * scale.view(shape)).to(weight.dtype)
    b = bn.bias.double() - scale * bn.running_mean.double()
    if bias is not None:
        b = b + bias.double() * scale
    return w, b.to(weight.dtype)


class ConvBnAct(nn.Module):
    """[convolutional]: conv (darknet padding = pad*dilation) -> optional BN -> activation.

    ``binary``/``xnor`` binarise the weights (sign * mean |w| per filter) and, for xnor, the
    input (x > 0 ? 1 : -1), following darknet's float reference path."""

    def __init__(self, c_in: int, filters: int, size: int, stride: Tuple[int, int] = (1, 1),
                 pad: int = 0, dilation: int = 1, groups: int = 1, batch_normalize: bool = False,
                 activation: str = "linear", binary: bool = False, xnor: bool = False,
                 dontloadscales: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, filters, size, stride, padding=pad * dilation,
                              dilation=dilation, groups=groups, bias=not batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=BN_EPS, momentum=0.1) if batch_normalize else None
        self.act = Activation(activation)
        self.binary = bool(binary or xnor)
        self.xnor = bool(xnor)
        self.dontloadscales = bool(dontloadscales)
        self._shared: Optional[List["ConvBnAct"]] = None
        self.prepacked = False  # set by DarknetModel.prepack() (CPU inference only)
        self.winograd = 0       # likewise: largest Winograd tile (2, 4) for 3x3 stride-1 convolutions
        self.winograd_train = False  # set by DarknetModel.winograd_training() (CPU training)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Darknet's initialisation: weights U(-s, s) with s = sqrt(2/fan_in), zero biases."""
        if self.conv.weight.is_meta:
            return
        fan_in = self.conv.weight[0].numel()
        with torch.no_grad():
            self.conv.weight.uniform_(-math.sqrt(2.0 / fan_in), math.sqrt(2.0 / fan_in))
            if self.conv.bias is not None:
                self.conv.bias.zero_()

    def share_from(self, other: "ConvBnAct") -> None:
        """Use another layer's weights and BN (darknet's share_index); nothing of our own."""
        self._shared = [other]  # a plain list: not registered, so state_dict has no duplicates
        del self.conv
        self.bn = None

    @property
    def source(self) -> "ConvBnAct":
        return self._shared[0] if self._shared else self

    def effective_weight(self) -> Tensor:
        w = self.source.conv.weight
        if self.binary:
            mean = w.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
            w = torch.where(w > 0, mean, -mean)
        return w

    def forward(self, x: Tensor) -> Tensor:
        src = self.source
        if x.dtype != src.conv.weight.dtype:  # mixed precision (lowp.to_bf16): the weights' dtype
            x = x.to(src.conv.weight.dtype)
        if self.prepacked and src.bn is None and not self.binary and x.device.type == "cpu" \
                and eager_inference():
            act = self.act.name
            if self.winograd and x.dtype == torch.float32 and winograd.applies(src.conv):
                m = winograd.tile_for(x.shape[1], src.conv.out_channels, x.shape[2], x.shape[3],
                                      largest=self.winograd)
                if m:
                    y = winograd.conv3x3(src.conv, x, m, leaky=act == "leaky")
                    return y if act in ("leaky", "linear") else self.act.forward_owned(y)
            y = onednn.packed_conv(src.conv, act, x)
            if y is not None:
                return y if act in onednn.FUSED_ACTIVATIONS else self.act.forward_owned(y)
        if self.xnor:
            x = torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))
        conv = src.conv
        m = self._train_tile(x, conv) if self.winograd_train else 0
        if m:
            x = winograd.conv3x3_train(x, self.effective_weight(), conv.bias, m)
        else:
            x = F.conv2d(x, self.effective_weight(), conv.bias, conv.stride, conv.padding,
                         conv.dilation, conv.groups)
        if src.bn is not None:
            x = src.bn(x)
        return self.act.forward_owned(x)

    @staticmethod
    def _train_tile(x: Tensor, conv: nn.Conv2d) -> int:
        if not (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and winograd.applies(conv)) or torch.compiler.is_compiling() \
                or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return 0  # export and compiled graphs keep the plain convolution
        return winograd.tile_for(x.shape[1], conv.out_channels, x.shape[2], x.shape[3],
                                 training=True, batch=x.shape[0])

    def darknet_tensors(self) -> TensorList:
        if self._shared:
            return []
        out: TensorList = []
        if self.bn is not None:
            out += _bn_tensors(self.bn, with_bias=True) if not self.dontloadscales else \
                [("biases", self.bn.bias)]
        else:
            out.append(("biases", self.conv.bias))
        return out + [("weights", self.conv.weight)]

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold BN into the convolution (darknet's fuse_conv_batchnorm)."""
        if self._shared or self.bn is None:
            return
        w, b = fold_bn(self.conv.weight, self.conv.bias, self.bn)
        fused = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
                          self.conv.stride, self.conv.padding, self.conv.dilation,
                          self.conv.groups, bias=True).to(w.device)
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        if self.conv.weight.dim() == 4 and not self.conv.weight.is_contiguous() and \
                self.conv.weight.is_contiguous(memory_format=torch.channels_last):
            fused.to(memory_format=torch.channels_last)  # a channels_last model stays so
        self.conv, self.bn = fused, None


class Connected(nn.Module):
    """[connected]: flatten -> linear -> optional BN (not folded by darknet) -> activation."""

    def __init__(self, inputs: int, outputs: int, batch_normalize: bool = False,
                 activation: str = "logistic"):
        super().__init__()
        self.linear = nn.Linear(inputs, outputs, bias=not batch_normalize)
        self.bn = nn.BatchNorm1d(outputs, eps=BN_EPS, momentum=0.1) if batch_normalize else None
        self.act = Activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x.flatten(1))
        if self.bn is not None:
            y = self.bn(y)
        return self.act(y).view(y.shape[0], -1, 1, 1)

    def darknet_tensors(self) -> TensorList:
        if self.bn is None:
            return [("biases", self.linear.bias), ("weights", self.linear.weight)]
        # darknet: biases, weights, then scales/rolling_mean/rolling_variance (BN after weights)
        return [("biases", self.bn.bias), ("weights", self.linear.weight)] + \
            _bn_tensors(self.bn, with_bias=False)


class Local(nn.Module):
    """[local]: unshared convolution; one (filters x c*size*size) matrix per output position."""

    def __init__(self, c_in: int, filters: int, size: int, stride: int, padding: int,
                 out_hw: Tuple[int, int], activation: str):
        super().__init__()
        self.size, self.stride, self.padding, self.out_hw = size, stride, padding, out_hw
        locations = out_hw[0] * out_hw[1]
        self.weight = nn.Parameter(torch.empty(locations, filters, c_in * size * size))
        self.bias = nn.Parameter(torch.zeros(filters, out_hw[0], out_hw[1]))
        self.act = Activation(activation)
        if not self.weight.is_meta:
            nn.init.uniform_(self.weight, -math.sqrt(2.0 / self.weight.shape[2]),
                             math.sqrt(2.0 / self.weight.shape[2]))

    def forward(self, x: Tensor) -> Tensor:
        cols = F.unfold(x, self.size, padding=self.padding, stride=self.stride)  # (N, K, L)
        y = torch.einsum("nkl,lfk->nfl", cols, self.weight)
        y = y.view(x.shape[0], -1, *self.out_hw) + self.bias
        return self.act(y)

    def darknet_tensors(self) -> TensorList:
        return [("biases", self.bias), ("weights", self.weight)]


class BatchNormLayer(nn.Module):
    """[batchnorm]: a stand-alone batch normalisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)

    def darknet_tensors(self) -> TensorList:
        return _bn_tensors(self.bn)


class Crnn(nn.Module):
    """[crnn]: state = input_layer(x) + self_layer(state) (state starts at 0 in each call; with
    shortcut the old state is added too), output = output_layer(state)."""

    def __init__(self, input_layer: ConvBnAct, self_layer: ConvBnAct, output_layer: ConvBnAct,
                 shortcut: bool = False):
        super().__init__()
        self.input_layer, self.self_layer, self.output_layer = input_layer, self_layer, output_layer
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        inp = self.input_layer(x)
        state = torch.zeros_like(inp)
        new_state = inp + self.self_layer(state)
        if self.shortcut:
            new_state = new_state + state
        return self.output_layer(new_state)

    def darknet_tensors(self) -> TensorList:
        out: TensorList = []
        for name in ("input_layer", "self_layer", "output_layer"):
            out += [(f"{name}.{n}", t) for n, t in getattr(self, name).darknet_tensors()]
        return out

    def fuse(self) -> None:
        for m in (self.input_layer, self.self_layer, self.output_layer):
            m.fuse()
