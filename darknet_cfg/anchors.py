"""Anchors from the training labels: ``darknet detector calc_anchors`` (detector.c) and its
k-means (``do_kmeans`` in matrix.c).

What darknet does, reproduced here in float32:

* every box of every label file of ``train=`` becomes a point ``(w*width, h*height)``;
* initial centroids: ``random_centers``, ``k`` distinct boxes drawn at random (darknet seeds
  ``rand()`` with ``time(0)``, so its anchors change from run to run; here ``seed`` picks them,
  or ``init`` gives them);
* distance ``1 - IoU`` of two boxes sharing a corner (``dist``:
  ``inter = min(w)*min(h)``, ``union = w1*h1 + w2*h2 - inter``); each box goes to the first
  centroid with the smallest distance (``closest_center``);
* update: each centroid becomes the mean of its boxes (summed in box order); a coordinate
  that comes out 0 (an empty cluster) keeps its old value; with ``k == 1`` one update runs first;
* at most 1000 rounds, stopping when no assignment changes (``kmeans_expectation``);
* centroids sorted by area, smallest first; ``avg IoU`` = mean over boxes of the IoU with the
  closest centroid, in percent; anchors printed ``%3.0f,%3.0f`` (``%2.4f`` when width <= 32).

Where darknet only prints "Wrong label" for a box outside [0, 1] and still clusters it, the box is
reported and skipped here (``data.read_labels``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import DarknetError

__all__ = ["KMeansResult", "kmeans_anchors", "read_boxes_wh", "format_anchors", "set_cfg_anchors"]


@dataclass
class KMeansResult:
    anchors: np.ndarray        # (k, 2) float32, sorted by area
    assignments: np.ndarray    # (n,) cluster of each box (indices before sorting)
    iterations: int            # darknet's "iterations = %d"
    avg_iou: float             # percent, as printed


def _iou(wh: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(n, k) IoU of corner-aligned boxes as darknet's ``dist`` computes it, float32 step by
    step: ``inter = min(w)*min(h)``, ``union = (w1*h1 + w2*h2) - inter``; distance = 1 - IoU."""
    x, c = wh[:, None, :], centers[None, :, :]
    inter = np.minimum(x[..., 0], c[..., 0]) * np.minimum(x[..., 1], c[..., 1])
    union = (x[..., 0] * x[..., 1] + c[..., 0] * c[..., 1]) - inter
    return inter / union


def _maximization(wh: np.ndarray, assign: np.ndarray, centers: np.ndarray) -> np.ndarray:
    sums = np.zeros_like(centers)
    np.add.at(sums, assign, wh)                     # unbuffered: adds in box order, as darknet
    counts = np.bincount(assign, minlength=len(centers)).astype(np.float32)
    new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], sums)
    return np.where(new == 0, centers, new).astype(np.float32)


def kmeans_anchors(wh: np.ndarray, k: int, init: Optional[np.ndarray] = None,
                   seed: int = 0) -> KMeansResult:
    """Darknet's do_kmeans + calc_anchors' sorting and average IoU on (n, 2) box sizes."""
    wh = np.ascontiguousarray(wh, dtype=np.float32).reshape(-1, 2)
    n = len(wh)
    if k < 1:
        raise DarknetError(f"--num {k}: need at least one anchor")
    if n < k:
        raise DarknetError(f"{n} boxes in the labels: fewer than the {k} anchors asked for")
    if init is None:
        init = wh[np.random.default_rng(seed).permutation(n)[:k]]   # darknet: random_centers
    centers = np.array(init, dtype=np.float32).reshape(k, 2)
    assign = np.zeros(n, np.int64)                   # darknet: calloc
    if k == 1:
        centers = _maximization(wh, assign, centers)
    it = 0
    while it < 1000:
        # the first smallest distance, as closest_center
        new = np.argmin(np.float32(1) - _iou(wh, centers), axis=1)
        converged = bool((new == assign).all())
        assign = new
        if converged:
            break
        centers = _maximization(wh, assign, centers)
        it += 1
    area = centers[:, 0] * centers[:, 1]
    centers = centers[np.argsort(area, kind="stable")]
    iou = _iou(wh, centers)
    iou = iou[np.arange(n), np.argmin(np.float32(1) - iou, axis=1)]
    iou = np.where((iou > 1) | (iou < 0), np.float32(0), iou)   # darknet: "Wrong label", skipped
    total = np.cumsum(iou, dtype=np.float32)[-1]    # a float accumulated box by box
    avg = np.float32(np.float32(100) * total) / np.float32(n)
    return KMeansResult(centers, assign, it, float(avg))


