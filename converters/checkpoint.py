"""PyTorch checkpoints (.pt) that carry everything needed to rebuild the model without the cfg:
the cfg text, the network size, the Darknet header and the state_dict. Loaded with
``torch.load(..., weights_only=True)``."""
from __future__ import annotations

import io
import os
from typing import Any, Dict

import torch

from ..errors import DarknetError
from .weights import atomic_write

FORMAT = "darknet_cfg.checkpoint"
VERSION = 1


def checkpoint_dict(model) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "cfg_text": model.cfg_text,
        "cfg_name": os.path.basename(model.graph.path),
        "width": model.width,
        "height": model.height,
        "channels": model.channels,
        "header": dict(model.header),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_checkpoint(model, path) -> None:
    buf = io.BytesIO()
    torch.save(checkpoint_dict(model), buf)
    atomic_write(path, [buf.getbuffer()])


def read_checkpoint(path) -> Dict[str, Any]:
    path = os.fspath(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DarknetError(f"{path}: no such file") from None
    except Exception as e:  # corrupt zip, pickle with disallowed globals, ...
        raise DarknetError(f"{path}: not a darknet_cfg checkpoint ({type(e).__name__}: {e})") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DarknetError(f"{path}: not a darknet_cfg checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("version", 0) > VERSION:
        raise DarknetError(f"{path}: checkpoint version {ckpt['version']} is newer than this "
                           f"darknet_cfg understands ({VERSION})")
    return ckpt
