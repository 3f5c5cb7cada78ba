"""Test-time augmentation: the Scaled-YOLOv4 recipe on a Darknet model.

Scaled-YOLOv4 (``models/yolo.py``, ``forward(augment=True)``) runs three passes and merges their
boxes before NMS: scale 1, scale 0.83 horizontally flipped, scale 0.67 (``s = [1, 0.83, 0.67]``,
``f = [None, lr-flip, None]``). Here each pass is Darknet's ``detector test`` pipeline at another
network size: the image (flipped for the second pass) is resized or letterboxed as the cfg says to
``round(scale * width / stride) * stride`` x ``round(scale * height / stride) * stride``, with
``stride`` the network's largest (input width / the coarsest detection grid), at least one stride
(Scaled-YOLOv4 resizes to the exact fraction and pads up to the stride instead; Darknet's
resize/letterbox needs the network size itself to be a multiple). ``get_network_boxes`` maps each
pass's boxes back to the original image (relative coordinates), a flipped pass's centres become
``1 - x``, all boxes are concatenated (pass order) and the model's NMS (the last detection layer's
``nms_kind``/``beta_nms``, as Darknet) runs once on the union.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .postprocess import Detections, HeadParams, get_network_boxes
from .preprocess import detector_input

__all__ = ["TTA_PASSES", "largest_stride", "tta_sizes", "merge_detections", "tta_detections"]

TTA_PASSES: Tuple[Tuple[float, bool], ...] = ((1.0, False), (0.83, True), (0.67, False))


def largest_stride(model) -> int:
    """Input width over the narrowest detection-layer grid (32 for YOLOv4, 64 for P6 ...)."""
    widths = [s.out_shape.w for s in model.heads]
    return max(1, model.width // min(widths)) if widths else 32


def tta_sizes(model, passes=TTA_PASSES) -> List[Tuple[int, int, bool]]:
    """(network width, height, flip) of each pass."""
    st = largest_stride(model)
    snap = lambda v, s: max(st, int(s * v / st + 0.5) * st)  # noqa: E731 (nearest multiple)
    return [(snap(model.width, s), snap(model.height, s), bool(f)) for s, f in passes]


def merge_detections(parts: Sequence[Detections]) -> Detections:
    """The boxes of several passes of one image, concatenated in pass order."""
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    uc = None if any(p.uc is None for p in parts) else cat("uc")
    return Detections(cat("boxes"), cat("objectness"), cat("probs"), cat("layer"), cat("anchor"),
                      cat("anchor_id"), cat("row"), cat("col"), uc)


def tta_detections(forward: Callable[[np.ndarray], List[Dict[int, np.ndarray]]],
                   images: Sequence[np.ndarray], heads: Mapping[int, HeadParams],
                   sizes: Sequence[Tuple[int, int, bool]], thresh: float,
                   letter_box: bool) -> List[Detections]:
    """Merged boxes (before NMS) of every pass for each float (3, H, W) image. ``forward`` runs
    a (N, 3, h, w) batch and returns per image ``{layer: (C, H, W)}`` (``Detector.forward``)."""
    per_image: List[List[Detections]] = [[] for _ in images]
    for w, h, flip in sizes:
        batch = np.stack([detector_input(np.ascontiguousarray(im[:, :, ::-1]) if flip else im,
                                         w, h, letter_box) for im in images])
        for k, (out, im) in enumerate(zip(forward(batch), images)):
            d = get_network_boxes(out, heads, w, h, im.shape[2], im.shape[1], thresh=thresh,
                                  letter_box=letter_box)
            if flip:
                d.boxes[:, 0] = np.float32(1) - d.boxes[:, 0]
            per_image[k].append(d)
    return [merge_detections(p) for p in per_image]
