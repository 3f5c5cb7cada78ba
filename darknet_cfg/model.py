"""DarknetModel: an nn.Module whose ``layers[i]`` is Darknet layer i."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .builder import build_layer
from .errors import DarknetCfgError
from .graph import NetGraph, build_graph
from .reader import Cfg
from .specs import DETECTION_TYPES, LayerSpec

DEFAULT_HEADER = {"major": 0, "minor": 2, "revision": 5, "seen": 0}


def available_memory(device=None) -> Optional[int]:
    """Bytes free for new tensors on ``device`` (None if unknown)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(graph: NetGraph, device=None) -> None:
    """Refuse, before allocating, a model whose float32 parameters exceed the free memory."""
    need = graph.total_weight_floats * 4
    free = available_memory(device)
    if free is not None and need > free:
        raise DarknetCfgError(f"the model's parameters need {need / 2**30:.1f} GiB "
                              f"({graph.total_weight_floats} floats) but only {free / 2**30:.1f} "
                              f"GiB is free on {device or 'cpu'}", graph.path)


class DarknetModel(nn.Module):
    """A Darknet network built from its cfg.

    ``model(x)`` with x of shape (N, C, H, W) returns a list with one tensor per output layer
    (``output_indices``: [yolo]/[Gaussian_yolo]/[region]/[detection] layers, or for classifiers
    the last layer that is not [cost]). In eval mode each equals Darknet's ``l.output`` of that
    layer, shaped (N, C, H, W), or (N, outputs) where Darknet's output is flat (softmax,
    detection). In training mode the detection layers return their raw inputs.
    """

    def __init__(self, graph: NetGraph, device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        self.graph = graph
        check_fits_in_memory(graph, device)
        built: List[nn.Module] = []
        with torch.device(device) if device is not None else _nullcontext():
            for spec in graph.layers:
                built.append(build_layer(spec, built))
        self.layers = nn.ModuleList(built)
        self.inputs = [spec.inputs for spec in graph.layers]
        self.output_indices = graph.output_indices
        last = graph.last_uses()
        outs = set(self.output_indices)
        # after layer i has run, outputs no later layer reads can be dropped
        self._drop_after: List[List[int]] = [[] for _ in graph.layers]
        for j, i in enumerate(last):
            if j not in outs:
                self._drop_after[i].append(j)
        self.header: Dict[str, int] = dict(DEFAULT_HEADER)
        self.cfg_text = graph.cfg.text

    # ------------------------------------------------------------------------------ info
    @property
    def specs(self) -> List[LayerSpec]:
        return self.graph.layers

    @property
    def width(self) -> int:
        return self.graph.net.width

    @property
    def height(self) -> int:
        return self.graph.net.height

    @property
    def channels(self) -> int:
        return self.graph.net.channels

    @property
    def heads(self) -> List[LayerSpec]:
        return [s for s in self.graph.layers if s.type in DETECTION_TYPES]

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> List[Tensor]:
        outs: Dict[int, Tensor] = {-1: x}
        for i, layer in enumerate(self.layers):
            srcs = self.inputs[i]
            y = layer(*[outs[j] for j in srcs]) if srcs else layer(x)
            outs[i] = y
            for j in self._drop_after[i]:
                outs.pop(j, None)
        results = []
        for i in self.output_indices:
            y = outs[i]
            if self.graph.layers[i].flat and y.dim() > 2:
                y = y.flatten(1)
            results.append(y)
        return results

    def forward_all(self, x: Tensor) -> List[Tensor]:
        """Every layer's output (for debugging and parity checks); keeps everything alive."""
        outs: Dict[int, Tensor] = {-1: x}
        for i, layer in enumerate(self.layers):
            srcs = self.inputs[i]
            outs[i] = layer(*[outs[j] for j in srcs]) if srcs else layer(x)
        return [outs[i] for i in range(len(self.layers))]

    def head_inputs(self, x: Tensor) -> List[Tensor]:
        """Raw inputs of the detection layers (what the training loss takes)."""
        was = self.training
        self.train(True)
        try:
            return self.forward(x)
        finally:
            self.train(was)

    def loss(self, head_inputs: Sequence[Tensor], targets: Tensor, seen: int = 0,
             width: Optional[int] = None, height: Optional[int] = None):
        """Darknet's training loss of every [yolo]/[region] layer: ``(total, stats)``.

        ``head_inputs``: what ``head_inputs(x)`` (or ``model(x)`` in training mode) returns;
        ``targets``: (M, 6) rows [image_index, class, x, y, w, h] relative to the network input;
        ``seen``: images seen so far (Darknet's ``net.seen``, which some terms depend on).
        ``total.backward()`` gives Darknet's gradients (-delta summed over the images); ``stats``
        holds each layer's figures (avg IoU, class, obj, counts) as Darknet prints them.
        ``width``/``height``: the input size when it differs from [net]'s (random resizing)."""
        from .train import HeadLoss
        if getattr(self, "_head_loss", None) is None:
            self._head_loss = HeadLoss(self)
        return self._head_loss(list(head_inputs), targets, width or self.width,
                               height or self.height, seen)

    @torch.no_grad()
    def fuse(self) -> "DarknetModel":
        """Fold batch-norm into convolutions (Darknet's fuse_conv_batchnorm, double precision)."""
        for m in self.layers:
            if hasattr(m, "fuse"):
                m.fuse()
        return self

    def prepack(self, enabled: bool = True, winograd: Union[bool, int] = False) -> "DarknetModel":
        """CPU inference: run folded convolutions through oneDNN with weights packed once and
        the activation fused (layers/onednn.py; 1.1-1.2x faster here, same numbers).
        ``winograd`` also runs 3x3 stride-1 convolutions by Winograd where that is faster
        (layers/winograd.py): ``True`` or ``4`` F(4x4) and F(2x2) tiles, ``2`` F(2x2) tiles only,
        ``False`` none. Outputs stay within the oracle tolerance but are rounded differently from
        Darknet's direct convolutions, so a probability within ~1e-5 of a threshold can land on
        the other side. Applies to
        no-grad forwards after ``fuse()``; training, export and GPUs are unaffected."""
        from .layers import onednn
        from .layers import winograd as wino
        from .layers.conv import ConvBnAct
        for m in self.modules():
            if isinstance(m, ConvBnAct):
                m.prepacked = bool(enabled) and onednn.available()
                m.winograd = (4 if winograd is True else int(winograd)) if m.prepacked else 0
                if hasattr(m, "conv"):
                    onednn.forget(m.conv)
                    wino.forget(m.conv)
        return self

    def winograd_training(self, enabled: bool = True) -> "DarknetModel":
        """CPU training: 3x3 stride-1 convolutions compute their forward, input gradient and
        weight gradient by Winograd (layers/winograd.py) where that is faster than oneDNN
        (yolov4-tiny@224 batch 64: 1.45-1.5x, bench/train_speed.py; the Trainer's CPU default).
        Same function, float rounding of a different order (gradients agree to ~1e-5 relative)."""
        from .layers.conv import ConvBnAct
        for m in self.modules():
            if isinstance(m, ConvBnAct):
                m.winograd_train = bool(enabled)
        return self

    def compile_activations(self, enabled: bool = True) -> "DarknetModel":
        """Run activations for which a compiled kernel is faster (mish: 4-5x on CPU) through
        torch.compile in inference (no-grad) forwards; training and export are unaffected.
        Costs a few seconds of compiling on first use; results within 1e-6 relative."""
        from .layers.activations import COMPILABLE, Activation
        for m in self.modules():
            if isinstance(m, Activation):
                m.compiled = enabled and m.name in COMPILABLE
        return self

    def extra_repr(self) -> str:
        n = self.graph.net
        return f"cfg={os.path.basename(self.graph.path)!r}, input={n.channels}x{n.height}x{n.width}"


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def build_model(cfg: Union[str, os.PathLike, Cfg], width: Optional[int] = None,
                height: Optional[int] = None, device=None) -> DarknetModel:
    """Parse ``cfg`` and build the model (randomly initialised, in train mode like any Module)."""
    return DarknetModel(build_graph(cfg, width, height), device=device)
