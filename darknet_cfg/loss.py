"""Darknet's detection-layer training losses ([yolo] and [region]) for PyTorch.

Darknet does not differentiate a loss: the layer's forward writes ``l.delta`` directly, and
``backward`` adds it unchanged to the delta of the layer's INPUT (the conv output), i.e.
``l.delta = -dL/d(layer input)``.  The reported ``l.cost`` is a separate number (a squared error of
those deltas, plus an IoU term for giou/diou/ciou) whose gradient is *not* the delta.

So the functions here compute Darknet's delta exactly (float64 arithmetic on the float32 layer
outputs, no autograd), and return a scalar whose VALUE is Darknet's ``l.cost`` and whose GRADIENT
with respect to ``head_input`` is ``-delta``.  ``yolo_loss`` is vectorised (any device, no host
synchronisation, a custom autograd Function); ``yolo_loss_reference`` and ``region_loss`` are
direct transcriptions of Darknet's loops and use the surrogate

    loss = cost + (S - S.detach()),   S = -(delta * head_input).sum()

``S - S.detach()`` is exactly 0.0, so the value is the cost.  Summing the losses of all detection
layers gives Darknet's gradient; Darknet's network cost is the MEAN of the layer costs.

Delta conventions (README "Sign and scale convention"): for [yolo] with ``new_coords=0`` the layer
applies the logistic itself, so x/y/objectness/class deltas are ``c*(target - sigmoid)`` with no
sigmoid' factor (a BCE-on-logits gradient); with ``new_coords=1`` the logistic lives in the conv
before the layer, so autograd through that activation supplies sigmoid'.  [region] deltas for x, y,
objectness already contain sigmoid'.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["YoloLossParams", "RegionLossParams", "yolo_forward", "region_forward", "yolo_loss",
           "yolo_loss_reference", "region_loss", "LossStats", "FLT_MAX"]

FLT_MAX = 3.4028234663852886e38
_IOU_KINDS = ("mse", "iou", "giou", "diou", "ciou")


def _f32(v) -> float:
    """Round a Python number to the nearest float32 (Darknet keeps every parameter as float)."""
    v = float(v)
    if not math.isfinite(v):
        return v
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _to_float(v: float) -> float:
    """What storing a double into a C float does to magnitude: overflow becomes +-inf."""
    return math.copysign(math.inf, v) if (not math.isnan(v) and abs(v) > FLT_MAX) else v


def _fix_nan_inf(v: float) -> float:
    return 0.0 if (math.isnan(v) or math.isinf(v)) else v


def _exp(v: float) -> float:
    """exp() that overflows to inf like C instead of raising."""
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def _log(v: float) -> float:
    """log() with C's results for 0 (-inf) and negative input (nan)."""
    return math.log(v) if v > 0 else (-math.inf if v == 0 else math.nan)


def _sqrt(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan


def _logistic(v: float) -> float:
    return 1.0 / (1.0 + _exp(-v))


def _div(a: float, b: float) -> float:
    """IEEE division (x/0 -> +-inf or nan) as C computes it, instead of raising."""
    if b == 0:
        return math.nan if (a == 0 or math.isnan(a)) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def _as_list(v, conv=float) -> List:
    if v is None:
        return []
    if isinstance(v, str):
        return [conv(x) for x in v.split("#")[0].split(",") if x.strip()]
    return [conv(x) for x in v]


# ------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class YoloLossParams:
    """Every field ``forward_yolo_layer`` reads during training (defaults = Darknet's parse_yolo)."""
    classes: int = 20
    mask: Tuple[int, ...] = (0,)
    anchors: Tuple[float, ...] = ()          # all `num` (w, h) pairs, pixels
    num: int = 1                             # total anchors (l.total)
    scale_x_y: float = 1.0
    new_coords: int = 0
    ignore_thresh: float = 0.5
    truth_thresh: float = 1.0
    iou_thresh: float = 1.0
    iou_thresh_kind: str = "iou"             # iou / giou / diou / ciou
    iou_loss: str = "mse"                    # mse / iou / giou / diou / ciou
    iou_normalizer: float = 0.75
    obj_normalizer: float = 1.0
    cls_normalizer: float = 1.0              # only used together with classes_multipliers
    delta_normalizer: float = 1.0            # parsed, not used by the CPU forward
    max_delta: float = FLT_MAX
    label_smooth_eps: float = 0.0
    objectness_smooth: int = 0
    focal_loss: int = 0
    classes_multipliers: Optional[Tuple[float, ...]] = None   # from counters_per_class
    max_boxes: int = 200
    show_details: int = 1                    # 1: cost = iou term + obj_normalizer * sum(non-box delta^2)

    def __post_init__(self):
        if self.iou_loss not in _IOU_KINDS:
            raise ValueError(f"[yolo] iou_loss={self.iou_loss!r} not one of {_IOU_KINDS}")
        if self.iou_thresh_kind not in _IOU_KINDS:
            raise ValueError(f"[yolo] iou_thresh_kind={self.iou_thresh_kind!r} not one of {_IOU_KINDS}")
        if len(self.anchors) < 2 * self.num:
            raise ValueError(f"[yolo] needs {2 * self.num} anchor values, got {len(self.anchors)}")
        if any(m < 0 or m >= self.num for m in self.mask):
            raise ValueError(f"[yolo] mask {self.mask} out of range for num={self.num}")

    @property
    def n(self) -> int:
        """Anchors of this layer (``l.n`` = len(mask))."""
        return len(self.mask)

    @classmethod
    def from_layout_params(cls, params: dict) -> "YoloLossParams":
        """Build from a layout.json [yolo] layer's ``params`` dict (or any dict with these keys).
        ``classes_multipliers`` may be given directly or as ``counters_per_class`` (then computed
        like Darknet: ``max_count / count`` with counts < 1 set to 1, capped at ``max_delta``)."""
        p = params
        num = int(p.get("num", 1))
        mask = tuple(int(m) for m in _as_list(p.get("mask"), int)) or tuple(range(num))
        anchors = tuple(_f32(a) for a in _as_list(p.get("anchors")))
        if not anchors:
            anchors = (0.5,) * (2 * num)     # make_yolo_layer's default biases
        max_delta = _f32(p.get("max_delta", FLT_MAX))
        mult = p.get("classes_multipliers")
        if mult is not None:
            mult = tuple(_f32(m) for m in _as_list(mult))
        elif p.get("counters_per_class") is not None:
            counts = [max(int(c), 1) for c in _as_list(p["counters_per_class"], int)]
            top = float(max(counts))
            mult = tuple(min(_f32(top / c), max_delta) for c in counts)
        iou_loss = str(p.get("iou_loss", "mse"))
        if iou_loss not in _IOU_KINDS:
            iou_loss = "iou"                 # parse_yolo: any unknown name means plain IoU
        return cls(
            classes=int(p.get("classes", 20)), mask=mask, anchors=anchors, num=num,
            scale_x_y=_f32(p.get("scale_x_y", 1)), new_coords=int(p.get("new_coords", 0)),
            ignore_thresh=_f32(p.get("ignore_thresh", 0.5)), truth_thresh=_f32(p.get("truth_thresh", 1)),
            iou_thresh=_f32(p.get("iou_thresh", 1)), iou_thresh_kind=str(p.get("iou_thresh_kind", "iou")),
            iou_loss=iou_loss, iou_normalizer=_f32(p.get("iou_normalizer", 0.75)),
            obj_normalizer=_f32(p.get("obj_normalizer", 1)), cls_normalizer=_f32(p.get("cls_normalizer", 1)),
            delta_normalizer=_f32(p.get("delta_normalizer", 1)), max_delta=max_delta,
            label_smooth_eps=_f32(p.get("label_smooth_eps", 0)),
            objectness_smooth=int(p.get("objectness_smooth", 0)), focal_loss=int(p.get("focal_loss", 0)),
            classes_multipliers=mult, max_boxes=int(p.get("max_boxes", 200)),
            show_details=int(p.get("show_details", 1)))


@dataclass(frozen=True)
class RegionLossParams:
    """Every field ``forward_region_layer`` (YOLOv2) reads during training (defaults = parse_region)."""
    classes: int = 20
    coords: int = 4
    num: int = 1
    anchors: Tuple[float, ...] = ()          # num (w, h) pairs in GRID units
    softmax: int = 0
    bias_match: int = 0
    rescore: int = 0
    thresh: float = 0.5
    coord_scale: float = 1.0
    object_scale: float = 1.0
    noobject_scale: float = 1.0
    class_scale: float = 1.0
    classfix: int = 0
    focal_loss: int = 0
    absolute: int = 0                        # parsed; the CPU layer always uses absolute sizes (DOABS)
    max_boxes: int = 200
    has_softmax_tree: int = 0
    has_map: int = 0

    def __post_init__(self):
        if self.coords != 4:
            raise NotImplementedError("[region] with coords != 4 is not supported")
        if self.has_softmax_tree:
            raise NotImplementedError("[region] with a softmax tree is not supported")
        if self.has_map:
            raise NotImplementedError("[region] with a class map is not supported")
        if len(self.anchors) < 2 * self.num:
            raise ValueError(f"[region] needs {2 * self.num} anchor values, got {len(self.anchors)}")

    @classmethod
    def from_layout_params(cls, params: dict) -> "RegionLossParams":
        """Build from a layout.json [region] layer's ``params`` dict."""
        p = params
        num = int(p.get("num", 1))
        anchors = tuple(_f32(a) for a in _as_list(p.get("anchors"))) or (0.5,) * (2 * num)
        return cls(
            classes=int(p.get("classes", 20)), coords=int(p.get("coords", 4)), num=num, anchors=anchors,
            softmax=int(p.get("softmax", 0)), bias_match=int(p.get("bias_match", 0)),
            rescore=int(p.get("rescore", 0)), thresh=_f32(p.get("thresh", 0.5)),
            coord_scale=_f32(p.get("coord_scale", 1)), object_scale=_f32(p.get("object_scale", 1)),
            noobject_scale=_f32(p.get("noobject_scale", 1)), class_scale=_f32(p.get("class_scale", 1)),
            classfix=int(p.get("classfix", 0)), focal_loss=int(p.get("focal_loss", 0)),
            absolute=int(p.get("absolute", 0)), max_boxes=int(p.get("max_boxes", 200)),
            has_softmax_tree=int(p.get("has_softmax_tree", 0)), has_map=int(p.get("has_map", 0)))


# ------------------------------------------------------------------------ scalar box geometry
# Boxes are (x, y, w, h) tuples of Python floats (double precision), centre format.

def _overlap(x1, w1, x2, w2):
    return min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2)