def read_boxes_wh(data: str, width: int, height: int, report=None
                  ) -> Tuple[np.ndarray, List[int], int, str]:
    """(n, 2) ``(w*width, h*height)`` of every box of the train list of ``data``, boxes per
    class, the number of images and the list file. No box at all is an error naming the list."""
    from .data import DataError, label_path_for, read_data_file, read_labels, read_list
    d = read_data_file(data)
    if not d.train:
        raise DataError(f"{data}: no train= list")
    images = read_list(d.train)
    report = report or (lambda m: None)
    sizes, counts = [], [0] * max(d.classes, 1)
    missing = 0
    for p in images:
        lp = label_path_for(p)
        if not os.path.isfile(lp):
            missing += 1
            continue
        lab = read_labels(lp, max(d.classes, 1), report)
        for c in lab[:, 0].astype(int):
            counts[c] += 1
        sizes.append(lab[:, 3:5])
    wh = np.concatenate(sizes) if sizes else np.zeros((0, 2), np.float32)
    if not len(wh):
        why = f"{missing} of {len(images)} images have no label file" if missing else \
            f"the label files of its {len(images)} images hold no box"
        raise DataError(f"{d.train}: no labels to compute anchors from ({why})")
    wh = wh.astype(np.float32) * np.array([width, height], np.float32)
    return wh, counts, len(images), d.train


def format_anchors(anchors: np.ndarray, width: int) -> str:
    """darknet's anchors line: ``%3.0f,%3.0f`` pairs joined by ``, `` (``%2.4f`` if width <= 32)."""
    f = "{:3.0f},{:3.0f}" if width > 32 else "{:2.4f},{:2.4f}"
    return ", ".join(f.format(float(w), float(h)) for w, h in anchors)


def set_cfg_anchors(cfg, anchors_text: str, count: int):
    """A copy of ``cfg`` (a reader.Cfg) with ``anchors`` and ``num`` of every [yolo],
    [Gaussian_yolo] and [region] section replaced; masks are kept and must stay below ``count``."""
    from .reader import Cfg, Section
    value = "".join(anchors_text.split())
    sections = [Section(s.name, s.line, list(s.options)) for s in cfg.sections]
    heads = [s for s in sections if s.name in ("yolo", "Gaussian_yolo", "region")]
    if not heads:
        raise DarknetError(f"{cfg.path}: no [yolo], [Gaussian_yolo] or [region] layer to write "
                           "anchors into")
    for s in heads:
        mask = s.get("mask")
        if mask is not None:
            idx = [int(v) for v in mask.value.split("#")[0].split(",") if v.strip()]
            if idx and max(idx) >= count:
                raise DarknetError(f"{cfg.path}:{mask.line}: [{s.name}] mask={mask.value} uses "
                                   f"anchor {max(idx)} but --num is {count}")
        s.set("anchors", value)
        s.set("num", count)
    return Cfg(sections, cfg.path, cfg.text)


def anchors_report(res: KMeansResult, counts: Sequence[int], width: int) -> List[str]:
    """darknet's printout after the k-means (iterations, counters per class, avg IoU, anchors)."""
    return [f" iterations = {res.iterations} ", "",
            "counters_per_class = " + ", ".join(str(c) for c in counts), "",
            f" avg IoU = {res.avg_iou:2.2f} % ", "",
            "anchors = " + format_anchors(res.anchors, width)]
