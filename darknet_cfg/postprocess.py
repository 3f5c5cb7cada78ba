"""Darknet's box decoding (``get_network_boxes``) and NMS (``do_nms_sort`` / ``diounms_sort``).

Inputs are the outputs of the detection layers as darknet's forward pass leaves them (after
the layer's own activations), one (C, H, W) array or tensor per layer and image:

* ``[yolo]``: ``n*(5+classes)`` channels, per anchor slot ``[x, y, w, h, obj, cls...]``;
* ``[Gaussian_yolo]``: ``n*(9+classes)``, per slot ``[x, sx, y, sy, w, sw, h, sh, obj, cls...]``;
* ``[region]``: ``num*(coords+1+classes)``; darknet's CPU layer stores (H, W, num, K), which
  must be transposed to (num*K, H, W) first (``oracle_io.region_output_to_chw``).

The arithmetic follows darknet's C expressions (float32 where darknet uses float, float64
then rounded where it calls ``exp``/``pow`` or divides by a double), so boxes agree with
darknet to float rounding and threshold decisions (``> thresh``, ``> nms``) are the same.
Computation is numpy; torch tensors are accepted as input.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import numpy as np

from .prefilter import HeadCandidates

__all__ = ["HeadParams", "Detections", "get_network_boxes", "do_nms", "nms_orders", "darknet_order",
           "box_iou_matrix", "NMS_KINDS"]

NMS_KINDS = ("default", "greedynms", "diounms", "cornersnms")
HEAD_KINDS = ("yolo", "Gaussian_yolo", "region")

# darknet's YOLO_POINT enum (Gaussian_yolo ``yolo_point=``)
YOLO_CENTER, YOLO_LEFT_TOP, YOLO_RIGHT_BOTTOM = 1, 2, 4

_F = np.float32


@dataclass(frozen=True)
class HeadParams:
    """What box decoding needs from one ``[yolo]`` / ``[Gaussian_yolo]`` / ``[region]`` layer.

    ``anchors`` is the flat list of ALL anchors of the section (``num`` pairs; pixels for
    yolo / Gaussian_yolo, grid units for region); ``mask`` the anchor ids this layer uses
    (region: ``0..num-1``). ``yolo_point`` only matters for Gaussian_yolo (1 = centre).
    """
    kind: str
    classes: int
    mask: Tuple[int, ...]
    anchors: Tuple[float, ...]
    scale_x_y: float = 1.0
    new_coords: int = 0
    nms_kind: str = "default"
    beta_nms: float = 0.6
    coords: int = 4
    num: int = 0
    yolo_point: int = YOLO_CENTER

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"HeadParams: unknown detection layer kind {self.kind!r} "
                             f"(expected one of {', '.join(HEAD_KINDS)})")
        object.__setattr__(self, "mask", tuple(int(m) for m in self.mask))
        object.__setattr__(self, "anchors", tuple(float(a) for a in self.anchors))

    @property
    def n(self) -> int:
        """Anchor slots of this layer."""
        return len(self.mask)

    @property
    def entries(self) -> int:
        """Channels per anchor slot."""
        if self.kind == "yolo":
            return 5 + self.classes
        if self.kind == "Gaussian_yolo":
            return 9 + self.classes
        return self.coords + 1 + self.classes

    @classmethod
    def from_layout_layer(cls, layer: Mapping) -> "HeadParams":
        """Build from one entry of a layout.json ``layers`` list (oracle format)."""
        kind = layer["type"]
        p = layer["params"]
        if kind in ("yolo", "Gaussian_yolo"):
            return cls(kind=kind, classes=int(p["classes"]), mask=p["mask"], anchors=p["anchors"],
                       scale_x_y=float(p.get("scale_x_y", 1.0)),
                       new_coords=int(p.get("new_coords", 0)),
                       nms_kind=str(p.get("nms_kind", "default")),
                       beta_nms=float(p.get("beta_nms", 0.6)), coords=4,
                       num=int(p.get("num", len(p["anchors"]) // 2)),
                       yolo_point=int(p.get("yolo_point", YOLO_CENTER)))
        if kind == "region":
            if p.get("has_softmax_tree") or p.get("has_map"):
                raise NotImplementedError(
                    f"layer {layer.get('index')}: [region] with a softmax tree / map is not supported")
            num = int(p["num"])
            # darknet leaves l.beta_nms of a [region] layer at 0; only "default" NMS applies.
            return cls(kind=kind, classes=int(p["classes"]), mask=tuple(range(num)),
                       anchors=p["anchors"], nms_kind="default", beta_nms=0.0,
                       coords=int(p.get("coords", 4)), num=num)
        raise ValueError(f"layer {layer.get('index')}: type {kind!r} is not a detection layer")

    @classmethod
    def from_spec(cls, spec) -> "HeadParams":
        """Build from a parsed layer spec (``model.heads``: YoloSpec, GaussianYoloSpec, RegionSpec).

        Real values are rounded to float32, as darknet stores them. A mask id at or past ``num`` (cspx-p7-mish) gets the anchor the cfg lists, as the model
        does (darknet reads past its array there); ``num`` grows to cover it.
        """
        kind = spec.type
        f32 = lambda v: float(np.float32(v))
        if kind in ("yolo", "Gaussian_yolo"):
            anchors = list(spec.all_anchors)
            num = int(spec.num)
            top = max(spec.mask, default=-1) + 1
            if top > num:
                anchors += [0.0] * (2 * (top - num))
                num = top
            for slot, m in enumerate(spec.mask):  # spec.anchors: one pair per mask entry
                anchors[2 * m: 2 * m + 2] = spec.anchors[2 * slot: 2 * slot + 2]
            point = str(spec.train.get("yolo_point", "center"))
            yolo_point = {"left_top": YOLO_LEFT_TOP, "right_bottom": YOLO_RIGHT_BOTTOM}.get(
                point, YOLO_CENTER)
            return cls(kind=kind, classes=int(spec.classes), mask=spec.mask,
                       anchors=[f32(a) for a in anchors], scale_x_y=f32(spec.scale_x_y),
                       new_coords=int(spec.new_coords), nms_kind=str(spec.nms_kind),
                       beta_nms=f32(spec.beta_nms), coords=4, num=num, yolo_point=yolo_point)
        if kind == "region":
            if spec.tree or spec.train.get("map"):
                raise NotImplementedError(
                    f"layer {spec.index}: [region] with a softmax tree / map is not supported")
            return cls(kind=kind, classes=int(spec.classes), mask=tuple(range(spec.num)),
                       anchors=[f32(a) for a in spec.anchors], nms_kind="default", beta_nms=0.0,
                       coords=int(spec.coords), num=int(spec.num))
        raise NotImplementedError(f"layer {spec.index}: box decoding for [{spec.section}] layers "
                                  f"is not supported (only [yolo], [Gaussian_yolo], [region])")


@dataclass
class Detections:
    """Boxes of one image, in darknet's ``get_network_boxes`` order (N boxes).

    ``boxes`` (N, 4) float32 ``x, y, w, h`` (centre and size as fractions of the original
    image), ``objectness`` (N,), ``probs`` (N, classes) (0 unless above the threshold),
    provenance ``layer, anchor`` (slot in the mask), ``anchor_id`` (``mask[anchor]``),
    ``row, col`` (N,) int64, ``uc`` (N, 4) Gaussian_yolo sigmas (zeros for other heads) or None.
    """
    boxes: np.ndarray
    objectness: np.ndarray
    probs: np.ndarray
    layer: np.ndarray
    anchor: np.ndarray
    anchor_id: np.ndarray
    row: np.ndarray
    col: np.ndarray
    uc: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def classes(self) -> int:
        return int(self.probs.shape[1])

    def take(self, idx) -> "Detections":
        """The boxes ``idx`` (indices or a mask), in that order."""
        return Detections(self.boxes[idx], self.objectness[idx], self.probs[idx], self.layer[idx],
                          self.anchor[idx], self.anchor_id[idx], self.row[idx], self.col[idx],
                          None if self.uc is None else self.uc[idx])

    def with_probs(self, probs: np.ndarray) -> "Detections":
        """A copy with other class probabilities (e.g. after NMS)."""
        return Detections(self.boxes.copy(), self.objectness.copy(), probs, self.layer.copy(),
                          self.anchor.copy(), self.anchor_id.copy(), self.row.copy(),
                          self.col.copy(), None if self.uc is None else self.uc.copy())


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a (C, H, W) detection-layer output, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _anchor_table(head: HeadParams, layer_index) -> np.ndarray:
    """(n, 2) float32 anchors of the layer's mask slots.

    Darknet reads only the first ``2*num`` anchor values; a mask id past them reads beyond the
    array (undefined behaviour; the recorded CPU build read 0, e.g. cspx-p7-mish's last head).
    We use 0 there too, with a warning.
    """
    anchors = np.asarray(head.anchors, dtype=np.float32)
    num = head.num if head.num > 0 else len(anchors) // 2
    anchors = anchors[: 2 * num]
    out = np.zeros((head.n, 2), dtype=np.float32)
    bad = []
    for slot, m in enumerate(head.mask):
        if 0 <= m and 2 * m + 1 < len(anchors):
            out[slot] = anchors[2 * m: 2 * m + 2]
        else:
            bad.append(m)
    if bad:
        warnings.warn(f"detection layer {layer_index}: mask ids {bad} have no anchor among the "
                      f"first num={num} pairs; darknet reads past its anchor array there, "
                      f"using w = h = 0", RuntimeWarning, stacklevel=3)
    return out


def _cells(out: np.ndarray, head: HeadParams, layer_index) -> np.ndarray:
    """(C, H, W) -> (H*W*n, entries): cells row-major, anchor slots inner (darknet's order)."""
    _, H, W = out.shape
    K = _check_channels(out, head, layer_index)
    return out.reshape(head.n, K, H, W).transpose(2, 3, 0, 1).reshape(H * W * head.n, K)


def _check_channels(out: np.ndarray, head: HeadParams, layer_index) -> int:
    C, K = out.shape[0], head.entries
    if C != head.n * K:
        raise ValueError(f"detection layer {layer_index}: output has {C} channels, expected "
                         f"{head.n}*{K} = {head.n * K} for a [{head.kind}] layer with "
                         f"{head.classes} classes and {head.n} anchors")
    return K


def _decode_layer(out, head: HeadParams, layer_index, net_w: int, net_h: int,
                  thresh: np.float32):
    """Darknet's get_yolo_detections / get_gaussian_yolo_detections / custom_get_region_detections
    for one layer, before correct_yolo_boxes. Returns a dict of per-box arrays."""
    n = head.n
    if isinstance(out, HeadCandidates):  # prefiltered on the device (prefilter.py): same rows
        if head.kind == "region":
            raise ValueError(f"detection layer {layer_index}: [region] layers emit every box; "
                             f"pass the full output, not candidates")
        H, W = out.height, out.width
        if out.channels != n * head.entries:
            _check_channels(np.empty((out.channels, 0, 0), _F), head, layer_index)
        v = out.values[:, :head.entries]
        row, col, slot = out.row, out.col, out.slot
        if thresh != out.thresh:  # candidates passed another threshold
            if not thresh > out.thresh:
                raise ValueError(f"detection layer {layer_index}: candidates were prefiltered at "
                                 f"objectness > {out.thresh}, cannot decode at thresh {thresh}")
            keep = v[:, 4 if head.kind == "yolo" else 8] > thresh
            v, row, col, slot = v[keep], row[keep], col[keep], slot[keep]
    elif head.kind == "region":  # every cell becomes a box
        _, H, W = out.shape
        v = _cells(out, head, layer_index)
        cell = np.arange(H * W * n)
        slot = cell % n
        row = (cell // n) // W
        col = (cell // n) % W
    else:  # only the cells whose objectness passes, gathered in darknet's (row, col, anchor) order
        _, H, W = out.shape
        per = out.reshape(n, _check_channels(out, head, layer_index), H, W)
        obj = per[:, 4 if head.kind == "yolo" else 8].transpose(1, 2, 0)     # (H, W, n)
        row, col, slot = np.nonzero(obj > thresh)  # strict; NaN never passes
        v = per[slot, :, row, col]                                          # (k, entries)
    anchors = _anchor_table(head, layer_index)
    aw, ah = anchors[slot, 0], anchors[slot, 1]
    uc = None

    if head.kind == "region":
        if head.coords != 4:
            raise NotImplementedError(f"layer {layer_index}: [region] with coords={head.coords}")
        # every (cell, anchor) becomes a box with objectness 1; sigmoid on x, y at decode time
        x = (col.astype(_F) + _sigmoid(v[:, 0])) / _F(W)
        y = (row.astype(_F) + _sigmoid(v[:, 1])) / _F(H)
        w = (np.exp(v[:, 2].astype(np.float64)) * aw / W).astype(_F)  # double exp, then float
        h = (np.exp(v[:, 3].astype(np.float64)) * ah / H).astype(_F)
        scale = v[:, 4]  # sigmoid(obj), applied by the layer's forward
        probs = scale[:, None] * v[:, 5:5 + head.classes]
        probs = np.where(probs > thresh, probs, _F(0))
        objectness = np.ones(len(v), dtype=_F)  # custom_get_region_detections sets 1
        keep = np.ones(len(v), dtype=bool)
    elif head.kind == "yolo":
        objectness = v[:, 4]
        x = (col.astype(_F) + v[:, 0]) / _F(W)
        y = (row.astype(_F) + v[:, 1]) / _F(H)
        if head.new_coords:
            # float expression tw*tw*4*anchor/net_w (tw already a logistic from the conv)
            w = v[:, 2] * v[:, 2] * _F(4) * aw / _F(net_w)
            h = v[:, 3] * v[:, 3] * _F(4) * ah / _F(net_h)
        else:  # exp(x) * anchor / net_w evaluated in double, stored as float
            w = (np.exp(v[:, 2].astype(np.float64)) * aw / net_w).astype(_F)
            h = (np.exp(v[:, 3].astype(np.float64)) * ah / net_h).astype(_F)
        probs = objectness[:, None] * v[:, 5:5 + head.classes]  # not exclusive: many classes per box
        probs = np.where(probs > thresh, probs, _F(0))
    else:  # Gaussian_yolo
        objectness = v[:, 8]
        w = (np.exp(v[:, 4].astype(np.float64)) * aw / net_w).astype(_F)
        h = (np.exp(v[:, 6].astype(np.float64)) * ah / net_h).astype(_F)
        x = (col.astype(_F) + v[:, 0]) / _F(W)
        y = (row.astype(_F) + v[:, 2]) / _F(H)
        if head.yolo_point == YOLO_LEFT_TOP:
            x, y = x + w / _F(2), y + h / _F(2)
        elif head.yolo_point == YOLO_RIGHT_BOTTOM:
            x, y = x - w / _F(2), y - h / _F(2)
        uc = np.stack([v[:, 1], v[:, 3], v[:, 5], v[:, 7]], axis=1)
        # float sum of the 4 sigmas, /4.0 in double; prob = (obj*cls) * (1.0 - uc_aver) in double
        uc_aver = (((uc[:, 0] + uc[:, 1]) + uc[:, 2]) + uc[:, 3]).astype(np.float64) / 4.0
        uc_aver = uc_aver.astype(_F).astype(np.float64)
        probs = ((objectness[:, None] * v[:, 9:9 + head.classes]).astype(np.float64)
                 * (1.0 - uc_aver)[:, None]).astype(_F)
        probs = np.where(probs > thresh, probs, _F(0))

    anchor_id = np.asarray(head.mask, dtype=np.int64)[slot] if len(slot) else slot.astype(np.int64)
    return dict(boxes=np.stack([x, y, w, h], axis=1).astype(_F), objectness=objectness.astype(_F),
                probs=probs.astype(_F), anchor=slot.astype(np.int64), anchor_id=anchor_id,
                row=row.astype(np.int64), col=col.astype(np.int64), uc=uc)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Darknet's ``logistic_activate``: ``1.f/(1.f + expf(-x))`` in float32.

    expf is taken as the correctly rounded float of the double exp (numpy's own float32 exp
    may differ by an ulp); with that, region-box x, y match darknet bit for bit.
    """
    e = np.exp(-x.astype(np.float64)).astype(_F)
    return _F(1) / (_F(1) + e)


def _correct_boxes(boxes: np.ndarray, kind: str, image_w: int, image_h: int, net_w: int,
                   net_h: int, letter_box: bool) -> np.ndarray:
    """Darknet's correct_yolo_boxes (relative=1): undo the letterbox; no clipping.

    ``x = (x - (net_w-new_w)/2/net_w) / (new_w/net_w)`` evaluated in double; ``w *= 1/ratio``
    (yolo, region) or ``w *= net_w/new_w`` (Gaussian_yolo's own copy of the function).
    Without letterbox ``new_w = net_w`` and nothing changes.
    """
    if not letter_box:
        return boxes
    from .preprocess import letterbox_size
    new_w, new_h = letterbox_size(image_w, image_h, net_w, net_h)
    ratiow = _F(new_w) / _F(net_w)
    ratioh = _F(new_h) / _F(net_h)
    out = boxes.copy()
    out[:, 0] = ((boxes[:, 0].astype(np.float64) - float(_F(net_w - new_w)) / 2.0 / net_w)
                 / float(ratiow)).astype(_F)
    out[:, 1] = ((boxes[:, 1].astype(np.float64) - float(_F(net_h - new_h)) / 2.0 / net_h)
                 / float(ratioh)).astype(_F)
    # Build quirk not reproduced: darknet's -Ofast CPU build vectorises 1/ratio into a
    # reciprocal estimate plus one Newton step (1/1.0 -> 0.99999994, 1/0.75 -> 1.3333333), so
    # its w, h come out 1 ulp low even without letterbox; we keep the IEEE quotient
    # (the estimate depends on the CPU's rcpps table).
    if kind == "Gaussian_yolo":
        out[:, 2] = boxes[:, 2] * (_F(net_w) / _F(new_w))
        out[:, 3] = boxes[:, 3] * (_F(net_h) / _F(new_h))
    else:
        out[:, 2] = boxes[:, 2] * (_F(1) / ratiow)
        out[:, 3] = boxes[:, 3] * (_F(1) / ratioh)
    return out


def get_network_boxes(outputs: Mapping[int, object], heads: Mapping[int, HeadParams],
                      net_w: int, net_h: int, image_w: int, image_h: int,
                      thresh: float = 0.25, letter_box: bool = False) -> Detections:
    """Darknet's ``get_network_boxes(net, image_w, image_h, thresh, hier, 0, relative=1, ...)``.

    ``outputs[i]`` is the (C, H, W) output of detection layer ``i`` for one image (or, for
    yolo / Gaussian_yolo, its ``prefilter.HeadCandidates``: the same result) and
    ``heads[i]`` its parameters. Layers are visited in index order, cells row-major,
    anchor slots inner. yolo / Gaussian_yolo emit a box for each slot with ``obj > thresh``;
    region emits every (cell, anchor) with objectness 1. Class probabilities are
    ``obj*cls`` (Gaussian: ``*(1-mean(sigmas))``; region: ``sigmoid(obj)*softmax``) and are
    set to 0 unless ``> thresh``.
    """
    if set(outputs) != set(heads):
        raise ValueError(f"get_network_boxes: outputs for layers {sorted(outputs)} but head "
                         f"parameters for layers {sorted(heads)}")
    if not heads:
        raise ValueError("get_network_boxes: no detection layers")
    classes = {h.classes for h in heads.values()}
    if len(classes) != 1:
        raise ValueError(f"get_network_boxes: detection layers disagree on classes: "
                         f"{ {i: h.classes for i, h in heads.items()} }")
    n_cls = classes.pop()
    th = _F(thresh)
    parts = []
    for li in sorted(heads):
        head = heads[li]
        out = outputs[li]
        if not isinstance(out, HeadCandidates):
            out = _to_numpy(out)
        d = _decode_layer(out, head, li, int(net_w), int(net_h), th)
        d["boxes"] = _correct_boxes(d["boxes"], head.kind, int(image_w), int(image_h),
                                    int(net_w), int(net_h), bool(letter_box))
        d["layer"] = np.full(len(d["boxes"]), li, dtype=np.int64)
        parts.append(d)

    def cat(key, shape_tail=(), dtype=_F):
        arrs = [p[key] for p in parts]
        return np.concatenate(arrs) if arrs else np.zeros((0,) + shape_tail, dtype)

    uc = None
    if any(p["uc"] is not None for p in parts):
        uc = np.concatenate([p["uc"] if p["uc"] is not None
                             else np.zeros((len(p["boxes"]), 4), _F) for p in parts])
    return Detections(boxes=cat("boxes", (4,)), objectness=cat("objectness"),
                      probs=cat("probs", (n_cls,)), layer=cat("layer", dtype=np.int64),
                      anchor=cat("anchor", dtype=np.int64), anchor_id=cat("anchor_id", dtype=np.int64),
                      row=cat("row", dtype=np.int64), col=cat("col", dtype=np.int64), uc=uc)


# ----------------------------------------------------------------------------- NMS

def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Darknet's ``box_iou`` for every pair (rows of a, rows of b), float32 like box.c.

    ``overlap = min(r1, r2) - max(l1, l2)`` per axis with ``l = x - w/2``; intersection 0 if
    either overlap is negative; ``union = a.w*a.h + b.w*b.h - I``; IoU 0 when I or U is 0.
    """
    iou, _ = _pair_terms(a, b, need_diou=False)
    return iou


def _pair_terms(a: np.ndarray, b: np.ndarray, need_diou: bool, outer: bool = True):
    """IoU (and DIoU's d²/c², c²) of every pair of rows of a and b; ``outer=False``: of the
    pairs (a[k], b[k]) only (the same float32 expressions, element by element)."""
    a, b = np.asarray(a, dtype=_F), np.asarray(b, dtype=_F)
    if outer:
        a, b = a[:, None, :], b[None, :, :]
    half = _F(2)
    ax, ay, aw, ah = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    bx, by, bw, bh = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    al, ar, at, ab = ax - aw / half, ax + aw / half, ay - ah / half, ay + ah / half
    bl, br, bt, bb = bx - bw / half, bx + bw / half, by - bh / half, by + bh / half
    ow = np.minimum(ar, br) - np.maximum(al, bl)
    oh = np.minimum(ab, bb) - np.maximum(at, bt)
    inter = np.where((ow < 0) | (oh < 0), _F(0), ow * oh)
    union = (aw * ah + bw * bh) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where((inter == 0) | (union == 0), _F(0), inter / union).astype(_F)
    if not need_diou:
        return iou, None
    # box_c: the smallest box enclosing both; c = diagonal², d = centre distance²
    cw = np.maximum(ar, br) - np.minimum(al, bl)
    ch = np.maximum(ab, bb) - np.minimum(at, bt)
    c = cw * cw + ch * ch
    d = (ax - bx) * (ax - bx) + (ay - by) * (ay - by)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = d / c
    return iou, (ratio, c)


def _diou_matrix(a: np.ndarray, b: np.ndarray, exponent: float, outer: bool = True) -> np.ndarray:
    """``iou - pow(d/c, exponent)`` (pow in double, result float); plain IoU where c == 0.
    ``outer=False``: for the pairs (a[k], b[k]) only."""
    iou, (ratio, c) = _pair_terms(a, b, need_diou=True, outer=outer)
    with np.errstate(invalid="ignore"):
        u = np.power(ratio.astype(np.float64), exponent).astype(_F)
    return np.where(c == 0, iou, iou - u).astype(_F)


def _active_order(objectness: np.ndarray) -> np.ndarray:
    """The boxes that take part in NMS, in the order Darknet's swap loop leaves them: a box
    with objectness 0 among the first ``total`` (= boxes with objectness != 0) changes place
    with the last box with objectness != 0 not yet moved."""
    zero = np.asarray(objectness) == 0
    order = np.arange(len(zero))
    total = int(len(zero) - zero.sum())
    holes = np.flatnonzero(zero[:total])
    order[holes] = (total + np.flatnonzero(~zero[total:]))[::-1]
    return order[:total]


def _qsort_keys(probs: np.ndarray) -> np.ndarray:
    """Per-class keys whose stable ascending sort is Darknet's qsort of that class: probability
    descending, the zeros (all equal) last; a NaN counts as non-zero and goes after the numbers,
    as ``argsort`` of ``-prob`` leaves it."""
    key = np.where(probs != 0, -probs, np.float32(1)).astype(probs.dtype, copy=False)
    key[np.isnan(probs)] = 0.5
    return key


def nms_orders(dets: Detections, classes=None, final: bool = True):
    """Darknet's array order during ``do_nms_sort`` / ``diounms_sort``.

    Returns ``(final, per_class)``: ``per_class[k]`` lists the boxes with ``prob[k] != 0``
    (objectness != 0 only) in the order of class k's greedy pass, ``final`` the order the array
    is left in (the order ``validate_detector_map`` and the ``-out`` writers then walk). Each
    class's ``qsort`` by ``prob[k]`` descending reorders the whole array in place, and glibc's
    qsort is a merge sort (stable), so boxes with equal ``prob[k]`` keep the order of the
    previous class's sort. The keys are the probabilities before NMS (class k's pass only
    changes ``prob[k]``). A chain of stable sorts by key 0, 1, ..., K-1 is one lexicographic
    sort by (key K-1, ..., key 0, initial place): ``final`` is one ``lexsort``, and class k's
    order is its own key's, with the order before class k (a ``lexsort`` by the earlier keys)
    deciding only where two of its non-zero probabilities tie.
    ``classes``: the classes whose order is wanted in ``per_class`` (default all);
    ``final=False``: skip ``final`` (None), which NMS itself does not need."""
    order = _active_order(dets.objectness)
    n, n_classes = len(order), dets.probs.shape[1]
    key = _qsort_keys(dets.probs[order])                       # (n, K), rows in initial order
    init = np.arange(n)
    last = order[np.lexsort((init,) + tuple(key.T))] if n_classes and final else \
        (order if final else None)
    want = list(range(n_classes)) if classes is None else sorted({int(k) for k in classes})
    per_class = {}
    if not want or n == 0:
        return last, {k: order[:0] for k in want}
    kw = key[:, want]
    # any sort will do: among distinct keys the order is fixed, and the classes where two
    # non-zero keys tie are sorted again below with Darknet's tie-break (zeros are cut off)
    srt = np.argsort(np.ascontiguousarray(kw.T), axis=1).T
    sk = np.take_along_axis(kw, srt, axis=0)
    counts = (dets.probs[order][:, want] != 0).sum(axis=0)
    tied = ((sk[1:] == sk[:-1]) & (init[1:, None] < counts[None, :])).any(axis=0)
    for ci, k in enumerate(want):
        idx = srt[:counts[ci], ci]
        if tied[ci]:  # equal probabilities: the order the previous classes' sorts left decides
            before = np.empty(n, np.int64)
            before[np.lexsort((init,) + tuple(key[:, :k].T))] = init
            idx = np.lexsort((before, key[:, k]))[:counts[ci]]
        per_class[k] = order[idx]
    return last, per_class


def darknet_order(dets: Detections) -> np.ndarray:
    """Permutation that puts ``dets`` (before NMS) in the order Darknet's NMS leaves its array:
    the boxes that took part, as ``nms_orders`` gives them, then those with objectness 0."""
    final, _ = nms_orders(dets, classes=())
    rest = np.setdiff1d(np.arange(len(dets)), final, assume_unique=True)
    return np.concatenate([final, rest]).astype(np.int64)


def do_nms(dets: Detections, nms_thresh: float = 0.45, kind: str = "default",
           beta_nms: float = 0.6) -> Detections:
    """Darknet's ``do_nms_sort`` (kind ``default``) / ``diounms_sort`` (other kinds).

    Returns a copy of ``dets`` (same order) whose ``probs`` have the suppressed entries set to 0.
    Boxes with objectness 0 take no part. For each class k, in the order ``nms_orders`` gives
    (prob[k] descending, ties in the order Darknet's stable qsort leaves them): each box i with
    ``prob[k] != 0`` zeroes ``prob[k]`` of every later box j whose score exceeds ``nms_thresh``
    (strict). Scores: ``default`` and ``cornersnms`` -> IoU; ``greedynms`` ->
    ``IoU - (d²/c²)^0.6`` (darknet's box_diou, fixed exponent, beta_nms ignored); ``diounms`` ->
    ``IoU - (d²/c²)^beta_nms``. Darknet leaves its array permuted (``darknet_order``); this
    function keeps the input order.
    """
    if kind not in NMS_KINDS:
        raise ValueError(f"do_nms: unknown nms kind {kind!r} (expected one of {', '.join(NMS_KINDS)})")
    th = _F(nms_thresh)
    probs = dets.probs.copy()
    if kind == "greedynms":
        exponent = 0.6  # box_diou: pow(d/c, 0.6), a double literal; beta_nms is ignored
    elif kind == "diounms":
        exponent = float(_F(beta_nms))  # box_diounms: float beta1 promoted to double
    else:
        exponent = None  # default; cornersnms suppresses on IoU > thresh exactly like default

    _, per_class = nms_orders(dets, final=False)
    for k, order in per_class.items():  # darknet skips exactly-zero entries: not listed
        if len(order) < 2:
            continue
        cb = dets.boxes[order]
        alive = np.ones(len(order), dtype=bool)
        for i in range(len(order) - 1):
            if not alive[i]:  # an already-suppressed box does not suppress
                continue
            later = i + 1 + np.flatnonzero(alive[i + 1:])
            if len(later) == 0:
                break
            if exponent is None:
                score = box_iou_matrix(cb[i:i + 1], cb[later])[0]
            else:
                score = _diou_matrix(cb[i:i + 1], cb[later], exponent)[0]
            alive[later[score > th]] = False
        probs[order[~alive], k] = 0
    return dets.with_probs(probs)