def _intersection(a, b) -> float:
    w, h = _overlap(a[0], a[2], b[0], b[2]), _overlap(a[1], a[3], b[1], b[3])
    return 0.0 if (w < 0 or h < 0) else w * h


def _box_iou(a, b) -> float:
    """box.c box_iou: 0 when there is no overlap or the union is 0."""
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    if inter == 0 or union == 0:
        return 0.0
    return inter / union


def _enclosing(a, b):
    """(left, right, top, bottom) of the smallest box around a and b."""
    return (min(a[0] - a[2] / 2, b[0] - b[2] / 2), max(a[0] + a[2] / 2, b[0] + b[2] / 2),
            min(a[1] - a[3] / 2, b[1] - b[3] / 2), max(a[1] + a[3] / 2, b[1] + b[3] / 2))


def _box_giou(a, b) -> float:
    l, r, t, bo = _enclosing(a, b)
    c = (r - l) * (bo - t)
    iou = _box_iou(a, b)
    if c == 0:
        return iou
    union = a[2] * a[3] + b[2] * b[3] - _intersection(a, b)
    return iou - (c - union) / c


def _box_diou(a, b) -> float:
    l, r, t, bo = _enclosing(a, b)
    c = (r - l) ** 2 + (bo - t) ** 2
    iou = _box_iou(a, b)
    if c == 0:
        return iou
    d = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    return iou - (d / c) ** 0.6          # Darknet quirk: DIoU penalty raised to a fixed 0.6


def _box_ciou(a, b) -> float:
    l, r, t, bo = _enclosing(a, b)
    c = (r - l) ** 2 + (bo - t) ** 2
    iou = _box_iou(a, b)
    if c == 0:
        return iou
    d = ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) / c
    v = 4 / (math.pi ** 2) * (math.atan(_div(b[2], b[3])) - math.atan(_div(a[2], a[3]))) ** 2
    alpha = _div(v, 1 - iou + v + 0.000001)
    return iou - (d + alpha * v)


def _box_iou_kind(a, b, kind: str) -> float:
    return {"giou": _box_giou, "diou": _box_diou, "ciou": _box_ciou}.get(kind, _box_iou)(a, b)


def _dx_box_iou(pred, truth, kind: str) -> Tuple[float, float, float, float]:
    """Darknet's own (approximate) IoU gradient ``dx_box_iou`` -> (dx, dy, dw, dh), the direction
    that INCREASES the (G/D/C)IoU, in units of the relative box coordinates.

    Not the exact derivative: the intersection is not clamped at 0, w/h terms are
    ``d/dright - d/dleft`` without the 1/2, and for giou/diou/ciou a non-overlapping pair keeps only
    the penalty-term gradient."""
    px, py, pw, ph = pred
    tx, ty, tw, th = truth
    top, bot, left, right = py - ph / 2, py + ph / 2, px - pw / 2, px + pw / 2
    pt, pb, pl, pr = min(top, bot), max(top, bot), min(left, right), max(left, right)
    tt, tb, tl, tr = ty - th / 2, ty + th / 2, tx - tw / 2, tx + tw / 2
    area_p = (pb - pt) * (pr - pl)
    area_t = (tb - tt) * (tr - tl)
    ih = min(pb, tb) - max(pt, tt)
    iw = min(pr, tr) - max(pl, tl)
    inter = iw * ih                      # Darknet quirk: not clamped, negative/bogus without overlap
    union = area_p + area_t - inter
    s2 = (px - tx) ** 2 + (py - ty) ** 2
    cw_g = max(pr, tr) - min(pl, tl)
    ch_g = max(pb, tb) - min(pt, tt)
    c_g = cw_g * ch_g
    no_overlap = iw <= 0 or ih <= 0

    # partial derivatives w.r.t. the prediction's (top, bottom, left, right)
    dX = (-(pr - pl), pr - pl, -(pb - pt), pb - pt)
    dI = (-iw if pt > tt else 0.0, iw if pb < tb else 0.0, -ih if pl > tl else 0.0, ih if pr < tr else 0.0)
    dU = tuple(x - i for x, i in zip(dX, dI))
    dC = (-cw_g if pt < tt else 0.0, cw_g if pb > tb else 0.0, -ch_g if pl < tl else 0.0, ch_g if pr > tr else 0.0)

    p = [0.0, 0.0, 0.0, 0.0]             # d IoU / d(t, b, l, r)
    if union > 0:
        p = [(union * dI[k] - inter * dU[k]) / (union * union) for k in range(4)]
    if not top < bot:                    # corner selection for a flipped box
        p[0] = p[1]
    if not left < right:
        p[2] = p[3]
    if kind == "giou":
        g = [_div(c_g * dU[k] - union * dC[k], c_g * c_g) for k in range(4)]
        if c_g > 0:
            p = [p[k] + g[k] for k in range(4)]
        if no_overlap:                   # no overlap: only the enclosing-box term
            p = g
    dt, db, dl, dr = p
    dx, dy = dl + dr, dt + db
    dw, dh = dr - dl, db - dt            # Darknet quirk: not halved

    if kind in ("diou", "ciou"):
        cl, cr = min(px - pw / 2, tx - tw / 2), max(px + pw / 2, tx + tw / 2)
        ct, cb = min(py - ph / 2, ty - th / 2), max(py + ph / 2, ty + th / 2)
        cw, ch = cr - cl, cb - ct
        c = cw * cw + ch * ch
        # derivatives of the enclosing box's width (by x, w) and height (by y, h)
        dcw_dx = (1.0 if pr > tr else 0.0) - (1.0 if pl < tl else 0.0)
        dcw_dw = (0.5 if pr > tr else 0.0) - (-0.5 if pl < tl else 0.0)
        dch_dy = (1.0 if pb > tb else 0.0) - (1.0 if pt < tt else 0.0)
        dch_dh = (0.5 if pb > tb else 0.0) - (-0.5 if pt < tt else 0.0)
        ew = eh = 0.0
        if kind == "ciou":               # aspect-ratio term, alpha from the unclamped I/U
            d_atan = math.atan(_div(tw, th)) - math.atan(_div(pw, ph))
            ar_loss = 4 / (math.pi * math.pi) * d_atan * d_atan
            alpha = _div(ar_loss, 1 - _div(inter, union) + ar_loss + 0.000001)
            ew = alpha * (8 / (math.pi * math.pi) * d_atan * ph)
            eh = alpha * (-8 / (math.pi * math.pi) * d_atan * pw)
        if c > 0 or no_overlap:
            cc = c * c
            qx = _div(2 * (tx - px) * c - (2 * cw * dcw_dx) * s2, cc)
            qy = _div(2 * (ty - py) * c - (2 * ch * dch_dy) * s2, cc)
            qw = _div((2 * cw * dcw_dw) * s2, cc) + ew
            qh = _div((2 * ch * dch_dh) * s2, cc) + eh
            if no_overlap:               # no overlap: the IoU part is dropped
                dx, dy, dw, dh = qx, qy, qw, qh
            else:
                dx, dy, dw, dh = dx + qx, dy + qy, dw + qw, dh + qh
    return dx, dy, dw, dh


# ------------------------------------------------------------------------ vectorised helpers
def _iou_grid(px, py, pw, ph, tx, ty, tw, th) -> Tensor:
    """box_iou for broadcastable float64 tensors."""
    iw = torch.minimum(px + pw / 2, tx + tw / 2) - torch.maximum(px - pw / 2, tx - tw / 2)
    ih = torch.minimum(py + ph / 2, ty + th / 2) - torch.maximum(py - ph / 2, ty - th / 2)
    inter = torch.where((iw < 0) | (ih < 0), torch.zeros_like(iw), iw * ih)
    union = pw * ph + tw * th - inter
    ok = (inter != 0) & (union != 0)
    return torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)), torch.zeros_like(inter))


