"""From cfg sections to a validated, torch-free layer graph (what ``summary`` prints)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Union

from .errors import DarknetCfgError
from .options import INT_MAX, Options
from .reader import Cfg, read_cfg, with_net_overrides
from .specs import (DETECTION_TYPES, SPECS, UNSUPPORTED_SECTIONS, Context, LayerSpec, NetSpec,
                    parse_net)


@dataclass(frozen=True)
class NetGraph:
    """The parsed network: [net] settings plus one spec per Darknet layer (same indices)."""
    net: NetSpec
    layers: List[LayerSpec]
    cfg: Cfg

    @property
    def path(self) -> str:
        return self.cfg.path

    @property
    def output_indices(self) -> List[int]:
        """Layers whose outputs the model returns: detection layers, else the layer Darknet's
        get_network_output returns (the last one that is not [cost])."""
        heads = [l.index for l in self.layers if l.type in DETECTION_TYPES]
        if heads:
            return heads
        for l in reversed(self.layers):
            if l.type != "cost":
                return [l.index]
        return [self.layers[-1].index]

    @property
    def total_weight_floats(self) -> int:
        return sum(l.weight_floats for l in self.layers)

    @property
    def total_bflops(self) -> float:
        return sum(l.bflops for l in self.layers if l.bflops > 0)

    def last_uses(self) -> List[int]:
        """For each layer, the index of the last layer that reads its output."""
        last = [i for i in range(len(self.layers))]
        for l in self.layers:
            for j in l.inputs:
                if j >= 0:
                    last[j] = max(last[j], l.index)
        return last


def _check_sizes(o: Options, spec: LayerSpec) -> None:
    """Darknet keeps a layer's output and weight counts in 32-bit ints; larger ones are typos."""
    if spec.out_shape.numel > INT_MAX:
        raise o.error(f"output {'x'.join(map(str, spec.out_shape.as_list()))} has "
                      f"{spec.out_shape.numel} values per image, more than Darknet's limit "
                      f"{INT_MAX} (check filters/size/stride)")
    if spec.weight_floats > INT_MAX:
        raise o.error(f"{spec.weight_floats} weights ({spec.weight_floats * 4 / 2**30:.0f} GiB) "
                      f"in one layer, more than Darknet's limit {INT_MAX} (check filters/size/"
                      "output)")


def build_graph(cfg: Union[str, os.PathLike, Cfg], width: Optional[int] = None,
                height: Optional[int] = None, channels: Optional[int] = None,
                warn_unused: bool = True) -> NetGraph:
    """Parse every section like darknet's parse_network_cfg and infer all shapes.

    ``width``/``height`` override [net] (as if written first in the section)."""
    cfg = read_cfg(cfg)
    if width is not None or height is not None or channels is not None:
        cfg = with_net_overrides(cfg, width=width, height=height, channels=channels)
    net_opts = Options(cfg.net, cfg.path)
    net = parse_net(net_opts)
    if net.inputs > INT_MAX or net.input_shape.numel > INT_MAX:
        raise net_opts.error(f"input {net.channels}x{net.height}x{net.width} has more than "
                             f"{INT_MAX} values (Darknet counts them in a 32-bit int)")
    if warn_unused:
        net_opts.warn_unused()
    layers: List[LayerSpec] = []
    for index, section in enumerate(cfg.sections[1:]):
        o = Options(section, cfg.path)
        cls = SPECS.get(section.name)
        if cls is None:
            if section.name in UNSUPPORTED_SECTIONS:
                raise DarknetCfgError(f"[{section.name}] layers are not supported by darknet_cfg",
                                      cfg.path, section.line, section.name)
            raise DarknetCfgError(f"unknown section type [{section.name}]", cfg.path,
                                  section.line, section.name)
        ctx = Context(index, net, layers, o)
        spec = cls.parse(o, ctx)
        if spec.out_shape.numel <= 0:
            raise o.error(f"output would be empty: {spec.out_shape.as_list()}")
        _check_sizes(o, spec)
        if warn_unused:
            o.warn_unused()
        layers.append(spec)
    if not layers:
        raise DarknetCfgError("the cfg has a [net] section but no layers", cfg.path,
                              cfg.net.line, cfg.net.name)
    return NetGraph(net, layers, cfg)
