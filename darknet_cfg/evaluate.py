"""Detection accuracy as ``darknet detector map`` computes it (``validate_detector_map``).

Per validation image: the network input as ``detector test`` makes it (darknet's resize or
letterbox), ``get_network_boxes`` at thresh 0.005 (hier 0.5), NMS 0.45 of the last layer's kind,
then every (box, class) with prob > 0 is a detection, matched to the same-class truth with the
highest IoU above ``iou_thresh`` (each truth counts once, in descending-probability order).
AP per class: ``points=0`` area under the monotone PR curve (VOC2010+/ImageNet), ``points=11``
or ``101`` interpolated recall points (VOC2007 / COCO style); precision, recall, F1, TP, FP, FN
and average IoU at ``thresh=0.25``. ``coco_map`` adds COCO AP@[.5:.95] through pycocotools.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .postprocess import Detections, HeadParams, box_iou_matrix, get_network_boxes

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
            device=None, batch: int = 16) -> List[Detections]:
    """Darknet's detections (after NMS) for each image path; boxes relative to the image."""
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
    try:
        for s in range(0, len(images), batch):
            chunk = images[s:s + batch]
            ims = [load_image(p) for p in chunk]
            x = torch.from_numpy(np.stack([detector_input(im, W, H, lb) for im in ims])).to(dev)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            outs = [t.float().cpu().contiguous() for t in model(x)]
            for k, im in enumerate(ims):
                o = {li: t[k].numpy() for li, t in zip(heads, outs)}
                d = get_network_boxes(o, heads, W, H, im.shape[2], im.shape[1], thresh=thresh,
                                      letter_box=lb)
                if nms:
                    d = nms_matrix(d, nms, kind=kind, beta_nms=beta)  # do_nms, vectorised
                out.append(d)
    finally:
        model.train(was)
    return out


@dataclass
class _Det:
    p: float
    image: int
    cls: int
    truth: int     # unique truth index or -1


def compute_map(dets: Sequence[Detections], truths: Sequence[np.ndarray], classes: int,
                iou_thresh: float = 0.5, points: int = 0, thresh: float = 0.25) -> Dict:
    """validate_detector_map's statistics. ``truths[i]``: (n, 5) ``class, x, y, w, h``."""
    records: List[_Det] = []
    truth_count = np.zeros(classes, np.int64)
    unique = 0
    tp_t = fp_t = 0
    avg_iou = 0.0
    tp_c = np.zeros(classes, np.int64)
    fp_c = np.zeros(classes, np.int64)
    for img, (d, t) in enumerate(zip(dets, truths)):
        t = np.asarray(t, np.float32).reshape(-1, 5)
        for c in t[:, 0].astype(np.int64):
            if 0 <= c < classes:
                truth_count[c] += 1
        ious = box_iou_matrix(d.boxes, t[:, 1:5]) if len(d) and len(t) else np.zeros((len(d), len(t)), np.float32)
        checkpoint = len(records)
        for i in range(len(d)):
            for c in np.flatnonzero(d.probs[i] > 0):
                prob = float(d.probs[i, c])
                ti, best = -1, 0.0
                for j in range(len(t)):
                    if ious[i, j] > iou_thresh and int(t[j, 0]) == c and ious[i, j] > best:
                        best, ti = float(ious[i, j]), unique + j
                records.append(_Det(prob, img, int(c), ti))
                if prob > thresh:
                    found = any(r.truth == ti for r in records[checkpoint:-1])
                    if ti > -1 and not found:
                        avg_iou += best
                        tp_t += 1
                        tp_c[c] += 1
                    else:
                        fp_t += 1
                        fp_c[c] += 1
        unique += len(t)
    records.sort(key=lambda r: -r.p)
    n = len(records)
    ap = np.zeros(classes)
    if n:
        cls = np.array([r.cls for r in records])
        used = np.zeros(unique, bool)
        is_tp = np.zeros(n, bool)
        for k, r in enumerate(records):
            if r.truth >= 0 and not used[r.truth]:
                used[r.truth] = True
                is_tp[k] = True
        for c in range(classes):
            tp = np.cumsum(is_tp & (cls == c)).astype(np.float64)
            fp = np.cumsum(~is_tp & (cls == c)).astype(np.float64)
            fn = truth_count[c] - tp
            with np.errstate(invalid="ignore", divide="ignore"):
                prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
                rec = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
            if points == 0:
                last_r, last_p, s = rec[-1], prec[-1], 0.0
                for k in range(n - 2, -1, -1):
                    s += (last_r - rec[k]) * last_p
                    last_r = rec[k]
                    if prec[k] > last_p:
                        last_p = prec[k]
                s += last_r * last_p
                ap[c] = s
            else:
                s = 0.0
                for pt in range(points):
                    r0 = pt / (points - 1)
                    ok = rec >= r0
                    s += prec[ok].max() if ok.any() else 0.0
                ap[c] = s / points
    precision = tp_t / (tp_t + fp_t) if tp_t + fp_t else float("nan")
    recall = tp_t / unique if unique else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if (precision + recall) > 0 else float("nan")
    return dict(map=float(ap.mean()) if classes else 0.0, ap=ap.tolist(), iou_thresh=iou_thresh,
                points=points, thresh=thresh, precision=precision, recall=recall, f1=f1, tp=tp_t,
                fp=fp_t, fn=unique - tp_t, truths=unique, detections=n,
                avg_iou=avg_iou / (tp_t + fp_t) if tp_t + fp_t else 0.0, tp_per_class=tp_c.tolist(),
                fp_per_class=fp_c.tolist(), truth_per_class=truth_count.tolist())


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
                   coco: bool = False) -> Dict:
    dets = predict(model, list(images), device=device)
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
    lines = []
    for c, ap in enumerate(res["ap"]):
        name = names[c] if c < len(names) else str(c)
        lines.append(f"class_id = {c}, name = {name}, ap = {100 * ap:.2f}%   \t "
                     f"(TP = {res['tp_per_class'][c]}, FP = {res['fp_per_class'][c]}) ")
    p, r, f1 = res["precision"], res["recall"], res["f1"]
    lines.append("")
    lines.append(f" for conf_thresh = {res['thresh']:.2f}, precision = {p:.2f}, recall = {r:.2f}, "
                 f"F1-score = {f1:.2f} ")
    lines.append(f" for conf_thresh = {res['thresh']:.2f}, TP = {res['tp']}, FP = {res['fp']}, "
                 f"FN = {res['fn']}, average IoU = {100 * res['avg_iou']:.2f} % ")
    kind = {0: "area-under-curve", 11: "11 recall points", 101: "101 recall points"}.get(
        res["points"], f"{res['points']} recall points")
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


def draw_chart(path: str, loss_history, map_history, max_batches: int, max_loss: float = 20.0) -> None:
    """Darknet-style chart: loss (blue) and mAP % (red) against iteration; matplotlib if present,
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
    cv2.putText(img, f"loss (blue, 0..{top:.2f})  mAP% (red, 0..100)", (m, Hc - 20),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, f"iteration 0..{max_batches}", (Wc - 250, Hc - 40), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1)
    tmp = path + ".tmp.png"
    cv2.imwrite(tmp, img)
    os.replace(tmp, path)
