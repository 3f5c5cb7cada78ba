"""ONNX export of a DarknetModel (torch.export-based exporter; needs ``onnxscript``).

Raw mode: one output per detection layer (``out_<layer>``), each Darknet's ``l.output``.
Decoded mode (``decode=True``): ``boxes`` (N, B, 4) as x, y, w, h relative to the network
input (Darknet's get_*_detections before correct_yolo_boxes: no letterbox correction, which
needs the image size), ``objectness`` (N, B) and ``scores`` (N, B, classes) = Darknet's class
probabilities before thresholding; boxes are in Darknet's order (layers, cells row-major,
anchors inner), so ``get_network_boxes``' provenance maps 1:1.
"""
from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager, redirect_stdout
from typing import List

import torch
from torch import Tensor, nn

from .errors import DarknetError
from .postprocess import YOLO_LEFT_TOP, YOLO_RIGHT_BOTTOM, HeadParams

__all__ = ["export_onnx", "DecodedModel"]


class _RawOutputs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor):
        return tuple(self.model(x))


class DecodedModel(nn.Module):
    """The model plus Darknet's box decoding in torch ops (exportable, batched)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        specs = model.heads
        if not specs or [s.index for s in specs] != list(model.output_indices):
            raise DarknetError("--decode needs a detector ([yolo], [Gaussian_yolo] or [region] "
                               "layers)")
        from .infer import _head_params
        self.params = list(_head_params(specs).values())
        if len({p.classes for p in self.params}) != 1:
            raise DarknetError("--decode: the detection layers disagree on the number of classes")
        for i, p in enumerate(self.params):
            table = [p.anchors[2 * m: 2 * m + 2] for m in p.mask]
            self.register_buffer(f"anchors{i}", torch.tensor(table, dtype=torch.float32), False)
        self.net_w, self.net_h = float(model.width), float(model.height)

    def _decode(self, y: Tensor, p: HeadParams, anchors: Tensor):
        n, _, H, W = y.shape
        v = y.view(n, p.n, p.entries, H, W).permute(0, 3, 4, 1, 2).reshape(n, H * W * p.n, p.entries)
        cell = torch.arange(H * W * p.n, device=y.device)
        col = ((cell // p.n) % W).to(y.dtype)
        row = ((cell // p.n) // W).to(y.dtype)
        a = anchors.repeat(H * W, 1)
        aw, ah = a[:, 0], a[:, 1]
        if p.kind == "region":
            x = (col + torch.sigmoid(v[..., 0])) / W
            yy = (row + torch.sigmoid(v[..., 1])) / H
            w, h = torch.exp(v[..., 2]) * aw / W, torch.exp(v[..., 3]) * ah / H
            obj = torch.ones_like(x)
            scores = v[..., 4:5] * v[..., 5:5 + p.classes]
        elif p.kind == "yolo":
            x, yy = (col + v[..., 0]) / W, (row + v[..., 1]) / H
            if p.new_coords:
                w = v[..., 2] * v[..., 2] * 4 * aw / self.net_w
                h = v[..., 3] * v[..., 3] * 4 * ah / self.net_h
            else:
                w = torch.exp(v[..., 2]) * aw / self.net_w
                h = torch.exp(v[..., 3]) * ah / self.net_h
            obj = v[..., 4]
            scores = obj.unsqueeze(-1) * v[..., 5:5 + p.classes]
        else:  # Gaussian_yolo
            x, yy = (col + v[..., 0]) / W, (row + v[..., 2]) / H
            w = torch.exp(v[..., 4]) * aw / self.net_w
            h = torch.exp(v[..., 6]) * ah / self.net_h
            if p.yolo_point == YOLO_LEFT_TOP:
                x, yy = x + w / 2, yy + h / 2
            elif p.yolo_point == YOLO_RIGHT_BOTTOM:
                x, yy = x - w / 2, yy - h / 2
            obj = v[..., 8]
            uc = (v[..., 1] + v[..., 3] + v[..., 5] + v[..., 7]) / 4
            scores = obj.unsqueeze(-1) * v[..., 9:9 + p.classes] * (1 - uc).unsqueeze(-1)
        return torch.stack([x, yy, w, h], dim=-1), obj, scores

    def forward(self, x: Tensor):
        parts = [self._decode(y, p, getattr(self, f"anchors{i}"))
                 for i, (y, p) in enumerate(zip(self.model(x), self.params))]
        return tuple(torch.cat([q[k] for q in parts], dim=1) for k in range(3))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _quiet_torch_logs():
    """The exporter logs notices (e.g. 'torchvision is not installed') and failed opset
    conversions (reported by us instead) through logging."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old):
            lg.setLevel(level)


def export_onnx(model, path, opset: int = 18, dynamic_batch: bool = False,
                decode: bool = False) -> List[str]:
    """Write ``model`` (eval mode; fuse it first for speed) as ONNX; returns the output names.

    Uses ``torch.onnx.export(dynamo=True)``; the file is written atomically."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise DarknetError("ONNX export needs onnxscript: pip install onnxscript "
                           "(or pip install 'darknet_cfg[onnx]')") from None
    model = model.eval()
    module = (DecodedModel(model) if decode else _RawOutputs(model)).eval()
    names = ["boxes", "objectness", "scores"] if decode else \
        [f"out_{i}" for i in model.output_indices]
    device = next(model.parameters()).device
    x = torch.zeros(2 if dynamic_batch else 1, model.channels, model.height, model.width,
                    device=device)
    dyn = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".export.", suffix=".onnx",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), _quiet_torch_logs(), \
                torch.inference_mode(False):
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own notices
            program = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=names,
                                        dynamic_shapes=dyn, verbose=False, optimize=True,
                                        external_data=False)
            got = program.model.opset_imports.get("", opset)
            if got != opset:  # the exporter falls back to its own opset when conversion fails
                raise DarknetError(f"ONNX export: opset {opset} is not reachable for this model "
                                   f"(the exporter writes opset {got}; converting it down failed, "
                                   f"e.g. for Pad, which max-pool padding uses); use --opset {got}")
            program.save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, Exception) and not isinstance(e, (DarknetError, OSError)):
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DarknetError(f"ONNX export (opset {opset}) failed: {type(e).__name__}: "
                               f"{first}") from e
        raise
    return names
