"""Detection accuracy as ``darknet detector map`` computes it (``validate_detector_map``).

Per validation image: the network input as ``detector test`` makes it (darknet's resize or
letterbox), ``get_network_boxes`` at thresh 0.005, NMS 0.45 of the last layer's kind; then, walking
the boxes in the order NMS leaves Darknet's array (``postprocess.darknet_order``), every (box,
class) with prob > 0 is a detection, matched to the same-class truth with the highest IoU above
``iou_thresh``. At ``thresh`` a detection is a true positive only if no earlier detection of that
image in this walk had its truth, so the walk order decides TP/FP there.
AP per class: ``points=0`` area under the monotone PR curve (VOC2010+/ImageNet), ``points=11``
or ``101`` interpolated recall points (VOC2007 / COCO style); precision, recall, F1, TP, FP, FN
and average IoU at ``thresh=0.25``. ``coco_map`` adds COCO AP@[.5:.95] through pycocotools.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .postprocess import _F, Detections, HeadParams, box_iou_matrix, darknet_order, get_network_boxes

__all__ = ["head_params", "predict", "compute_map", "evaluate_model", "coco_map", "format_report",
           "draw_chart"]


def head_params(spec) -> HeadParams:
    """postprocess.HeadParams of a detection-layer spec (``model.heads``)."""
    if spec.type in ("yolo", "Gaussian_yolo"):
        return HeadParams(kind=spec.type, classes=spec.classes, mask=spec.mask, anchors=spec.all_anchors,
                          scale_x_y=spec.scale_x_y, new_coords=spec.new_coords, nms_kind=spec.nms_kind,
                          beta_nms=spec.beta_nms, num=spec.num,
                          yolo_point=1 if spec.train.get("yolo_point", "center") == "center" else
                          (2 if spec.train.get("yolo_point") == "left_top" else 4))
    if spec.type == "region":
        return HeadParams(kind="region", classes=spec.classes, mask=tuple(range(spec.num)),
                          anchors=spec.anchors, nms_kind="default", beta_nms=0.0, coords=spec.coords,
                          num=spec.num)
    raise ValueError(f"layer {spec.index}: [{spec.section}] has no box decoding")


@torch.no_grad()
def predict(model, images: Sequence[str], thresh: float = 0.005, nms: float = 0.45,
            device=None, batch: int = 16, tta: bool = False) -> List[Detections]:
    """Darknet's detections (after NMS) for each image path; boxes relative to the image, in
    the order Darknet's NMS leaves them (``darknet_order``), which decides which of two
    detections of one truth counts as the true positive at ``thresh``. ``tta``: the boxes of
    the test-time augmentation passes (tta.py), merged, then NMS."""
    from .infer import nms_matrix
    from .preprocess import detector_input, load_image
    was = model.training
    model.eval()
    heads = {s.index: head_params(s) for s in model.heads}
    last = model.graph.layers[-1]
    kind = getattr(last, "nms_kind", "default")
    beta = getattr(last, "beta_nms", 0.6)
    W, H, lb = model.width, model.height, bool(model.graph.net.letter_box)
    dev = device or next(model.parameters()).device
    w0 = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    fmt = torch.channels_last if w0 is not None and not w0.is_contiguous() else None  # as trained
    out: List[Detections] = []

    def forward(inputs: np.ndarray):
        x = torch.from_numpy(inputs).to(dev)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        outs = [t.float().cpu().contiguous() for t in model(x)]
        return [{li: t[k].numpy() for li, t in zip(heads, outs)} for k in range(len(inputs))]
    sizes = None
    if tta:
        from .tta import tta_sizes
        sizes = tta_sizes(model)
    try:
        for s in range(0, len(images), batch):
            chunk = images[s:s + batch]
            ims = [load_image(p) for p in chunk]
            if sizes:
                from .tta import tta_detections
                dets = tta_detections(forward, ims, heads, sizes, thresh, lb)
            else:
                outs = forward(np.stack([detector_input(im, W, H, lb) for im in ims]))
                dets = [get_network_boxes(o, heads, W, H, im.shape[2], im.shape[1],
                                          thresh=thresh, letter_box=lb)
                        for o, im in zip(outs, ims)]
            for d in dets:
                if nms:  # do_nms, vectorised; then the order Darknet's qsorts leave its array in
                    d = nms_matrix(d, nms, kind=kind, beta_nms=beta).take(darknet_order(d))
                out.append(d)
    finally:
        model.train(was)
    return out


def _match(d: Detections, t: np.ndarray, iou_thresh: np.float32):
    """validate_detector_map's per-image pass: every (box, class) with prob > 0, boxes in array
    order and classes ascending, and the same-class truth with the highest IoU > iou_thresh
    (first on ties; -1 if none). Returns (box, class, prob, truth index in t, its IoU)."""
    i, c = np.nonzero(d.probs > 0)
    if len(t) == 0 or len(i) == 0:
        return i, c, d.probs[i, c], np.full(len(i), -1), np.zeros(len(i), _F)
    iou = box_iou_matrix(d.boxes, t[:, 1:5])[i]                     # (pairs, truths)
    ok = (iou > iou_thresh) & (iou > 0) & (t[None, :, 0].astype(np.int64) == c[:, None])
    masked = np.where(ok, iou, _F(-1))
    best = masked.argmax(axis=1)                                     # first of equal maxima
    has = ok.any(axis=1)
    best_iou = np.where(has, iou[np.arange(len(i)), best], _F(0))
    return i, c, d.probs[i, c], np.where(has, best, -1), best_iou


def _first(keys: np.ndarray) -> np.ndarray:
    """True where keys[k] >= 0 occurs for the first time."""
    first = np.zeros(len(keys), bool)
    u, idx = np.unique(keys, return_index=True)
    first[idx[u >= 0]] = True
    return first


def compute_map(dets: Sequence[Detections], truths: Sequence[np.ndarray], classes: int,
                iou_thresh: float = 0.5, points: int = 0, thresh: float = 0.25) -> Dict:
    """validate_detector_map's statistics. ``truths[i]``: (n, 5) ``class, x, y, w, h``;
    ``dets`` in the order Darknet's NMS leaves them (``predict``).

    At ``thresh`` (Darknet's thresh_calc_avg_iou, float compares): a detection with prob >
    thresh is a true positive if it has a truth and no EARLIER detection of the same image (in
    the pass order above, whatever its prob) had that truth; otherwise a false positive. The
    IoUs of the true positives are summed in float, then divided by TP + FP. AP: all detections
    sorted by prob (stable), a truth counts once."""
    thr, ithr = _F(thresh), _F(iou_thresh)
    truth_count = np.zeros(classes, np.int64)
    tp_c = np.zeros(classes, np.int64)
    fp_c = np.zeros(classes, np.int64)
    p_all, c_all, t_all, tp_ious = [], [], [], []
    unique = 0
    for d, t in zip(dets, truths):
        t = np.asarray(t, _F).reshape(-1, 5)
        tc = t[:, 0].astype(np.int64)
        truth_count += np.bincount(tc[(tc >= 0) & (tc < classes)], minlength=classes)
        _, c, p, ti, best = _match(d, t, ithr)
        above = p > thr
        tp = above & _first(ti)
        np.add.at(tp_c, c[tp], 1)
        np.add.at(fp_c, c[above & ~tp], 1)
        tp_ious.append(best[tp])
        p_all.append(p)
        c_all.append(c)
        t_all.append(np.where(ti >= 0, ti + unique, -1))
        unique += len(t)
    tp_t, fp_t = int(tp_c.sum()), int(fp_c.sum())
    # float avg_iou += max_iou, image by image: a sequential float32 sum
    ious = np.concatenate(tp_ious) if tp_ious else np.zeros(0, _F)
    avg_iou = np.add.accumulate(ious, dtype=_F)[-1] if len(ious) else _F(0)
    if tp_t + fp_t:
        avg_iou = _F(avg_iou / _F(tp_t + fp_t))

    p = np.concatenate(p_all) if p_all else np.zeros(0, _F)
    n = len(p)
    ap = [0.0] * classes
    if n:
        order = np.argsort(-p, kind="stable")                        # qsort: glibc merge sort
        cls = np.concatenate(c_all)[order]
        is_tp = _first(np.concatenate(t_all)[order])
        for c in range(classes):
            tp = np.cumsum(is_tp & (cls == c)).astype(np.float64)
            fp = np.cumsum(~is_tp & (cls == c)).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
                rec = np.where(truth_count[c] > 0, tp / truth_count[c], 0.0)
            if points == 0:
                # from the last rank down: (recall step) x (best precision at or after it),
                # summed in that order, then the area left of the first rank
                best = np.maximum.accumulate(prec[::-1])[::-1]
                terms = (rec[1:] - rec[:-1]) * best[:-1]
                s = np.add.accumulate(terms[::-1])[-1] if len(terms) else 0.0
                ap[c] = float(s + rec[0] * best[0])
            else:
                s = 0.0
                for pt in range(points):
                    ok = rec >= pt * 1.0 / (points - 1)
                    s += max(float(prec[ok].max()), 0.0) if ok.any() else 0.0
                ap[c] = s / points
    # Darknet's float expressions for the printed figures
    tpf, fpf = _F(tp_t), _F(fp_t)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tpf / (tpf + fpf)
        recall = tpf / (tpf + _F(unique - tp_t))
        f1 = _F(2) * precision * recall / (precision + recall)
    return dict(map=sum(ap) / classes if classes else 0.0, ap=ap, iou_thresh=iou_thresh,
                points=points, thresh=thresh, precision=float(precision), recall=float(recall),
                f1=float(f1), tp=tp_t, fp=fp_t, fn=unique - tp_t, truths=unique, detections=n,
                avg_iou=float(avg_iou), tp_per_class=tp_c.tolist(), fp_per_class=fp_c.tolist(),
                truth_per_class=truth_count.tolist())


def coco_map(dets: Sequence[Detections], truths: Sequence[np.ndarray], sizes: Sequence, classes: int
             ) -> Optional[Dict]:
    """COCO AP@[.5:.95], AP50, AP75 through pycocotools (None if it is not installed)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return None
    import contextlib
    import io
    images, anns, results = [], [], []
    aid = 1
    for i, (d, t, (w, h)) in enumerate(zip(dets, truths, sizes)):
        images.append(dict(id=i, width=int(w), height=int(h)))
        for c, x, y, bw, bh in np.asarray(t).reshape(-1, 5):
            anns.append(dict(id=aid, image_id=i, category_id=int(c), iscrowd=0, area=float(bw * w * bh * h),
                             bbox=[float((x - bw / 2) * w), float((y - bh / 2) * h), float(bw * w), float(bh * h)]))
            aid += 1
        for k in range(len(d)):
            x, y, bw, bh = (float(v) for v in d.boxes[k])
            for c in np.flatnonzero(d.probs[k] > 0):
                results.append(dict(image_id=i, category_id=int(c), score=float(d.probs[k, c]),
                                    bbox=[(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]))
    gt = COCO()
    gt.dataset = dict(images=images, annotations=anns, categories=[dict(id=c) for c in range(classes)])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return dict(ap=0.0, ap50=0.0, ap75=0.0)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(ap=float(ev.stats[0]), ap50=float(ev.stats[1]), ap75=float(ev.stats[2]))


def evaluate_model(model, images: Sequence[str], truths: Sequence[np.ndarray], classes: int,
                   iou_thresh: float = 0.5, points: int = 0, thresh: float = 0.25, device=None,
                   coco: bool = False, tta: bool = False) -> Dict:
    dets = predict(model, list(images), device=device, tta=tta)
    res = compute_map(dets, truths, classes, iou_thresh=iou_thresh, points=points, thresh=thresh)
    if coco:
        import cv2
        sizes = []
        for p in images:
            im = cv2.imread(p)
            sizes.append((im.shape[1], im.shape[0]) if im is not None else (1, 1))
        res["coco"] = coco_map(dets, truths, sizes, classes)
    return res


def format_report(res: Dict, names: Sequence[str]) -> str:
    """validate_detector_map's printout from ``detections_count`` to the mAP line, line for
    line (then our COCO line when ``res`` has one)."""
    lines = [f" detections_count = {res['detections']}, unique_truth_count = {res['truths']}  "]
    for c, ap in enumerate(res["ap"]):
        name = names[c] if c < len(names) else str(c)
        lines.append(f"class_id = {c}, name = {name}, ap = {100 * ap:.2f}%   \t "
                     f"(TP = {res['tp_per_class'][c]}, FP = {res['fp_per_class'][c]}) ")
    p, r, f1, t = res["precision"], res["recall"], res["f1"], res["thresh"]
    lines.append("")
    lines.append(f" for conf_thresh = {t:.2f}, precision = {p:.2f}, recall = {r:.2f}, "
                 f"F1-score = {f1:.2f} ")
    lines.append(f" for conf_thresh = {t:.2f}, TP = {res['tp']}, FP = {res['fp']}, "
                 f"FN = {res['fn']}, average IoU = {float(_F(res['avg_iou']) * _F(100)):.2f} % ")
    kind = (f"{res['points']} Recall-points" if res["points"]
            else "Area-Under-Curve for each unique Recall")
    lines.append("")
    lines.append(f" IoU threshold = {100 * res['iou_thresh']:.0f} %, used {kind} ")
    lines.append(f" mean average precision (mAP@{res['iou_thresh']:.2f}) = {res['map']:.6f}, or "
                 f"{100 * res['map']:.2f} % ")
    coco = res.get("coco")
    if coco:
        lines.append(f" COCO AP@[.50:.95] = {coco['ap']:.4f}, AP50 = {coco['ap50']:.4f}, "
                     f"AP75 = {coco['ap75']:.4f} (pycocotools)")
    elif "coco" in res:
        lines.append(" COCO AP: pycocotools is not installed (pip install pycocotools)")
    return "\n".join(lines)


def draw_chart(path: str, loss_history, map_history, max_batches: int, max_loss: float = 20.0,
               marks=()) -> None:
    """Darknet-style chart: loss (blue) and mAP % (red) against iteration; ``marks``: (iteration,
    label) pairs drawn as vertical lines (e.g. the start of fine-tuning); matplotlib if present,
    otherwise drawn with OpenCV."""
    its = [i for i, _ in loss_history]
    losses = [l for _, l in loss_history]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 6))
        ax.plot(its, losses, "b-", lw=0.8, label="loss")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_xlim(0, max_batches)
        ax2 = ax.twinx()
        if map_history:
            ax2.plot([i for i, _ in map_history], [100 * m for _, m in map_history], "r.-", label="mAP%")
        ax2.set_ylim(0, 100)
        ax2.set_ylabel("mAP@0.5 %")
        for i, label in marks:
            ax.axvline(i, color="g", ls="--", lw=1)
            ax.text(i, ax.get_ylim()[1], f" {label} ({i})", color="g", va="top", fontsize=9)
        fig.savefig(path + ".tmp.png", dpi=80)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        return
    except ImportError:
        pass
    import cv2
    Wc, Hc, m = 800, 600, 60
    img = np.full((Hc, Wc, 3), 255, np.uint8)
    cv2.rectangle(img, (m, m // 2), (Wc - m, Hc - m), (0, 0, 0), 1)
    top = max(1e-6, min(max_loss, max(losses) if losses else 1.0))
    X = lambda i: int(m + (Wc - 2 * m) * i / max(1, max_batches))  # noqa: E731
    Y = lambda v, hi: int(Hc - m - (Hc - 1.5 * m) * min(max(v, 0), hi) / hi)  # noqa: E731
    pts = np.array([(X(i), Y(l, top)) for i, l in zip(its, losses) if math.isfinite(l)], np.int32)
    if len(pts) > 1:
        cv2.polylines(img, [pts], False, (255, 0, 0), 1, cv2.LINE_AA)
    mp = np.array([(X(i), Y(100 * v, 100)) for i, v in map_history], np.int32)
    if len(mp) > 1:
        cv2.polylines(img, [mp], False, (0, 0, 255), 2, cv2.LINE_AA)
    for p in mp:
        cv2.circle(img, tuple(int(v) for v in p), 3, (0, 0, 255), -1)
    for i, label in marks:
        cv2.line(img, (X(i), m // 2), (X(i), Hc - m), (0, 160, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{label} ({i})", (X(i) + 4, m // 2 + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 160, 0), 1)
    cv2.putText(img, f"loss (blue, 0..{top:.2f})  mAP% (red, 0..100)", (m, Hc - 20),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, f"iteration 0..{max_batches}", (Wc - 250, Hc - 40), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1)
    tmp = path + ".tmp.png"
    cv2.imwrite(tmp, img)
    os.replace(tmp, path)
