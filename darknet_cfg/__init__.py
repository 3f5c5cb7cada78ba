"""darknet_cfg: Darknet cfg files and .weights in PyTorch, with Darknet's exact numbers.

    import darknet_cfg
    model = darknet_cfg.load("yolov4-tiny.cfg", "yolov4-tiny.weights")   # eval mode
    outputs = model(x)                      # one tensor per [yolo] layer, as Darknet's l.output
    darknet_cfg.save_weights(model, "out.weights")
"""
from __future__ import annotations

import os
from typing import List, Optional, Union

from .errors import DarknetCfgError, DarknetError, DarknetWeightsError, WeightsWarning
from .graph import NetGraph, build_graph
from .model import DarknetModel, build_model
from .options import CfgWarning
from .reader import Cfg, parse_cfg_text, read_cfg, write_cfg

__version__ = "0.1.0"
__all__ = ["load", "load_weights", "save_weights", "save_checkpoint", "summary", "build_model",
           "build_graph", "DarknetModel", "DarknetCfgError", "DarknetWeightsError",
           "DarknetError", "CfgWarning", "WeightsWarning", "read_cfg", "write_cfg", "parse_cfg_text"]

PathLike = Union[str, os.PathLike]


def load(cfg_or_pt: PathLike, weights: Optional[PathLike] = None, *, width: Optional[int] = None,
         height: Optional[int] = None, strict: bool = True, strict_finite: bool = False,
         device=None) -> DarknetModel:
    """Build a model from a Darknet cfg (optionally loading .weights) or from a .pt checkpoint
    written by ``darknet2torch``/``save_checkpoint``. Returns the model in eval mode.

    NaN/Inf values in the weights warn (``WeightsWarning``); ``strict_finite=True`` rejects them."""
    from .converters.checkpoint import read_checkpoint
    path = os.fspath(cfg_or_pt)
    if path.endswith((".pt", ".pth")):
        ckpt = read_checkpoint(path)
        cfg = parse_cfg_text(ckpt["cfg_text"], ckpt.get("cfg_name", path))
        model = build_model(cfg, width or ckpt["width"], height or ckpt["height"], device=device)
        model.load_state_dict(ckpt["state_dict"])
        model.header = dict(ckpt["header"])
        if weights is not None:
            load_weights(model, weights, strict=strict, strict_finite=strict_finite)
    else:
        model = build_model(path, width, height, device=device)
        if weights is not None:
            load_weights(model, weights, strict=strict, strict_finite=strict_finite)
    return model.eval()


def load_weights(model: DarknetModel, path: PathLike, strict: bool = True,
                 strict_finite: bool = False):
    """Read Darknet .weights into ``model``; returns a LoadReport (layers filled, floats read,
    ``nonfinite``: layer -> NaN/Inf count, which also warn unless ``strict_finite`` rejects them)."""
    from .converters.weights import load_weights as _load
    return _load(model, path, strict=strict, strict_finite=strict_finite)


def save_weights(model: DarknetModel, path: PathLike, upto: Optional[int] = None) -> None:
    """Write Darknet .weights (atomically). ``upto``: only layers [0, upto)."""
    from .converters.weights import save_weights as _save
    _save(model, path, upto)


def save_checkpoint(model: DarknetModel, path: PathLike) -> None:
    """Write a .pt holding the cfg text, size, Darknet header and state_dict."""
    from .converters.checkpoint import save_checkpoint as _save
    _save(model, path)


def summary(cfg: PathLike, width: Optional[int] = None, height: Optional[int] = None) -> List[dict]:
    """Per-layer records (what ``darknet-cfg summary --json`` prints, without the totals)."""
    from .layer_table import layer_records
    return layer_records(build_graph(cfg, width, height))
