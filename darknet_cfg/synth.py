"""A small synthetic detection dataset in Darknet's format (for tests, demos and benchmarks).

``make_synthetic(outdir, images=400, classes=3, size=224, valid=100)`` writes::

    outdir/obj/train_00000.jpg + .txt   (label beside the image: every darknet fork finds it)
    outdir/obj/valid_00000.jpg + .txt
    outdir/train.txt, valid.txt          (absolute image paths)
    outdir/obj.names, obj.data           (classes, train, valid, names, backup=outdir/backup)

Objects are filled shapes (one class per shape kind) with random colours, sizes (8-45 % of the
image side), aspect ratios and rotations, 1-6 per image, allowed to overlap a little, on
random backgrounds (colour gradients, noise, low-contrast clutter). About 5 % of the images are
background images without a label file (as darknet allows).
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

SHAPES = ("rectangle", "ellipse", "triangle", "cross", "diamond", "star", "ring", "hexagon")


def _polygon(kind: str, w: float, h: float, angle: float) -> np.ndarray:
    """Outline points (k, 2) of a shape centred at 0 with box half sizes w/2, h/2."""
    if kind == "rectangle":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif kind == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif kind == "cross":
        a = 0.33
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
               (-1, -a), (-a, -a)]
    elif kind == "star":
        pts = [(np.cos(t) * r, np.sin(t) * r) for k in range(10)
               for t, r in [(-np.pi / 2 + k * np.pi / 5, 1.0 if k % 2 == 0 else 0.45)]]
    elif kind == "hexagon":
        pts = [(np.cos(k * np.pi / 3), np.sin(k * np.pi / 3)) for k in range(6)]
    else:  # ellipse / ring
        pts = [(np.cos(t), np.sin(t)) for t in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    p = np.asarray(pts, np.float64) * [w / 2, h / 2]
    c, s = np.cos(angle), np.sin(angle)
    return p @ np.array([[c, s], [-s, c]])


def _background(rng, size: int) -> np.ndarray:
    import cv2
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    img = (c0 * (1 - t) + c1 * t) * np.ones((1, size, 1))
    if rng.random() < 0.5:
        img = img.transpose(1, 0, 2)
    img = img + rng.normal(0, rng.uniform(2, 12), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, 6)):               # low-contrast clutter
        col = tuple(int(v) for v in np.clip(img.reshape(-1, 3).mean(0) + rng.normal(0, 25, 3), 0, 255))
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(img, tuple(map(int, p1)), tuple(map(int, p2)), col, int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def draw_sample(rng: np.random.Generator, size: int, classes: int, max_objects: int = 6
                ) -> Tuple[np.ndarray, List[Tuple[int, float, float, float, float]]]:
    """One RGB uint8 image and its labels ``(class, x, y, w, h)`` (relative)."""
    import cv2
    img = _background(rng, size)
    boxes: List[Tuple[int, float, float, float, float]] = []
    placed: List[Tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(classes))
            kind = SHAPES[cls % len(SHAPES)]
            s = rng.uniform(0.08, 0.45) * size
            ar = rng.uniform(0.65, 1.5)
            w, h = s * np.sqrt(ar), s / np.sqrt(ar)
            ang = rng.uniform(-0.5, 0.5) if kind not in ("ellipse", "ring") else rng.uniform(0, np.pi)
            poly = _polygon(kind, w, h, ang)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            bw, bh = x1 - x0, y1 - y0
            if bw >= size - 2 or bh >= size - 2:
                continue
            cx = rng.uniform(-x0 + 1, size - 1 - x1)
            cy = rng.uniform(-y0 + 1, size - 1 - y1)
            box = (cx + x0, cy + y0, cx + x1, cy + y1)
            if any(_iou(box, b) > 0.25 for b in placed):
                continue
            bg = img[int(box[1]):int(box[3]) + 1, int(box[0]):int(box[2]) + 1].reshape(-1, 3).mean(0)
            col = rng.integers(0, 256, 3)
            while np.abs(col - bg).sum() < 150:       # keep the shape visible
                col = rng.integers(0, 256, 3)
            pts = np.round((poly + [cx, cy]) * 16).astype(np.int32)
            colour = tuple(int(v) for v in col)
            cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, shift=4)
            if kind == "ring":
                inner = np.round((_polygon(kind, w * 0.5, h * 0.5, ang) + [cx, cy]) * 16).astype(np.int32)
                cv2.fillPoly(img, [inner], tuple(int(v) for v in bg), cv2.LINE_AA, shift=4)
            placed.append(box)
            boxes.append((cls, (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size,
                          bw / size, bh / size))
            break
    return img, boxes


def _iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_synthetic(outdir, images: int = 400, classes: int = 3, size: int = 224, valid: int = None,
                   seed: int = 0, ext: str = "jpg", background_fraction: float = 0.05) -> Dict[str, str]:
    """Write the dataset; returns the paths of obj.data, train.txt, valid.txt, obj.names."""
    import cv2
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be 1..{len(SHAPES)} (one shape per class: {', '.join(SHAPES)})")
    if images < 1 or size < 16:
        raise ValueError("need at least 1 image of at least 16x16")
    valid = max(1, images // 5) if valid is None else valid
    outdir = os.path.abspath(os.fspath(outdir))
    obj = os.path.join(outdir, "obj")
    os.makedirs(obj, exist_ok=True)
    os.makedirs(os.path.join(outdir, "backup"), exist_ok=True)
    rng = np.random.default_rng(seed)
    lists = {}
    for split, n in (("train", images), ("valid", valid)):
        paths = []
        for k in range(n):
            img, boxes = draw_sample(rng, size, classes)
            stem = os.path.join(obj, f"{split}_{k:05d}")
            path = f"{stem}.{ext}"
            if split == "train" and rng.random() < background_fraction:
                img = _background(rng, size)
                boxes = None
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in ("jpg", "jpeg") else []
            cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
            if boxes is not None:
                with open(stem + ".txt", "w") as f:
                    for c, x, y, w, h in boxes:
                        f.write(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n")
            elif os.path.exists(stem + ".txt"):
                os.unlink(stem + ".txt")
            paths.append(path)
        lists[split] = os.path.join(outdir, f"{split}.txt")
        with open(lists[split], "w") as f:
            f.write("\n".join(paths) + "\n")
    names = os.path.join(outdir, "obj.names")
    with open(names, "w") as f:
        f.write("\n".join(SHAPES[:classes]) + "\n")
    data = os.path.join(outdir, "obj.data")
    with open(data, "w") as f:
        f.write(f"classes = {classes}\ntrain = {lists['train']}\nvalid = {lists['valid']}\n"
                f"names = {names}\nbackup = {os.path.join(outdir, 'backup')}\n")
    return dict(data=data, train=lists["train"], valid=lists["valid"], names=names)