def _best_iou(px: Tensor, py: Tensor, pw: Tensor, ph: Tensor, tt: Tensor, valid: Tensor):
    """Best box_iou of every prediction with the truths of its image, and the first truth that
    has it (as ``_iou_grid(...).max(-1)``).  px..ph: (N, P); tt: (N, T, 4); valid: (N, T).
    Computed in blocks of predictions that stay in cache (the CPU) or in one go (a GPU)."""
    N, P = px.shape
    T = tt.shape[1]
    tx, ty, tw, th = (tt[:, None, :, k] for k in range(4))
    tl, tr, tt_, tb = tx - tw / 2, tx + tw / 2, ty - th / 2, ty + th / 2
    ta = tw * th
    inval = ~valid[:, None, :]
    step = P if px.device.type != "cpu" else max(1, (1 << 16) // max(1, N * T))
    best, idx = [], []
    for s in range(0, P, step):
        bx, by, bw, bh = (v[:, s:s + step, None] for v in (px, py, pw, ph))
        iw = torch.minimum(bx + bw / 2, tr)
        iw.sub_(torch.maximum(bx - bw / 2, tl))
        ih = torch.minimum(by + bh / 2, tb)
        ih.sub_(torch.maximum(by - bh / 2, tt_))
        neg = (iw < 0).logical_or_(ih < 0)
        inter = iw.mul_(ih).masked_fill_(neg, 0.0)
        union = (bw * bh + ta).sub_(inter)
        bad = (inter == 0).logical_or_(union == 0)
        iou = inter.div_(union.masked_fill_(bad, 1.0)).masked_fill_(bad, 0.0)
        m, k = iou.masked_fill_(inval, -math.inf).max(dim=-1)
        best.append(m)
        idx.append(k)
    return torch.cat(best, 1), torch.cat(idx, 1)


def _truths_per_image(targets: Tensor, batch: int, max_boxes: int) -> List[List[Tuple[float, ...]]]:
    """Split (M, 6) [image, class, x, y, w, h] into per-image lists of (x, y, w, h, class, row) in
    row order, as Darknet's ``state.truth`` buffer would hold them (row: index in ``targets``)."""
    out: List[List[Tuple[float, ...]]] = [[] for _ in range(batch)]
    if targets is None or targets.numel() == 0:
        return out
    rows = targets.detach().to("cpu", torch.float32).reshape(-1, 6).tolist()
    ended = [False] * batch
    for row, (img, cls, x, y, w, h) in enumerate(rows):
        b = int(img)
        if b < 0 or b >= batch or ended[b]:
            continue
        if x == 0:                       # Darknet quirk: a truth with x == 0 ends the list
            ended[b] = True
            continue
        if len(out[b]) < max_boxes:
            out[b].append((x, y, w, h, float(cls), row))
    return out


def _cell(v: float, size: int) -> int:
    """``int(truth.x * l.w)`` in float32 arithmetic (truncation)."""
    return int(_f32(_f32(v) * float(size)))


def _surrogate(cost: float, delta: Tensor, head_input: Tensor) -> Tensor:
    """Scalar with value ``cost`` and gradient ``-delta`` w.r.t. head_input."""
    s = -(delta.to(head_input.dtype) * head_input).sum()
    return torch.tensor(cost, dtype=head_input.dtype, device=head_input.device) + (s - s.detach())


# ------------------------------------------------------------------------------------ [yolo]
def yolo_forward(head_input: Tensor, params: YoloLossParams) -> Tensor:
    """Darknet's [yolo] CPU forward: (N, n*(5+C), H, W) -> same shape.
    new_coords=0: logistic on x, y, objectness, classes (w, h raw); new_coords=1: nothing (the conv
    before has activation=logistic).  Then x, y -> x*scale_x_y - 0.5*(scale_x_y - 1)."""
    N, C, H, W = head_input.shape
    n, K = params.n, params.classes + 5
    if C != n * K:
        raise ValueError(f"[yolo] input has {C} channels, expected {n}*({params.classes}+5)")
    x = head_input.reshape(N, n, K, H, W)
    if not params.new_coords:
        x = torch.cat([torch.sigmoid(x[:, :, :2]), x[:, :, 2:4], torch.sigmoid(x[:, :, 4:])], dim=2)
    s = params.scale_x_y
    if s != 1:
        x = torch.cat([x[:, :, :2] * s - 0.5 * (s - 1), x[:, :, 2:]], dim=2)
    return x.reshape(N, C, H, W)


def _yolo_box_from(ox, oy, ow, oh, i, j, aw, ah, p, lw, lh, net_w, net_h):
    x, y = (i + ox) / lw, (j + oy) / lh
    if p.new_coords:
        return x, y, ow * ow * 4 * aw / net_w, oh * oh * 4 * ah / net_h
    return x, y, _to_float(_exp(ow) * aw / net_w), _to_float(_exp(oh) * ah / net_h)


def yolo_loss_reference(head_input: Tensor, targets: Tensor, params: YoloLossParams, net_w: int,
                        net_h: int, seen: int = 0) -> Tuple[Tensor, Dict]:
    """Darknet's [yolo] training loss (forward_yolo_layer / process_batch, CPU build), as a direct
    transcription of its loops (one Python step per truth): the specification that the vectorised
    ``yolo_loss`` is tested against.

    head_input: (N, n*(5+C), H, W) raw input of the layer (the conv output).
    targets: (M, 6) rows [image_index, class, x, y, w, h], box relative to the network input.
    Returns ``(loss, stats)``: ``loss`` has Darknet's ``l.cost`` as value and ``-l.delta`` as
    gradient w.r.t. head_input.  ``stats``: ``cost``, the printed ``avg_iou, count, class_loss,
    iou_loss, total_loss`` (per image, as printed), the unprinted averages, ``delta`` and ``output``
    (Darknet's ``l.delta`` / ``l.output``, float32, shape of head_input).  ``seen`` is unused by
    [yolo] (kept for symmetry with region_loss)."""
    p = params
    N, C, H, W = head_input.shape
    n, K, NC = p.n, p.classes + 5, p.classes
    with torch.no_grad():
        out32 = yolo_forward(head_input.detach(), p)
    o = out32.detach().to("cpu", torch.float64).reshape(N, n, K, H, W)
    delta = torch.zeros_like(o)
    truths = _truths_per_image(targets, N, p.max_boxes)
    mult = p.classes_multipliers
    assignments: List[Dict] = []
    st = dict(tot_iou=0.0, tot_iou_loss=0.0, tot_giou_loss=0.0, count=0, class_count=0, recall=0.0,
              recall75=0.0, avg_cat=0.0, avg_obj=0.0, avg_anyobj=0.0, rewritten_bbox=0, total_bbox=0)

    gx = torch.arange(W, dtype=torch.float64).view(1, 1, W)
    gy = torch.arange(H, dtype=torch.float64).view(1, H, 1)
    aw = torch.tensor([p.anchors[2 * m] for m in p.mask], dtype=torch.float64).view(n, 1, 1)
    ah = torch.tensor([p.anchors[2 * m + 1] for m in p.mask], dtype=torch.float64).view(n, 1, 1)

    def box_delta(b, a, j, i, truth, anchor_id, iou_norm):
        """delta_yolo_box (accumulating) -> (iou, giou) of the prediction."""
        d, ob = delta[b, a], o[b, a]
        if any(d[k, j, i].item() != 0 for k in range(4)):
            st["rewritten_bbox"] += 1
        aw_, ah_ = p.anchors[2 * anchor_id], p.anchors[2 * anchor_id + 1]
        xs = [ob[k, j, i].item() for k in range(4)]
        pred = _yolo_box_from(*xs, i, j, aw_, ah_, p, W, H, net_w, net_h)
        iou, giou = _box_iou(pred, truth), _box_giou(pred, truth)
        pred = (pred[0], pred[1], pred[2] if pred[2] != 0 else 1.0, pred[3] if pred[3] != 0 else 1.0)
        if p.iou_loss == "mse":
            scale = 2 - truth[2] * truth[3]
            tx, ty = truth[0] * W - i, truth[1] * H - j
            if p.new_coords:
                tw, th = _sqrt(truth[2] * net_w / (4 * aw_)), _sqrt(truth[3] * net_h / (4 * ah_))
            else:
                tw, th = _log(truth[2] * net_w / aw_), _log(truth[3] * net_h / ah_)
            for k, t in enumerate((tx, ty, tw, th)):
                d[k, j, i] += _f32(scale * (t - xs[k]) * iou_norm)
        else:
            dx, dy, dw, dh = _dx_box_iou(pred, truth, p.iou_loss)
            if not p.new_coords:         # exp' only for w, h (new_coords: no chain factor at all)
                dw, dh = dw * _exp(xs[2]), dh * _exp(xs[3])
            for k, v in enumerate((dx, dy, dw, dh)):
                v = _fix_nan_inf(_to_float(v * iou_norm))
                v = max(-p.max_delta, min(p.max_delta, v))
                d[k, j, i] += _f32(v)
        return iou, giou

    def class_delta(b, a, j, i, cls, count_cat):
        """delta_yolo_class."""
        d, ob = delta[b, a], o[b, a]
        y1 = 1.0 if not p.label_smooth_eps else 1.0 * (1 - p.label_smooth_eps) + 0.5 * p.label_smooth_eps
        y0 = 0.0 if not p.label_smooth_eps else 0.5 * p.label_smooth_eps
        if d[5 + cls, j, i].item() != 0:  # Darknet quirk: class already has a delta -> only it is set
            r = y1 - ob[5 + cls, j, i].item()
            if math.isfinite(r):
                d[5 + cls, j, i] = r
            if mult is not None:
                d[5 + cls, j, i] *= mult[cls]
            if count_cat:
                st["avg_cat"] += ob[5 + cls, j, i].item()
            return
        probs = ob[5:, j, i]
        if p.focal_loss:
            pt = ob[5 + cls, j, i].item() + 1e-15
            grad = -(1 - pt) * (2 * pt * _log(pt) + pt - 1)
            onehot = torch.zeros(NC, dtype=torch.float64)
            onehot[cls] = 1
            d[5:, j, i] = (onehot - probs) * (0.5 * grad)
        else:
            target = torch.full((NC,), y0, dtype=torch.float64)
            target[cls] = y1
            r = target - probs
            d[5:, j, i] = torch.where(torch.isfinite(r), r, d[5:, j, i])
            if mult is not None:         # cls_normalizer only acts through counters_per_class
                d[5 + cls, j, i] *= mult[cls] * p.cls_normalizer
        if count_cat:
            st["avg_cat"] += ob[5 + cls, j, i].item()

    def assign(b, a, j, i, truth, cls, anchor_id, row):
        """One truth -> anchor assignment of the truth loop."""
        cm = mult[cls] if mult is not None else 1.0
        iou, giou = box_delta(b, a, j, i, truth, anchor_id, p.iou_normalizer * cm)
        assignments.append(dict(image=b, target=row, anchor_id=anchor_id, slot=a, cell=(j, i), iou=iou))
        st["total_bbox"] += 1
        st["tot_iou"] += iou
        st["tot_iou_loss"] += 1 - iou
        st["tot_giou_loss"] += 1 - giou
        ov = o[b, a, 4, j, i].item()
        st["avg_obj"] += ov
        if p.objectness_smooth:          # keeps an objectness delta already set
            if delta[b, a, 4, j, i].item() == 0:
                delta[b, a, 4, j, i] = cm * p.obj_normalizer * (1 - ov)
        else:
            delta[b, a, 4, j, i] = cm * p.obj_normalizer * (1 - ov)
        class_delta(b, a, j, i, cls, True)
        st["count"] += 1
        st["class_count"] += 1
        st["recall"] += iou > 0.5
        st["recall75"] += iou > 0.75

    for b in range(N):
        ob = o[b]
        tb = [t for t in truths[b] if 0 <= int(t[4]) < NC]   # bad class ids are skipped
        # --- every prediction: no-object delta, ignore by best IoU (vectorised over cells/anchors)
        px, py = (gx + ob[:, 0]) / W, (gy + ob[:, 1]) / H
        if p.new_coords:
            pw, ph = ob[:, 2] ** 2 * 4 * aw / net_w, ob[:, 3] ** 2 * 4 * ah / net_h
        else:
            pw, ph = torch.exp(ob[:, 2]) * aw / net_w, torch.exp(ob[:, 3]) * ah / net_h
        obj = ob[:, 4]
        st["avg_anyobj"] += obj.sum().item()
        if tb:
            tt = torch.tensor([t[:4] for t in tb], dtype=torch.float64)
            ious = _iou_grid(px[..., None], py[..., None], pw[..., None], ph[..., None],
                             tt[:, 0], tt[:, 1], tt[:, 2], tt[:, 3])          # (n, H, W, T)
            best_iou, best_t = ious.max(dim=-1)                                # first max wins
        else:
            best_iou = torch.zeros_like(obj)
            best_t = torch.zeros_like(obj, dtype=torch.long)
        # only anchors where ANY class prob > 0.25 can be ignored (compare_yolo_class)
        class_match = (ob[:, 5:] > 0.25).any(dim=1)
        best_match = torch.where(class_match, best_iou, torch.zeros_like(best_iou))
        d_obj = p.obj_normalizer * (0 - obj)
        ign = best_match > p.ignore_thresh
        if p.objectness_smooth:
            d_obj = torch.where(ign, torch.maximum(d_obj, p.obj_normalizer * (best_match - obj)), d_obj)
        else:
            d_obj = torch.where(ign, torch.zeros_like(d_obj), d_obj)
        delta[b, :, 4] = d_obj
        # --- predictions whose best IoU exceeds truth_thresh become positives (truth_thresh=1: never)
        for a, j, i in (best_iou > p.truth_thresh).nonzero().tolist():
            t = tb[best_t[a, j, i].item()]
            cls = int(t[4])
            iou_mult = best_iou[a, j, i].item() ** 2
            ov = ob[a, 4, j, i].item()
            delta[b, a, 4, j, i] = p.obj_normalizer * ((iou_mult if p.objectness_smooth else 1) - ov)
            class_delta(b, a, j, i, cls, False)
            cm = mult[cls] if mult is not None else 1.0
            if p.objectness_smooth:
                delta[b, a, 5 + cls, j, i] = cm * (iou_mult - ob[a, 5 + cls, j, i].item())
            box_delta(b, a, j, i, t[:4], p.mask[a], p.iou_normalizer * cm)
            st["total_bbox"] += 1
        # --- every truth: its best anchor (by shape, over ALL anchors) if in this layer's mask,
        #     plus (iou_thresh < 1) every other masked anchor whose shape IoU > iou_thresh
        for t in tb:
            truth, cls = t[:4], int(t[4])
            i, j = _cell(truth[0], W), _cell(truth[1], H)
            i, j = min(max(i, 0), W - 1), min(max(j, 0), H - 1)   # x == 1.0 would index past the row
            shape = (0.0, 0.0, truth[2], truth[3])
            best_n, best = 0, 0.0
            for k in range(p.num):
                iou = _box_iou((0.0, 0.0, p.anchors[2 * k] / net_w, p.anchors[2 * k + 1] / net_h), shape)
                if iou > best:
                    best, best_n = iou, k
            if best_n in p.mask:
                assign(b, p.mask.index(best_n), j, i, truth, cls, best_n, t[5])
            if p.iou_thresh < 1.0:
                for k in range(p.num):
                    if k == best_n or k not in p.mask:
                        continue
                    anchor = (0.0, 0.0, p.anchors[2 * k] / net_w, p.anchors[2 * k + 1] / net_h)
                    if _box_iou_kind(anchor, shape, p.iou_thresh_kind) > p.iou_thresh:
                        assign(b, p.mask.index(k), j, i, truth, cls, k, t[5])
        # --- iou_thresh < 1: box deltas of every anchor with an objectness delta are divided by the
        #     number of its classes with a positive delta (averages_yolo_deltas)
        if p.iou_thresh < 1.0:
            db = delta[b]
            npos = (db[:, 5:] > 0).sum(dim=1).to(torch.float64)                # (n, H, W)
            sel = (db[:, 4] != 0) & (npos > 0)
            db[:, :4] = torch.where(sel[:, None], db[:, :4] / npos.clamp(min=1)[:, None], db[:, :4])

    delta32 = delta.to(torch.float32)
    d64 = delta32.to(torch.float64)
    total = (d64 * d64).sum().item()
    non_box = (d64[:, :, 4:] ** 2).sum().item()
    count = st["count"] if st["count"] else 1             # Darknet prints count = 1 when none
    class_count = st["class_count"] if st["class_count"] else 1
    class_loss = p.obj_normalizer * non_box              # Darknet quirk: scaled by obj_normalizer
    if not p.show_details or p.iou_loss == "mse":
        cost = total
    else:
        iou_term = st["tot_giou_loss"] if p.iou_loss == "giou" else st["tot_iou_loss"]
        cost = p.iou_normalizer * iou_term / count + class_loss   # plain IoU (1-GIoU for giou)
    stats = dict(
        cost=cost, avg_iou=st["tot_iou"] / count, count=count, n_assigned=st["count"],
        class_loss=class_loss / N, iou_loss=(total - class_loss) / N, total_loss=total / N,
        avg_class=st["avg_cat"] / class_count, avg_obj=st["avg_obj"] / count,
        avg_noobj=st["avg_anyobj"] / (W * H * n * N), recall50=st["recall"] / count,
        recall75=st["recall75"] / count, tot_iou=st["tot_iou"], tot_iou_loss=st["tot_iou_loss"],
        tot_giou_loss=st["tot_giou_loss"], rewritten_bbox=st["rewritten_bbox"],
        total_bbox=st["total_bbox"], assignments=assignments,
        delta=delta32.reshape(N, C, H, W).to(head_input.device), output=out32)
    return _surrogate(cost, stats["delta"], head_input), stats


# ------------------------------------------------------------------ [yolo], vectorised
# The same arithmetic as yolo_loss_reference, operation for operation, on tensors.  Python's
# min(a, b) / max(a, b) (which keep ``a`` unless ``b`` is strictly smaller / larger, also for NaN)
# are reproduced by _pmin / _pmax instead of torch.minimum / maximum (which propagate NaN).

def _pmin(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b < a, b, a)


def _pmax(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > a, b, a)


def _t_overlap(x1, w1, x2, w2):
    return _pmin(x1 + w1 / 2, x2 + w2 / 2) - _pmax(x1 - w1 / 2, x2 - w2 / 2)


def _t_intersection(a, b) -> Tensor:
    w, h = _t_overlap(a[0], a[2], b[0], b[2]), _t_overlap(a[1], a[3], b[1], b[3])
    return torch.where((w < 0) | (h < 0), torch.zeros_like(w), w * h)


def _t_box_iou(a, b) -> Tensor:
    inter = _t_intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    bad = (inter == 0) | (union == 0)
    return torch.where(bad, torch.zeros_like(inter), inter / torch.where(bad, torch.ones_like(union), union))


def _t_enclosing(a, b):
    return (_pmin(a[0] - a[2] / 2, b[0] - b[2] / 2), _pmax(a[0] + a[2] / 2, b[0] + b[2] / 2),
            _pmin(a[1] - a[3] / 2, b[1] - b[3] / 2), _pmax(a[1] + a[3] / 2, b[1] + b[3] / 2))


def _t_safe_div(a: Tensor, c: Tensor) -> Tensor:
    """a / c where c != 0 (the scalar code never divides there)."""
    return a / torch.where(c == 0, torch.ones_like(c), c)


def _t_box_giou(a, b) -> Tensor:
    l, r, t, bo = _t_enclosing(a, b)
    c = (r - l) * (bo - t)
    iou = _t_box_iou(a, b)
    union = a[2] * a[3] + b[2] * b[3] - _t_intersection(a, b)
    return torch.where(c == 0, iou, iou - _t_safe_div(c - union, c))


def _t_box_iou_kind(a, b, kind: str) -> Tensor:
    """_box_iou_kind on tensors (pow / atan may differ from libm by an ulp)."""
    if kind not in ("giou", "diou", "ciou"):
        return _t_box_iou(a, b)
    if kind == "giou":
        return _t_box_giou(a, b)
    l, r, t, bo = _t_enclosing(a, b)
    c = (r - l) * (r - l) + (bo - t) * (bo - t)
    iou = _t_box_iou(a, b)
    d = (a[0] - b[0]) * (a[0] - b[0]) + (a[1] - b[1]) * (a[1] - b[1])
    if kind == "diou":
        return torch.where(c == 0, iou, iou - torch.pow(_t_safe_div(d, c), 0.6))
    d = _t_safe_div(d, c)
    da = torch.atan(b[2] / b[3]) - torch.atan(a[2] / a[3])
    v = 4 / (math.pi ** 2) * (da * da)
    alpha = v / (1 - iou + v + 0.000001)
    return torch.where(c == 0, iou, iou - (d + alpha * v))


def _t_dx_box_iou(pred, truth, kind: str):
    """_dx_box_iou on tensors: (dx, dy, dw, dh)."""
    px, py, pw, ph = pred
    tx, ty, tw, th = truth
    z = torch.zeros_like(px)
    top, bot, left, right = py - ph / 2, py + ph / 2, px - pw / 2, px + pw / 2
    pt, pb, pl, pr = _pmin(top, bot), _pmax(top, bot), _pmin(left, right), _pmax(left, right)
    tt, tb, tl, tr = ty - th / 2, ty + th / 2, tx - tw / 2, tx + tw / 2
    area_p = (pb - pt) * (pr - pl)
    area_t = (tb - tt) * (tr - tl)
    ih = _pmin(pb, tb) - _pmax(pt, tt)
    iw = _pmin(pr, tr) - _pmax(pl, tl)
    inter = iw * ih
    union = area_p + area_t - inter
    s2 = (px - tx) * (px - tx) + (py - ty) * (py - ty)
    cw_g = _pmax(pr, tr) - _pmin(pl, tl)
    ch_g = _pmax(pb, tb) - _pmin(pt, tt)
    c_g = cw_g * ch_g
    no_overlap = (iw <= 0) | (ih <= 0)
    dX = (-(pr - pl), pr - pl, -(pb - pt), pb - pt)
    dI = (torch.where(pt > tt, -iw, z), torch.where(pb < tb, iw, z),
          torch.where(pl > tl, -ih, z), torch.where(pr < tr, ih, z))
    dU = tuple(x - i for x, i in zip(dX, dI))
    dC = (torch.where(pt < tt, -cw_g, z), torch.where(pb > tb, cw_g, z),
          torch.where(pl < tl, -ch_g, z), torch.where(pr > tr, ch_g, z))
    upos = union > 0
    uu = torch.where(upos, union * union, torch.ones_like(union))
    p = [torch.where(upos, (union * dI[k] - inter * dU[k]) / uu, z) for k in range(4)]
    flip_v, flip_h = ~(top < bot), ~(left < right)
    p[0] = torch.where(flip_v, p[1], p[0])
    p[2] = torch.where(flip_h, p[3], p[2])
    if kind == "giou":
        g = [(c_g * dU[k] - union * dC[k]) / (c_g * c_g) for k in range(4)]
        p = [torch.where(no_overlap, g[k], torch.where(c_g > 0, p[k] + g[k], p[k])) for k in range(4)]
    dt, db, dl, dr = p
    dx, dy = dl + dr, dt + db
    dw, dh = dr - dl, db - dt
    if kind in ("diou", "ciou"):
        one, half = torch.ones_like(px), torch.full_like(px, 0.5)
        cl, cr = _pmin(px - pw / 2, tx - tw / 2), _pmax(px + pw / 2, tx + tw / 2)
        ct, cb = _pmin(py - ph / 2, ty - th / 2), _pmax(py + ph / 2, ty + th / 2)
        cw, ch = cr - cl, cb - ct
        c = cw * cw + ch * ch
        dcw_dx = torch.where(pr > tr, one, z) - torch.where(pl < tl, one, z)
        dcw_dw = torch.where(pr > tr, half, z) - torch.where(pl < tl, -half, z)
        dch_dy = torch.where(pb > tb, one, z) - torch.where(pt < tt, one, z)
        dch_dh = torch.where(pb > tb, half, z) - torch.where(pt < tt, -half, z)
        ew = eh = z
        if kind == "ciou":
            d_atan = torch.atan(tw / th) - torch.atan(pw / ph)
            ar_loss = 4 / (math.pi * math.pi) * d_atan * d_atan
            alpha = ar_loss / (1 - inter / union + ar_loss + 0.000001)
            ew = alpha * (8 / (math.pi * math.pi) * d_atan * ph)
            eh = alpha * (-8 / (math.pi * math.pi) * d_atan * pw)
        cc = c * c
        qx = (2 * (tx - px) * c - (2 * cw * dcw_dx) * s2) / cc
        qy = (2 * (ty - py) * c - (2 * ch * dch_dy) * s2) / cc
        qw = (2 * cw * dcw_dw) * s2 / cc + ew
        qh = (2 * ch * dch_dh) * s2 / cc + eh
        use = (c > 0) | no_overlap
        dx = torch.where(no_overlap, qx, torch.where(use, dx + qx, dx))
        dy = torch.where(no_overlap, qy, torch.where(use, dy + qy, dy))
        dw = torch.where(no_overlap, qw, torch.where(use, dw + qw, dw))
        dh = torch.where(no_overlap, qh, torch.where(use, dh + qh, dh))
    return dx, dy, dw, dh


def _t_f32(v: Tensor) -> Tensor:
    """Round float64 to float32 and back (overflow -> inf, like _f32)."""
    return v.to(torch.float32).to(torch.float64)


def _t_to_float(v: Tensor) -> Tensor:
    return torch.where(v.abs() > FLT_MAX, torch.copysign(torch.full_like(v, math.inf), v), v)


def _t_box_deltas(p: YoloLossParams, xs: Tensor, i: Tensor, j: Tensor, aw: Tensor, ah: Tensor,
                  truth: Tensor, iou_norm: Tensor, W: int, H: int, net_w: int, net_h: int):
    """delta_yolo_box for A predictions at once -> (float32-rounded box deltas (A, 4) to ADD,
    iou (A,), giou (A,)).  xs: (A, 4) layer outputs, truth: (A, 4), i/j/aw/ah/iou_norm: (A,)."""
    ox, oy, ow, oh = xs.unbind(1)
    x, y = (i + ox) / W, (j + oy) / H
    if p.new_coords:
        w, h = ow * ow * 4 * aw / net_w, oh * oh * 4 * ah / net_h
    else:
        w, h = _t_to_float(torch.exp(ow) * aw / net_w), _t_to_float(torch.exp(oh) * ah / net_h)
    tr = truth.unbind(1)
    pred = (x, y, w, h)
    iou, giou = _t_box_iou(pred, tr), _t_box_giou(pred, tr)
    if p.iou_loss == "mse":
        scale = 2 - tr[2] * tr[3]
        tx, ty = tr[0] * W - i, tr[1] * H - j
        if p.new_coords:
            tw, th = torch.sqrt(tr[2] * net_w / (4 * aw)), torch.sqrt(tr[3] * net_h / (4 * ah))
        else:
            tw, th = torch.log(tr[2] * net_w / aw), torch.log(tr[3] * net_h / ah)
        d = [_t_f32(scale * (t - xs[:, k]) * iou_norm) for k, t in enumerate((tx, ty, tw, th))]
        return torch.stack(d, 1), iou, giou
    pred = (x, y, torch.where(w != 0, w, torch.ones_like(w)), torch.where(h != 0, h, torch.ones_like(h)))
    dx, dy, dw, dh = _t_dx_box_iou(pred, tr, p.iou_loss)
    if not p.new_coords:
        dw, dh = dw * torch.exp(ow), dh * torch.exp(oh)
    out = []
    for v in (dx, dy, dw, dh):
        v = _t_to_float(v * iou_norm)
        v = torch.where(torch.isnan(v) | torch.isinf(v), torch.zeros_like(v), v)
        v = torch.where(v < p.max_delta, v, torch.full_like(v, p.max_delta))     # min(max_delta, v)
        v = torch.where(v > -p.max_delta, v, torch.full_like(v, -p.max_delta))   # max(-max_delta, .)
        out.append(_t_f32(v))
    return torch.stack(out, 1), iou, giou


def _t_class_rows(p: YoloLossParams, probs: Tensor, cls: Tensor, cur: Tensor, mult: Optional[Tensor]):
    """delta_yolo_class when the class has no delta yet: the new (A, C) class rows."""
    onehot = (torch.arange(p.classes, device=cls.device) == cls[:, None]).to(torch.float64)  # no sync
    pc = probs.gather(1, cls[:, None])[:, 0]
    if p.focal_loss:
        pt = pc + 1e-15
        grad = -(1 - pt) * (2 * pt * torch.log(pt) + pt - 1)
        return (onehot - probs) * (0.5 * grad)[:, None]
    eps = p.label_smooth_eps
    y1 = 1.0 if not eps else 1.0 * (1 - eps) + 0.5 * eps
    y0 = 0.0 if not eps else 0.5 * eps
    target = torch.where(onehot > 0, torch.full_like(probs, y1), torch.full_like(probs, y0))
    r = target - probs
    rows = torch.where(torch.isfinite(r), r, cur)
    if mult is not None:                 # cls_normalizer only acts through counters_per_class
        f = mult[cls] * p.cls_normalizer
        rows = rows.scatter(1, cls[:, None], (rows.gather(1, cls[:, None])[:, 0] * f)[:, None])
    return rows


def _truth_table(targets: Tensor, N: int, p: YoloLossParams):
    """The truths Darknet's loops see, as CPU tensors in per-image order: (image (T,), box (T, 4)
    float64, class (T,), target row (T,)).  Rules of _truths_per_image plus the class filter."""
    if targets is None or targets.numel() == 0:
        z = torch.zeros(0, dtype=torch.long)
        return z, torch.zeros(0, 4, dtype=torch.float64), z, z
    t = targets.detach().to("cpu", torch.float32).reshape(-1, 6)
    M = t.shape[0]
    row = torch.arange(M)
    img = t[:, 0].trunc()
    ok = (img >= 0) & (img < N)
    b = torch.where(ok, img, torch.zeros_like(img)).long()
    # Darknet quirk: a truth with x == 0 ends the image's list
    end = torch.full((N,), M, dtype=torch.long)
    stop = ok & (t[:, 2] == 0)
    end.scatter_reduce_(0, b[stop], row[stop], reduce="amin")
    keep = ok & (row < end[b])
    # at most max_boxes per image (counted before the class filter)
    kb = b[keep]
    order = torch.argsort(kb, stable=True)
    kb_sorted = kb[order]
    first = torch.searchsorted(kb_sorted, kb_sorted, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - first
    kept_rows = row[keep][rank < p.max_boxes]
    tk = t[kept_rows]
    cls = tk[:, 1].trunc()
    good = (cls >= 0) & (cls < p.classes)
    kept_rows = kept_rows[good]
    tk = tk[good]
    bk = tk[:, 0].trunc().long()
    order = torch.argsort(bk, stable=True)         # image by image, rows in order
    kept_rows, tk, bk = kept_rows[order], tk[order], bk[order]
    return bk, tk[:, 2:6].to(torch.float64), tk[:, 1].trunc().long(), kept_rows


def _assignment_plan(bk: Tensor, box: Tensor, cls: Tensor, rows: Tensor, p: YoloLossParams,
                     N: int, W: int, H: int, net_w: int, net_h: int) -> Dict[str, Tensor]:
    """The truth loop's assignments (which truth goes to which anchor slot of which cell), in
    Darknet's order, computed from the truths alone (CPU).  ``rank``: how many earlier assignments
    hit the same slot (0 = first); slots are resolved in rounds of equal rank."""
    n, num = p.n, p.num
    T = box.shape[0]
    box32 = box.to(torch.float32)
    i = (box32[:, 0] * float(W)).trunc().long().clamp(0, W - 1)    # int(truth.x * l.w), float math
    j = (box32[:, 1] * float(H)).trunc().long().clamp(0, H - 1)
    an = torch.tensor(p.anchors[:2 * num], dtype=torch.float64).view(num, 2)
    aw, ah = an[:, 0] / net_w, an[:, 1] / net_h                     # (num,)
    zero = torch.zeros(T, num, dtype=torch.float64)
    anchor = (zero, zero, aw.expand(T, num), ah.expand(T, num))
    shape = (zero, zero, box[:, 2:3].expand(T, num), box[:, 3:4].expand(T, num))
    ious = _t_box_iou(anchor, shape)                                  # (T, num)
    # best_n: first strict maximum above 0 (NaN never wins), else anchor 0
    v = torch.where(torch.isnan(ious), torch.full_like(ious, -1.0), ious)
    m = v.max(dim=1).values if num else torch.zeros(T, dtype=torch.float64)
    best_n = torch.where(m > 0, (v == m[:, None]).to(torch.uint8).argmax(dim=1), torch.zeros_like(i))
    slot_of = torch.full((num,), -1, dtype=torch.long)
    for s, k in reversed(list(enumerate(p.mask))):                   # mask.index(k): first slot
        slot_of[k] = s
    cand = [best_n[:, None]]
    valid = [slot_of[best_n][:, None] >= 0]
    if p.iou_thresh < 1.0:
        ks = torch.arange(num).expand(T, num)
        other = _t_box_iou_kind(anchor, shape, p.iou_thresh_kind) > p.iou_thresh
        cand.append(ks)
        valid.append(other & (ks != best_n[:, None]) & (slot_of[ks] >= 0))
    cand, valid = torch.cat(cand, 1), torch.cat(valid, 1)            # (T, 1 + num) in loop order
    ti = torch.arange(T)[:, None].expand_as(cand)[valid]
    k = cand[valid]
    a = slot_of[k]
    b_, j_, i_ = bk[ti], j[ti], i[ti]
    slot = ((b_ * n + a) * H + j_) * W + i_
    order = torch.argsort(slot, stable=True)
    ss = slot[order]
    first = torch.searchsorted(ss, ss, right=False)
    rank = torch.empty_like(slot)
    rank[order] = torch.arange(len(ss)) - first
    return dict(truth=ti, anchor_id=k, a=a, b=b_, j=j_, i=i_, slot=slot, rank=rank, row=rows[ti],
                rounds=int(rank.max()) + 1 if len(rank) else 0)


class LossStats(dict):
    """The statistics of a loss: a dict whose values may be held as (device) tensors or
    zero-argument callables and are turned into Python numbers / objects only when read, so that
    computing the loss does not wait for the device.  ``raw(key)`` gives the stored value."""

    _INT = ("count", "n_assigned", "rewritten_bbox", "total_bbox", "class_count")

    def _value(self, key, v):
        if callable(v) and not isinstance(v, Tensor):
            v = v()
        elif isinstance(v, Tensor) and v.dim() == 0:
            v = int(v.item()) if key in self._INT else float(v.item())
        else:
            return v
        dict.__setitem__(self, key, v)
        return v

    def raw(self, key):
        return dict.__getitem__(self, key)

    def __getitem__(self, key):
        return self._value(key, dict.__getitem__(self, key))

    def get(self, key, default=None):
        return self[key] if key in self else default

    def pop(self, key, *default):
        if key in self:
            v = self[key]
            dict.__delitem__(self, key)
            return v
        return dict.pop(self, key, *default)

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def values(self):
        return [self[k] for k in self.keys()]


class _DeltaLoss(torch.autograd.Function):
    """Value ``cost``, gradient ``-delta`` with respect to ``x``."""

    @staticmethod
    def forward(ctx, x, cost, delta):
        ctx.save_for_backward(delta)
        return cost.to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, g):
        (delta,) = ctx.saved_tensors
        return (-g) * delta.to(g.dtype), None, None


def yolo_loss(head_input: Tensor, targets: Tensor, params: YoloLossParams, net_w: int, net_h: int,
              seen: int = 0, *, dense: Optional[bool] = None) -> Tuple[Tensor, Dict]:
    """Darknet's [yolo] training loss (forward_yolo_layer / process_batch, CPU build), vectorised.

    head_input: (N, n*(5+C), H, W) raw input of the layer (the conv output), on any device.
    targets: (M, 6) rows [image_index, class, x, y, w, h], box relative to the network input.
    Returns ``(loss, stats)``: ``loss`` has Darknet's ``l.cost`` as value and ``-l.delta`` as
    gradient w.r.t. head_input.  ``stats`` (a LossStats; values are read lazily): ``cost``, the
    printed ``avg_iou, count, class_loss, iou_loss, total_loss`` (per image, as printed), the
    unprinted averages, ``assignments``, ``delta`` and ``output`` (Darknet's ``l.delta`` /
    ``l.output``, float32, shape of head_input).  The same numbers as yolo_loss_reference: the
    truth loop's order effects (several truths in one anchor slot) are replayed in rounds, one per
    rank of a truth within its slot.  ``seen`` is unused by [yolo].  ``dense``: keep a delta row
    for every anchor slot (default on a GPU: no host synchronisation) instead of only for the
    slots that get one (default on the CPU); the results are the same."""
    p = params
    N, C, H, W = head_input.shape
    n, K = p.n, p.classes + 5
    dev, f64 = head_input.device, torch.float64
    compact = (dev.type == "cpu") if dense is None else not dense
    with torch.no_grad():
        out32 = yolo_forward(head_input.detach(), p)
    S = N * n * H * W
    o5 = out32.view(N, n, K, H, W)
    ox, oy, ow, oh, obj = (o5[:, :, k].to(f64) for k in range(5))          # (N, n, H, W)
    mult = (torch.tensor(p.classes_multipliers, dtype=f64, device=dev)
            if p.classes_multipliers is not None else None)

    def split(slot: Tensor):
        return slot // (n * H * W), (slot // (H * W)) % n, (slot // W) % H, slot % W

    def out_rows(slot: Tensor) -> Tensor:
        """The layer output of these anchor slots, (R, K) float64."""
        b, a, j, i = split(slot)
        return o5[b, a, :, j, i].to(f64)

    # ---- truths and the truth loop's plan (CPU, from the targets alone)
    bk, box, tcls, trow = _truth_table(targets, N, p)
    plan = _assignment_plan(bk, box, tcls, trow, p, N, W, H, net_w, net_h)
    T = box.shape[0]
    cnt_img = torch.bincount(bk, minlength=N) if T else torch.zeros(N, dtype=torch.long)
    Tmax = int(cnt_img.max()) if T else 0
    pos_in_img = torch.arange(T) - (torch.cumsum(cnt_img, 0) - cnt_img)[bk] if T else bk

    # ---- every prediction: no-object delta, ignored by its best IoU with any truth
    gx = torch.arange(W, dtype=f64, device=dev).view(1, 1, 1, W)
    gy = torch.arange(H, dtype=f64, device=dev).view(1, 1, H, 1)
    aw = torch.tensor([p.anchors[2 * m] for m in p.mask], dtype=f64, device=dev).view(1, n, 1, 1)
    ah = torch.tensor([p.anchors[2 * m + 1] for m in p.mask], dtype=f64, device=dev).view(1, n, 1, 1)
    px, py = (gx + ox) / W, (gy + oy) / H
    if p.new_coords:
        pw, ph = ow ** 2 * 4 * aw / net_w, oh ** 2 * 4 * ah / net_h
    else:
        pw, ph = torch.exp(ow) * aw / net_w, torch.exp(oh) * ah / net_h
    avg_anyobj = obj.sum()
    if Tmax:
        tt = torch.zeros(N, Tmax, 4, dtype=f64)
        tt[bk, pos_in_img] = box
        tc = torch.zeros(N, Tmax, dtype=torch.long)
        tc[bk, pos_in_img] = tcls
        valid = (torch.arange(Tmax)[None] < cnt_img[:, None])
        tt, tc, valid = tt.to(dev), tc.to(dev), valid.to(dev)
        best_iou, best_t = _best_iou(*(v.reshape(N, -1) for v in (px, py, pw, ph)), tt, valid)
        best_iou, best_t = best_iou.view(N, n, H, W), best_t.view(N, n, H, W)
        has = (cnt_img > 0).to(dev).view(N, 1, 1, 1)
        best_iou = torch.where(has, best_iou, torch.zeros_like(best_iou))
    else:
        best_iou = torch.zeros_like(obj)
        best_t = torch.zeros(obj.shape, dtype=torch.long, device=dev)
    del px, py, pw, ph
    class_match = (o5[:, :, 5:] > 0.25).any(dim=2)     # only then can an anchor be ignored
    best_match = torch.where(class_match, best_iou, torch.zeros_like(best_iou))
    d_obj = p.obj_normalizer * (0 - obj)
    ign = best_match > p.ignore_thresh
    if p.objectness_smooth:
        d_obj = torch.where(ign, torch.maximum(d_obj, p.obj_normalizer * (best_match - obj)), d_obj)
    else:
        d_obj = torch.where(ign, torch.zeros_like(d_obj), d_obj)

    # ---- the anchor slots that get more than the no-object delta: a table of their delta rows.
    #      CPU: only those slots; a device: every slot (no host synchronisation for the
    #      truth_thresh positives, which depend on the predictions)
    pos = (best_iou > p.truth_thresh).view(S) if Tmax else None
    if compact:
        pos_slots = pos.nonzero()[:, 0] if Tmax else torch.zeros(0, dtype=torch.long)
        rows_slot = torch.unique(torch.cat([pos_slots, plan["slot"]]))
        row_of = torch.full((S,), -1, dtype=torch.long)
        row_of[rows_slot] = torch.arange(len(rows_slot))
    else:
        pos_slots = rows_slot = row_of = torch.arange(S, device=dev)
    U = len(rows_slot)
    table = torch.zeros(U, K, dtype=f64, device=dev)
    table[:, 4] = d_obj.view(S)[rows_slot]
    mask_t = torch.tensor(p.mask, dtype=torch.long, device=dev)
    an_t = torch.tensor(p.anchors[:2 * p.num], dtype=f64, device=dev).view(p.num, 2)

    # ---- predictions whose best IoU exceeds truth_thresh become positives (truth_thresh=1: never)
    total_bbox = torch.zeros((), dtype=torch.long, device=dev)
    if Tmax and len(pos_slots):
        sl = pos_slots
        pm = pos[sl]
        bidx, a_idx, j_idx, i_idx = split(sl)
        bt = best_t.view(S)[sl]
        truth, cl = tt[bidx, bt], tc[bidx, bt]
        ors = out_rows(sl)
        r_idx = row_of[sl]
        row = table[r_idx]
        iou_mult = best_iou.view(S)[sl] ** 2
        new_obj = p.obj_normalizer * ((iou_mult if p.objectness_smooth else 1) - ors[:, 4])
        cls_rows = _t_class_rows(p, ors[:, 5:], cl, row[:, 5:], mult)
        cm = mult[cl] if mult is not None else torch.ones_like(iou_mult)
        if p.objectness_smooth:
            sm = cm * (iou_mult - ors.gather(1, 5 + cl[:, None])[:, 0])
            cls_rows = cls_rows.scatter(1, cl[:, None], sm[:, None])
        k_id = mask_t[a_idx]
        dbox, _, _ = _t_box_deltas(p, ors[:, :4], i_idx.to(f64), j_idx.to(f64), an_t[k_id, 0],
                                   an_t[k_id, 1], truth, p.iou_normalizer * cm, W, H, net_w, net_h)
        new_row = torch.cat([row[:, :4] + dbox, new_obj[:, None], cls_rows], 1)
        table[r_idx] = torch.where(pm[:, None], new_row, row)
        total_bbox = total_bbox + pm.sum()

    # ---- every truth -> its anchor slots, in Darknet's order (rounds of equal rank in a slot)
    A = len(plan["slot"])
    if A:
        pd = {k: v.to(dev) for k, v in plan.items() if isinstance(v, Tensor)}
        sl, cl = pd["slot"], tcls.to(dev)[pd["truth"]]
        truth = box.to(dev)[pd["truth"]]
        ors = out_rows(sl)
        cm = mult[cl] if mult is not None else torch.ones(A, dtype=f64, device=dev)
        dbox, iou, giou = _t_box_deltas(p, ors[:, :4], pd["i"].to(f64), pd["j"].to(f64),
                                        an_t[pd["anchor_id"], 0], an_t[pd["anchor_id"], 1], truth,
                                        p.iou_normalizer * cm, W, H, net_w, net_h)
        ov = ors[:, 4]
        new_obj = cm * p.obj_normalizer * (1 - ov)
        pc = ors.gather(1, 5 + cl[:, None])[:, 0]
        eps = p.label_smooth_eps
        y1 = 1.0 if not eps else 1.0 * (1 - eps) + 0.5 * eps
        quirk_r = y1 - pc
        rewritten = torch.zeros((), dtype=torch.long, device=dev)
        r_all = row_of[sl]
        rounds = [(plan["rank"] == r).nonzero()[:, 0].to(dev) for r in range(plan["rounds"])]
        for sel in rounds:                        # members of a round hit distinct slots
            r_idx, c = r_all[sel], cl[sel]
            row = table[r_idx]
            rewritten = rewritten + (row[:, :4] != 0).any(dim=1).sum()
            box_new = row[:, :4] + dbox[sel]
            if p.objectness_smooth:               # keeps an objectness delta already set
                o_new = torch.where(row[:, 4] == 0, new_obj[sel], row[:, 4])
            else:
                o_new = new_obj[sel]
            cur = row[:, 5:]
            cur_c = cur.gather(1, c[:, None])[:, 0]
            fresh = _t_class_rows(p, ors[sel, 5:], c, cur, mult)
            # Darknet quirk: a class that already has a delta -> only that class is set
            q = torch.where(torch.isfinite(quirk_r[sel]), quirk_r[sel], cur_c)
            if mult is not None:
                q = q * mult[c]
            quirk_row = cur.scatter(1, c[:, None], q[:, None])
            cls_new = torch.where((cur_c != 0)[:, None], quirk_row, fresh)
            table[r_idx] = torch.cat([box_new, o_new[:, None], cls_new], 1)
        total_bbox = total_bbox + A
        tot_iou, tot_iou_loss, tot_giou_loss = iou.sum(), (1 - iou).sum(), (1 - giou).sum()
        recall, recall75 = (iou > 0.5).sum().to(f64), (iou > 0.75).sum().to(f64)
        avg_obj, avg_cat = ov.sum(), pc.sum()
    else:
        z = torch.zeros((), dtype=f64, device=dev)
        rewritten = torch.zeros((), dtype=torch.long, device=dev)
        iou = torch.zeros(0, dtype=f64, device=dev)
        tot_iou = tot_iou_loss = tot_giou_loss = recall = recall75 = avg_obj = avg_cat = z

    # ---- iou_thresh < 1: box deltas of every anchor with an objectness delta are divided by the
    #      number of its classes with a positive delta (averages_yolo_deltas; only table rows
    #      have class deltas)
    if p.iou_thresh < 1.0:
        npos = (table[:, 5:] > 0).sum(dim=1).to(f64)
        sel = (table[:, 4] != 0) & (npos > 0)
        table[:, :4] = torch.where(sel[:, None], table[:, :4] / npos.clamp(min=1)[:, None], table[:, :4])

    # ---- Darknet's float l.delta: the no-object column everywhere, the table rows on top
    obj32 = d_obj.to(torch.float32)
    t32 = table.to(torch.float32)
    delta32 = torch.zeros(N, n, K, H, W, dtype=torch.float32, device=dev)
    delta32[:, :, 4] = obj32
    b_r, a_r, j_r, i_r = split(rows_slot)
    delta32[b_r, a_r, :, j_r, i_r] = t32
    untouched = torch.ones(S, dtype=torch.bool, device=dev)
    untouched[rows_slot] = False
    o64 = obj32.to(f64).view(S)
    obj_sq = (o64 * o64 * untouched).sum()
    t64 = t32.to(f64)
    total = obj_sq + (t64 * t64).sum()
    non_box = obj_sq + (t64[:, 4:] * t64[:, 4:]).sum()
    count = A if A else 1                                  # Darknet prints count = 1 when none
    class_loss = p.obj_normalizer * non_box                # Darknet quirk: scaled by obj_normalizer
    if not p.show_details or p.iou_loss == "mse":
        cost = total
    else:
        iou_term = tot_giou_loss if p.iou_loss == "giou" else tot_iou_loss
        cost = p.iou_normalizer * iou_term / count + class_loss
    delta_out = delta32.view(N, C, H, W)

    def assignments():
        ious = iou.tolist()
        return [dict(image=b, target=t, anchor_id=k, slot=a, cell=(j, i), iou=u)
                for b, t, k, a, j, i, u in zip(plan["b"].tolist(), plan["row"].tolist(),
                                               plan["anchor_id"].tolist(), plan["a"].tolist(),
                                               plan["j"].tolist(), plan["i"].tolist(), ious)]

    stats = LossStats(
        cost=cost, avg_iou=tot_iou / count, count=count, n_assigned=A,
        class_loss=class_loss / N, iou_loss=(total - class_loss) / N, total_loss=total / N,
        avg_class=avg_cat / count, avg_obj=avg_obj / count,
        avg_noobj=avg_anyobj / (W * H * n * N), recall50=recall / count,
        recall75=recall75 / count, tot_iou=tot_iou, tot_iou_loss=tot_iou_loss,
        tot_giou_loss=tot_giou_loss, rewritten_bbox=rewritten,
        total_bbox=total_bbox, assignments=assignments, delta=delta_out, output=out32)
    loss = _DeltaLoss.apply(head_input, cost.detach(), delta_out)
    return loss, stats


# ---------------------------------------------------------------------------------- [region]
def region_forward(head_input: Tensor, params: RegionLossParams) -> Tensor:
    """Darknet's [region] CPU forward: (N, num*(5+C), H, W) -> (N, H, W, num, 5+C) (the CPU layer
    transposes to cell-major); logistic on objectness, softmax over classes if softmax=1; x, y, w, h
    stay raw."""
    N, Ch, H, W = head_input.shape
    n, K = params.num, params.classes + 5
    if Ch != n * K:
        raise ValueError(f"[region] input has {Ch} channels, expected {n}*({params.classes}+5)")
    x = head_input.reshape(N, n, K, H, W).permute(0, 3, 4, 1, 2)
    cls = torch.softmax(x[..., 5:], dim=-1) if params.softmax else x[..., 5:]
    return torch.cat([x[..., :4], torch.sigmoid(x[..., 4:5]), cls], dim=-1).contiguous()


def region_loss(head_input: Tensor, targets: Tensor, params: RegionLossParams, net_w: int, net_h: int,
                seen: int = 0) -> Tuple[Tensor, Dict]:
    """Darknet's [region] (YOLOv2) training loss, CPU build.

    ``seen`` is ``*net.seen`` during this forward (already incremented by the batch); while it is
    below 12800 every anchor first gets a 0.01-scaled box delta toward its prior.  Returns
    ``(loss, stats)`` like yolo_loss; ``stats['delta']`` has head_input's (num*K, H, W) layout (the
    layer un-flattens its delta) and ``stats['output']`` Darknet's flattened (N, H, W, num, K)."""
    p = params
    N, Ch, H, W = head_input.shape
    n, K, NC = p.num, p.classes + 5, p.classes
    with torch.no_grad():
        out32 = region_forward(head_input.detach(), p)
    o = out32.to("cpu", torch.float64)                          # (N, H, W, n, K)
    delta = torch.zeros_like(o)
    truths = _truths_per_image(targets, N, p.max_boxes)
    bw = torch.tensor(p.anchors[0:2 * n:2], dtype=torch.float64)
    bh = torch.tensor(p.anchors[1:2 * n:2], dtype=torch.float64)
    st = dict(avg_iou=0.0, recall=0.0, avg_cat=0.0, avg_obj=0.0, avg_anyobj=0.0, count=0, class_count=0)
    assignments: List[Dict] = []

    def sig_grad(y):
        return (1 - y) * y                                       # logistic_gradient of the output

    def pred_box(b, j, i, a):
        v = o[b, j, i, a].tolist()
        return ((i + _logistic(v[0])) / W, (j + _logistic(v[1])) / H,
                _to_float(_exp(v[2]) * p.anchors[2 * a] / W), _to_float(_exp(v[3]) * p.anchors[2 * a + 1] / H))

    def class_delta(b, j, i, a, cls, scale):
        """delta_region_class (no softmax tree)."""
        probs = o[b, j, i, a, 5:]
        onehot = torch.zeros(NC, dtype=torch.float64)
        onehot[cls] = 1
        d = scale * (onehot - probs)
        if p.focal_loss:
            pt = probs[cls].item() + 1e-15
            d = d * (0.5 * (-(1 - pt) * (2 * pt * _log(pt) + pt - 1)))
        delta[b, j, i, a, 5:] = d
        st["avg_cat"] += probs[cls].item()

    for b in range(N):
        ob = o[b]
        tb = [t for t in truths[b] if 0 <= int(t[4]) < NC]   # class >= classes is skipped
        sx, sy = torch.sigmoid(ob[..., 0]), torch.sigmoid(ob[..., 1])          # (H, W, n)
        gx = torch.arange(W, dtype=torch.float64).view(1, W, 1)
        gy = torch.arange(H, dtype=torch.float64).view(H, 1, 1)
        px, py = (gx + sx) / W, (gy + sy) / H
        pw, ph = torch.exp(ob[..., 2]) * bw / W, torch.exp(ob[..., 3]) * bh / H
        obj = ob[..., 4]
        st["avg_anyobj"] += obj.sum().item()
        if tb:
            tt = torch.tensor([t[:4] for t in tb], dtype=torch.float64)
            ious = _iou_grid(px[..., None], py[..., None], pw[..., None], ph[..., None],
                             tt[:, 0], tt[:, 1], tt[:, 2], tt[:, 3])
            best_iou, best_t = ious.max(dim=-1)
        else:
            best_iou = torch.zeros_like(obj)
            best_t = torch.zeros_like(obj, dtype=torch.long)
        # no-object delta, with sigmoid' (a true MSE gradient on the logit)
        if p.classfix == -1:
            d_obj = p.noobject_scale * ((best_iou - obj) * sig_grad(obj))
        else:
            d_obj = p.noobject_scale * ((0 - obj) * sig_grad(obj))
            d_obj = torch.where(best_iou > p.thresh, torch.zeros_like(d_obj), d_obj)
        delta[b, ..., 4] = d_obj
        if p.classfix > 0:
            for j, i, a in (best_iou > p.thresh).nonzero().tolist():
                cls = int(tb[best_t[j, i, a].item()][4])
                class_delta(b, j, i, a, cls, p.class_scale * (obj[j, i, a].item() if p.classfix == 2 else 1))
                st["class_count"] += 1
        # early training: pull every anchor's box toward its prior at the cell centre
        if seen < 12800:
            tx, ty = 0.5, 0.5                                   # ((i + .5)/W)*W - i
            tw = torch.log((bw / W) * W / bw)                   # ~0: log of the prior over itself
            th = torch.log((bh / H) * H / bh)
            delta[b, ..., 0] = 0.01 * (tx - sx) * sig_grad(sx)
            delta[b, ..., 1] = 0.01 * (ty - sy) * sig_grad(sy)
            delta[b, ..., 2] = 0.01 * (tw - ob[..., 2])
            delta[b, ..., 3] = 0.01 * (th - ob[..., 3])
        # every truth overwrites its best anchor (by shape when bias_match) in its cell
        for t in tb:
            truth, cls = t[:4], int(t[4])
            i, j = _cell(truth[0], W), _cell(truth[1], H)
            i, j = min(max(i, 0), W - 1), min(max(j, 0), H - 1)
            shape = (0.0, 0.0, truth[2], truth[3])
            best, best_n, where = 0.0, 0, (0, 0, 0, 0)          # Darknet quirk: no match -> index 0
            for a in range(n):
                if p.bias_match:
                    pw_, ph_ = p.anchors[2 * a] / W, p.anchors[2 * a + 1] / H
                else:
                    _, _, pw_, ph_ = pred_box(b, j, i, a)
                iou = _box_iou((0.0, 0.0, pw_, ph_), shape)
                if iou > best:
                    best, best_n, where = iou, a, (b, j, i, a)
            wb, wj, wi, wa = where
            v = o[wb, wj, wi, wa]
            # delta_region_box on the chosen entry, with the truth's cell (i, j) and anchor best_n
            sxv, syv = _logistic(v[0].item()), _logistic(v[1].item())
            pred = ((i + sxv) / W, (j + syv) / H, _to_float(_exp(v[2].item()) * p.anchors[2 * best_n] / W),
                    _to_float(_exp(v[3].item()) * p.anchors[2 * best_n + 1] / H))
            iou = _box_iou(pred, truth)
            tx, ty = truth[0] * W - i, truth[1] * H - j
            tw = _log(truth[2] * W / p.anchors[2 * best_n])
            th = _log(truth[3] * H / p.anchors[2 * best_n + 1])
            delta[wb, wj, wi, wa, 0] = p.coord_scale * (tx - sxv) * sig_grad(sxv)
            delta[wb, wj, wi, wa, 1] = p.coord_scale * (ty - syv) * sig_grad(syv)
            delta[wb, wj, wi, wa, 2] = p.coord_scale * (tw - v[2].item())
            delta[wb, wj, wi, wa, 3] = p.coord_scale * (th - v[3].item())
            assignments.append(dict(image=wb, target=t[5], anchor_id=wa, slot=wa, cell=(wj, wi), iou=iou))
            st["recall"] += iou > 0.5
            st["avg_iou"] += iou
            ov = v[4].item()
            st["avg_obj"] += ov
            target = iou if p.rescore else 1.0
            delta[wb, wj, wi, wa, 4] = p.object_scale * (target - ov) * sig_grad(ov)
            class_delta(wb, wj, wi, wa, cls, p.class_scale)
            st["count"] += 1
            st["class_count"] += 1

    delta32 = delta.to(torch.float32)
    cost = (delta32.to(torch.float64) ** 2).sum().item()
    cnt, ccnt = st["count"], st["class_count"]
    nan = float("nan")                                           # Darknet divides by a 0 count
    stats = dict(
        cost=cost, avg_iou=st["avg_iou"] / cnt if cnt else nan,
        avg_class=st["avg_cat"] / ccnt if ccnt else nan, avg_obj=st["avg_obj"] / cnt if cnt else nan,
        avg_noobj=st["avg_anyobj"] / (W * H * n * N), avg_recall=st["recall"] / cnt if cnt else nan,
        count=cnt, n_assigned=cnt, class_count=ccnt, assignments=assignments,
        # un-flatten: (N, H, W, n, K) -> (N, n*K, H, W), the layout of head_input
        delta=delta32.permute(0, 3, 4, 1, 2).reshape(N, Ch, H, W).contiguous().to(head_input.device),
        output=out32)
    return _surrogate(cost, stats["delta"], head_input), stats


# --------------------------------------------------------------------------- from layer specs
def _yolo_params_from_spec(spec) -> YoloLossParams:
    """YoloLossParams of a parsed ``[yolo]`` spec (``model.heads``): its shape fields plus the
    ``train`` dict of training options (Darknet's parse_yolo defaults already filled in)."""
    t = dict(spec.train or {})
    p = dict(classes=spec.classes, num=spec.num, mask=list(spec.mask),
             anchors=list(spec.all_anchors), scale_x_y=spec.scale_x_y, new_coords=spec.new_coords)
    for key in ("ignore_thresh", "truth_thresh", "iou_thresh", "iou_thresh_kind", "iou_loss",
                "iou_normalizer", "obj_normalizer", "cls_normalizer", "delta_normalizer",
                "max_delta", "label_smooth_eps", "objectness_smooth", "focal_loss",
                "counters_per_class", "show_details"):
        if t.get(key) is not None:
            p[key] = t[key]
    if t.get("max") is not None:
        p["max_boxes"] = t["max"]
    return YoloLossParams.from_layout_params(p)


def _region_params_from_spec(spec) -> RegionLossParams:
    t = dict(spec.train or {})
    p = dict(classes=spec.classes, coords=spec.coords, num=spec.num, anchors=list(spec.anchors),
             softmax=spec.softmax, has_softmax_tree=int(spec.tree is not None))
    for key in ("bias_match", "rescore", "thresh", "coord_scale", "object_scale", "noobject_scale",
                "class_scale", "classfix", "focal_loss", "absolute"):
        if t.get(key) is not None:
            p[key] = t[key]
    if t.get("max") is not None:
        p["max_boxes"] = t["max"]
    return RegionLossParams.from_layout_params(p)


YoloLossParams.from_spec = staticmethod(_yolo_params_from_spec)
RegionLossParams.from_spec = staticmethod(_region_params_from_spec)


def head_loss(spec, head_input: Tensor, targets: Tensor, net_w: int, net_h: int, seen: int = 0,
              params=None) -> Tuple[Tensor, Dict]:
    """The training loss of one detection layer spec (``model.heads[k]``) on its raw input."""
    if spec.type == "yolo":
        return yolo_loss(head_input, targets, params or YoloLossParams.from_spec(spec), net_w, net_h, seen)
    if spec.type == "region":
        return region_loss(head_input, targets, params or RegionLossParams.from_spec(spec), net_w, net_h,
                           seen)
    raise NotImplementedError(f"training a [{spec.type}] layer is not supported (layer {spec.index})")
