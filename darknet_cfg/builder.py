"""Spec -> nn.Module. The only place that knows both the specs and the layer modules."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Type

from torch import nn

import warnings

from . import specs as S
from .options import CfgWarning
from .errors import DarknetCfgError
from .layers import conv as C
from .layers import heads as H
from .layers import merge as M
from .layers import misc
from .layers import pooling as P
from .layers import resample as R
from .layers.activations import Activation


def _conv(p: S.ConvParams, dontloadscales: int = 0, binary: int = 0, xnor: int = 0) -> C.ConvBnAct:
    return C.ConvBnAct(p.c, p.filters, p.size, (p.stride_y, p.stride_x), p.pad, p.dilation,
                       p.groups, bool(p.batch_normalize), p.activation, bool(binary), bool(xnor),
                       bool(dontloadscales))


def _convolutional(spec: S.ConvolutionalSpec, built: List[nn.Module]) -> nn.Module:
    m = _conv(spec.conv, spec.dontloadscales, spec.binary, spec.xnor)
    if spec.share_index is not None:
        m.share_from(built[spec.share_index])
    return m


BUILDERS: Dict[Type[S.LayerSpec], Callable[[S.LayerSpec, List[nn.Module]], nn.Module]] = {
    S.ConvolutionalSpec: _convolutional,
    S.LocalSpec: lambda s, b: C.Local(s.in_shape.c, s.filters, s.size, s.stride, s.padding,
                                      (s.out_shape.h, s.out_shape.w), s.activation),
    S.ConnectedSpec: lambda s, b: C.Connected(s.in_shape.c, s.output, bool(s.batch_normalize),
                                              s.activation),
    S.BatchnormSpec: lambda s, b: C.BatchNormLayer(s.out_shape.c),
    S.CrnnSpec: lambda s, b: C.Crnn(_conv(s.input_layer), _conv(s.self_layer),
                                    _conv(s.output_layer), bool(s.shortcut)),
    S.MaxpoolSpec: lambda s, b: P.MaxPool(s.size, s.stride_x, s.stride_y, s.padding,
                                          bool(s.maxpool_depth), s.out_channels),
    S.LocalAvgpoolSpec: lambda s, b: P.LocalAvgPool(s.size, s.stride_x, s.stride_y, s.padding),
    S.AvgpoolSpec: lambda s, b: P.GlobalAvgPool(),
    S.RouteSpec: lambda s, b: M.Route(s.groups, s.group_id),
    S.ShortcutSpec: lambda s, b: M.Shortcut(len(s.sources), s.out_shape.c, s.activation,
                                            s.weights_type, s.weights_normalization),
    S.ScaleChannelsSpec: lambda s, b: M.ScaleChannels(s.activation),
    S.SamSpec: lambda s, b: M.Sam(s.activation),
    S.UpsampleSpec: lambda s, b: R.Upsample(s.stride, s.scale),
    S.ReorgSpec: lambda s, b: R.Reorg(s.stride, bool(s.reverse)),
    S.ReorgOldSpec: lambda s, b: R.ReorgOld(s.stride, bool(s.reverse)),
    S.CropSpec: lambda s, b: R.Crop((s.out_shape.h, s.out_shape.w), bool(s.noadjust)),
    S.ActivationSpec: lambda s, b: Activation(s.activation),
    S.DropoutSpec: lambda s, b: H.Passthrough(),
    S.EmptySpec: lambda s, b: H.Passthrough(),
    S.CostSpec: lambda s, b: H.Passthrough(),
    S.ContrastiveSpec: lambda s, b: H.Passthrough(),
    S.ImplicitSpec: lambda s, b: misc.Implicit(s.filters, s.atoms, s.mean, s.std),
    S.NormalizationSpec: lambda s, b: misc.LocalResponseNorm(s.size, s.alpha, s.beta, s.kappa),
    S.SoftmaxSpec: lambda s, b: H.Softmax(s.groups, s.temperature, bool(s.spatial),
                                          _tree_groups(s)),
    S.YoloSpec: lambda s, b: H.YoloLayer(s.n, s.classes, s.scale_x_y, bool(s.new_coords)),
    S.GaussianYoloSpec: lambda s, b: H.GaussianYoloLayer(s.n, s.classes, s.scale_x_y),
    S.RegionSpec: lambda s, b: H.RegionLayer(s.num, s.classes, s.coords, bool(s.softmax),
                                             _tree_groups(s)),
    S.DetectionSpec: lambda s, b: H.DetectionLayer(s.side, s.classes, bool(s.softmax)),
}


def _tree_groups(spec) -> Optional[List[int]]:
    """Group sizes of a hierarchical softmax (tree=), or None for a plain softmax."""
    if spec.tree is None:
        return None
    value, found = spec.tree
    if found is None:
        return [-1]  # the layer raises a clear error if it is run
    from .tree import read_tree_groups
    sizes = read_tree_groups(found)
    n = spec.classes if hasattr(spec, "classes") else spec.out_shape.c
    if sum(sizes) != n:
        warnings.warn(f"{found}: the class tree has {sum(sizes)} entries but layer {spec.index} "
                      f"has {n} classes; classes beyond the tree are left un-normalised",
                      CfgWarning)
    return sizes


def build_layer(spec: S.LayerSpec, built: List[nn.Module]) -> nn.Module:
    try:
        factory = BUILDERS[type(spec)]
    except KeyError:
        raise DarknetCfgError(f"no PyTorch module for [{spec.section}]", None, spec.line,
                              spec.section) from None
    return factory(spec, built)
