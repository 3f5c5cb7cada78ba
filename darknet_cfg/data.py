"""Darknet-format detection data: ``obj.data``, list files, YOLO label files, augmentation, loader.

* ``read_data_file`` parses ``obj.data`` (``classes``, ``train``, ``valid``, ``names``, ``backup``)
  like darknet's ``read_data_cfg`` (``key = value`` lines, ``#`` comments).
* ``label_path_for`` finds an image's label file the way darknet does (``replace_image_to_label``:
  ``/JPEGImages/`` -> ``/labels/``, COCO ``/images/train2017/`` -> ``/labels/train2017/``, the
  extension -> ``.txt``; then, like the original darknet, ``images`` -> ``labels``).
* ``scan_dataset`` reads every label file once, reports each bad line once as ``path:line: reason``
  (and skips it), counts background images (no label file) and unreadable images, and returns a
  ``DatasetScan`` whose ``summary()`` is printed before training.
* ``DetectionDataset`` + ``ScaleBatchSampler`` + ``collate`` feed the trainer through a torch
  ``DataLoader`` with worker processes; images are decoded with OpenCV and augmented as darknet's
  OpenCV ``load_data_detection`` / ``image_data_augmentation`` do (jitter crop with the mean colour
  outside the image, optional letterbox, flip, HSV hue/saturation/exposure, blur, Gaussian noise),
  truths corrected as ``fill_truth_detection`` does; ``mosaic`` (4 pictures around a random cut,
  ``blend_truth_mosaic``) and ``mixup`` (2 pictures blended 0.5/0.5, truths united) as its
  ``use_mixup`` branches do.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DarknetError

__all__ = ["DataConfig", "read_data_file", "read_list", "label_path_for", "read_labels",
           "scan_dataset", "DatasetScan", "AugmentParams", "augment", "mosaic_images", "mixup_images",
           "DetectionDataset", "ScaleBatchSampler", "collate", "DataError"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(DarknetError):
    """A problem with the dataset (obj.data, list files, no usable image, classes mismatch)."""


# ------------------------------------------------------------------------------------ obj.data
@dataclass
class DataConfig:
    path: str
    classes: int
    train: Optional[str] = None
    valid: Optional[str] = None
    names: Optional[str] = None
    backup: str = "backup/"
    raw: Dict[str, str] = field(default_factory=dict)

    def class_names(self) -> List[str]:
        if self.names and os.path.isfile(self.names):
            with open(self.names, encoding="utf-8", errors="replace") as f:
                names = [ln.strip() for ln in f if ln.strip()]
            if names:
                return names
        return [str(i) for i in range(self.classes)]


def _resolve(value: str, base_dir: str) -> str:
    """darknet opens paths relative to the working directory; we also accept them relative to
    the obj.data folder (first existing wins, else the working-directory reading)."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    alt = os.path.join(base_dir, value)
    return alt if os.path.exists(alt) else value


def read_data_file(path) -> DataConfig:
    """Parse an ``obj.data`` file (darknet's read_data_cfg)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    raw: Dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            s = "".join(line.split())           # darknet strips all whitespace
            if not s or s[0] in "#;":
                continue
            if "=" not in s:
                raise DataError(f"{path}:{lineno}: expected key=value, got {line.strip()!r}")
            k, v = s.split("=", 1)
            raw.setdefault(k, v)
    base = os.path.dirname(os.path.abspath(path))
    try:
        classes = int(raw.get("classes", "20"))
    except ValueError:
        raise DataError(f"{path}: classes={raw.get('classes')!r} is not a number") from None
    get = lambda k: _resolve(raw[k], base) if raw.get(k) else None  # noqa: E731
    backup = raw.get("backup", "backup/")
    if not os.path.isabs(backup) and not os.path.isdir(backup) and os.path.isdir(os.path.join(base, backup)):
        backup = os.path.join(base, backup)
    return DataConfig(path, classes, get("train"), get("valid"), get("names"), backup, raw)


def read_list(path) -> List[str]:
    """Image paths of a list file, one per line (blank lines skipped; relative paths as darknet
    reads them, or relative to the list file's folder when that is where they exist)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: list file not found")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            s = line.strip()
            if s:
                out.append(_resolve(s, base))
    return out


# ------------------------------------------------------------------------------------ labels
_REPLACEMENTS = (("/images/train2017/", "/labels/train2017/"), ("/images/val2017/", "/labels/val2017/"),
                 ("/JPEGImages/", "/labels/"), ("\\images\\train2017\\", "\\labels\\train2017\\"),
                 ("\\images\\val2017\\", "\\labels\\val2017\\"), ("\\JPEGImages\\", "\\labels\\"))


def _with_txt(p: str) -> str:
    root, ext = os.path.splitext(p)
    return root + ".txt" if ext.lower() in IMAGE_EXTS else p + ".txt"


def label_path_for(image_path: str) -> str:
    """The label file darknet reads for ``image_path`` (the first candidate that exists; if none
    exists, AlexeyAB darknet's candidate)."""
    p = image_path
    for a, b in _REPLACEMENTS:
        p = p.replace(a, b)
    first = _with_txt(p)
    if os.path.exists(first):
        return first
    # the original darknet: images -> labels, JPEGImages -> labels
    d, name = os.path.split(image_path)
    parts = d.split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("images", "JPEGImages"):
            alt = _with_txt(os.path.join(os.sep.join(parts[:i] + ["labels"] + parts[i + 1:]), name))
            if os.path.exists(alt):
                return alt
    return first


def read_labels(path: str, classes: int, report: Callable[[str], None]) -> np.ndarray:
    """(n, 5) float32 ``class, x, y, w, h`` of the valid lines of a label file; every invalid line
    is reported once as ``path:line: reason`` and skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 5:
                report(f"{where}: expected 5 fields (class x_center y_center width height), "
                       f"got {len(fields)}")
                continue
            try:
                vals = [float(v) for v in fields]
            except ValueError:
                bad = next(v for v in fields if not _is_number(v))
                report(f"{where}: not a number: {bad!r}")
                continue
            if not all(math.isfinite(v) for v in vals):
                report(f"{where}: not a finite number")
                continue
            c, x, y, w, h = vals
            if c != int(c) or not 0 <= c < classes:
                report(f"{where}: class id {fields[0]} outside [0, {classes})")
                continue
            bad = [f"{n}={fields[k + 1]}" for k, (n, v) in enumerate(zip("xywh", (x, y, w, h)))
                   if not 0.0 <= v <= 1.0]
            if bad:
                report(f"{where}: coordinates outside [0, 1]: {', '.join(bad)}")
                continue
            if w <= 0 or h <= 0:
                report(f"{where}: box has zero width or height")
                continue
            rows.append((c, x, y, w, h))
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


_MAGIC = (b"\xff\xd8", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"P5", b"P6", b"P3", b"P2")


def _looks_readable(path: str) -> Optional[str]:
    """None if the file exists and starts like an image OpenCV reads; else the reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return e.strerror or "cannot open"
    if not head:
        return "empty file"
    from .preprocess import ImageDecodeError, check_image_size, decode_bgr
    try:
        if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            check_image_size(path)  # header only: decoding every image would be slow
        else:
            decode_bgr(path)
    except ImageDecodeError as e:
        return str(e).split(": ", 1)[-1]
    return None


@dataclass
class DatasetScan:
    """What scanning a list of images found."""
    images: List[str]
    labels: List[np.ndarray]
    listed: int = 0
    with_labels: int = 0
    background: int = 0
    unreadable: List[str] = field(default_factory=list)
    bad_lines: List[str] = field(default_factory=list)
    boxes: int = 0
    per_class: Optional[np.ndarray] = None

    def summary(self, name: str = "train") -> str:
        s = (f"{name}: {self.listed} images listed, {len(self.images)} usable "
             f"({self.with_labels} labelled, {self.background} background without a label file), "
             f"{self.boxes} boxes")
        skipped = []
        if self.unreadable:
            skipped.append(f"{len(self.unreadable)} unreadable images skipped")
        if self.bad_lines:
            skipped.append(f"{len(self.bad_lines)} bad label lines skipped")
        return s + ("; " + ", ".join(skipped) if skipped else "; nothing skipped")


def scan_dataset(images: Sequence[str], classes: int, report: Optional[Callable[[str], None]] = None,
                 check_images: bool = True) -> DatasetScan:
    """Read all labels of ``images``; report bad lines and unreadable images once each."""
    if report is None:
        def report(msg):
            print(f"warning: {msg}", file=sys.stderr)
    out = DatasetScan([], [], listed=len(images))
    per_class = np.zeros(classes, dtype=np.int64)
    for img in images:
        if check_images:
            why = _looks_readable(img)
            if why is not None:
                out.unreadable.append(img)
                report(f"{img}: unreadable image ({why}), skipped")
                continue
        lp = label_path_for(img)
        if os.path.isfile(lp):
            lab = read_labels(lp, classes, lambda m: (out.bad_lines.append(m), report(m)))
            out.with_labels += 1
        else:
            lab = np.zeros((0, 5), np.float32)
            out.background += 1
        out.images.append(img)
        out.labels.append(lab)
        out.boxes += len(lab)
        if len(lab):
            per_class += np.bincount(lab[:, 0].astype(np.int64), minlength=classes)
    out.per_class = per_class
    return out


# ------------------------------------------------------------------------------ augmentation
SINGLE, MIXUP, MOSAIC = 0, 1, 3          # darknet's use_mixup values a detector can end up with
MOSAIC_MIN_OFFSET = 0.2                  # the mosaic cut lies in [20 %, 80 %] of each side


@dataclass(frozen=True)
class AugmentParams:
    """What darknet's train_detector passes to load_data_detection (from [net] and the last
    detection layer). ``mosaic``/``mixup``/``cutmix`` combine as darknet's parser does (see
    ``mix_mode``); ``blur``, ``gaussian_noise`` act on each picture inside ``augment``."""
    jitter: float = 0.2
    resize: float = 1.0
    flip: int = 1
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0
    letter_box: int = 0
    max_boxes: int = 200
    augment: bool = True
    mosaic: int = 0
    mixup: int = 0
    cutmix: int = 0
    mosaic_bound: int = 0
    blur: int = 0
    gaussian_noise: int = 0

    @property
    def mix_mode(self) -> int:
        """How many pictures make one training image: MOSAIC (4), MIXUP (2) or SINGLE.

        darknet's parser: mosaic wins over mixup; cutmix gives use_mixup 2 (4 with mosaic), which
        its detector loader does not support: cutmix alone falls back to one picture, mosaic +
        cutmix to mosaic (CutMix is for classifiers only)."""
        if not self.augment:
            return SINGLE
        if self.mosaic:
            return MOSAIC
        if self.cutmix:
            return SINGLE
        return MIXUP if self.mixup else SINGLE

    @classmethod
    def from_model(cls, model, augment: bool = True) -> "AugmentParams":
        s = model.graph.net.settings
        last = model.graph.layers[-1]
        t = getattr(last, "train", None) or {}
        i = lambda k: int(s.get(k, 0) or 0)  # noqa: E731
        return cls(jitter=float(t.get("jitter", 0.2) or 0.0), resize=float(t.get("resize", 1.0) or 1.0),
                   flip=int(s.get("flip", 1)), hue=float(s.get("hue", 0.0)),
                   saturation=float(s.get("saturation", 1.0)), exposure=float(s.get("exposure", 1.0)),
                   letter_box=int(model.graph.net.letter_box), max_boxes=int(t.get("max", 200) or 200),
                   augment=augment, mosaic=i("mosaic"), mixup=i("mixup"), cutmix=i("cutmix"),
                   mosaic_bound=i("mosaic_bound"), blur=i("blur"), gaussian_noise=i("gaussian_noise"))


def _rand_scale(rng, s: float) -> float:
    """darknet's rand_scale: uniform in [1, s], inverted half of the time."""
    lo, hi = (1.0, s) if s >= 1 else (s, 1.0)
    scale = rng.uniform(lo, hi)
    return scale if rng.integers(2) else 1.0 / scale


def _precalc(lo: int, hi: int, r: float) -> int:
    if hi < lo:
        lo, hi = hi, lo
    return int(r * (hi - lo) + lo)


def _toward_corner(quadrant: int, flip: int, pleft: int, pright: int, ptop: int, pbot: int):
    """Move the crop window of a mosaic piece (same crop size) so that the part of the picture
    the quadrant shows is the picture's own edge rather than the padding (darknet does this for
    half of the pieces)."""
    keep_left = (quadrant % 2 == 1) != bool(flip)        # the crop keeps the picture's left edge
    pleft, pright = (pleft + pright, 0) if keep_left else (0, pleft + pright)
    ptop, pbot = (ptop + pbot, 0) if quadrant >= 2 else (0, ptop + pbot)
    return pleft, pright, ptop, pbot


def _blur(sized: np.ndarray, blur: int, truths: np.ndarray) -> np.ndarray:
    """image_data_augmentation's blur of an HxWx3 uint8 picture: ``blur == 1`` blurs the
    background only (17x17 Gaussian, the truth boxes keep their pixels), ``blur > 1`` blurs
    everything with a (blur//2*2+1)-wide Gaussian."""
    import cv2
    k = 17 if blur == 1 else blur // 2 * 2 + 1
    out = cv2.GaussianBlur(sized, (k, k), 0)
    if blur == 1:
        hh, ww = sized.shape[:2]
        for _, x, y, bw, bh in truths.astype(np.float64):   # a few boxes, whole slices each
            x0, y0 = int((x - bw / 2) * ww), int((y - bh / 2) * hh)
            x1, y1 = x0 + int(bw * ww), y0 + int(bh * hh)
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, ww), min(y1, hh)
            if x1 > x0 and y1 > y0:
                out[y0:y1, x0:x1] = sized[y0:y1, x0:x1]
    return out


def _gaussian_noise(sized: np.ndarray, sigma: int, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, sigma) noise (sigma in 0..127 pixel levels) to an HxWx3 uint8 picture."""
    sigma = min(max(int(sigma), 0), 127)
    # darknet draws the noise into a uint8 matrix, which clips its negative half (the noise only
    # brightens); we add the zero-mean noise it asks for
    noisy = sized.astype(np.float32) + rng.normal(0.0, sigma, sized.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _augment_one(img: np.ndarray, boxes: np.ndarray, w: int, h: int, p: AugmentParams,
                 rng: np.random.Generator, quadrant: Optional[int] = None):
    """``augment`` plus the crop offsets ``(pleft, pright, ptop, pbot, flip)`` it used (a mosaic
    needs them); ``quadrant`` (0..3 = top-left, top-right, bottom-left, bottom-right) marks a
    mosaic piece."""
    import cv2
    oh, ow = img.shape[:2]
    blur = noise = 0
    if p.augment:
        dw, dh = int(ow * p.jitter), int(oh * p.jitter)
        rdown = p.resize if p.resize <= 1 else 1 / p.resize
        rup = p.resize if p.resize >= 1 else 1 / p.resize
        min_rdw, min_rdh = int(ow * (1 - 1 / rdown) / 2), int(oh * (1 - 1 / rdown) / 2)
        max_rdw, max_rdh = int(ow * (1 - 1 / rup) / 2), int(oh * (1 - 1 / rup) / 2)
        rr1, rr2 = rng.random(), rng.random()
        r1, r2, r3, r4 = rng.random(4)
        flip = int(rng.integers(2)) if p.flip else 0
        dhue = rng.uniform(-p.hue, p.hue) if p.hue else 0.0
        dsat = _rand_scale(rng, p.saturation)
        dexp = _rand_scale(rng, p.exposure)
        if p.blur:                       # a third each: none, background only, the cfg's blur
            blur = (0, 1, p.blur)[int(rng.integers(3))]
        if p.gaussian_noise and rng.integers(2):
            noise = p.gaussian_noise
        pleft, pright = _precalc(-dw, dw, r1), _precalc(-dw, dw, r2)
        ptop, pbot = _precalc(-dh, dh, r3), _precalc(-dh, dh, r4)
        if p.resize < 1:
            pleft += _precalc(min_rdw, 0, rr1)
            pright += _precalc(min_rdw, 0, rr2)
            ptop += _precalc(min_rdh, 0, rr1)
            pbot += _precalc(min_rdh, 0, rr2)
        else:
            pleft += _precalc(min_rdw, max_rdw, rr1)
            pright += _precalc(min_rdw, max_rdw, rr2)
            ptop += _precalc(min_rdh, max_rdh, rr1)
            pbot += _precalc(min_rdh, max_rdh, rr2)
    else:
        pleft = pright = ptop = pbot = 0
        flip, dhue, dsat, dexp = 0, 0.0, 1.0, 1.0
    if p.letter_box:
        img_ar, net_ar = ow / oh, w / h
        if img_ar / net_ar > 1:
            delta_h = (ow / net_ar - oh) / 2
            ptop, pbot = int(ptop - delta_h), int(pbot - delta_h)
        else:
            delta_w = (oh * net_ar - ow) / 2
            pleft, pright = int(pleft - delta_w), int(pright - delta_w)
    if quadrant is not None and rng.integers(2) == 0:
        pleft, pright, ptop, pbot = _toward_corner(quadrant, flip, pleft, pright, ptop, pbot)
    swidth, sheight = ow - pleft - pright, oh - ptop - pbot
    if swidth <= 0 or sheight <= 0 or ow - pleft <= 0 or oh - ptop <= 0:
        pleft = pright = ptop = pbot = 0                  # darknet: "invalid resize. Resetting..."
        swidth, sheight = ow, oh

    # crop (mean colour outside the image), resize, flip
    if pleft == 0 and ptop == 0 and (swidth, sheight) == (ow, oh):
        crop = img
    else:
        crop = np.empty((sheight, swidth, 3), np.uint8)
        crop[:] = np.round(img.reshape(-1, 3).mean(0)).astype(np.uint8)
        x0, y0 = max(pleft, 0), max(ptop, 0)
        x1, y1 = min(pleft + swidth, ow), min(ptop + sheight, oh)
        if x1 > x0 and y1 > y0:
            crop[y0 - ptop:y1 - ptop, x0 - pleft:x1 - pleft] = img[y0:y1, x0:x1]
    sized = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR) if crop.shape[:2] != (h, w) else crop
    if flip:
        sized = sized[:, ::-1]
    if dsat != 1 or dexp != 1 or dhue != 0:
        hsv = cv2.cvtColor(np.ascontiguousarray(sized), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 1] *= dsat
        hsv[..., 2] *= dexp
        hsv[..., 0] = np.clip(hsv[..., 0] + 179 * dhue, 0, 255)
        hsv[..., 0] = np.mod(hsv[..., 0], 180)          # OpenCV's 8-bit HSV2RGB wraps the hue
        hsv = np.clip(np.round(hsv), 0, 255).astype(np.uint8)
        sized = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    # truths (correct_boxes + fill_truth_detection)
    sx, sy = swidth / ow, sheight / oh
    dx, dy = (pleft / ow) / sx, (ptop / oh) / sy
    b = boxes.astype(np.float64)
    if len(b):
        b = b[rng.permutation(len(b))]                    # randomize_boxes
    keep = ~((b[:, 1] + b[:, 3] / 2 < 0) | (b[:, 2] + b[:, 4] / 2 < 0) |
             (b[:, 1] - b[:, 3] / 2 > 1) | (b[:, 2] - b[:, 4] / 2 > 1))
    b = b[keep]
    left = (b[:, 1] - b[:, 3] / 2) / sx - dx
    right = (b[:, 1] + b[:, 3] / 2) / sx - dx
    top = (b[:, 2] - b[:, 4] / 2) / sy - dy
    bottom = (b[:, 2] + b[:, 4] / 2) / sy - dy
    if flip:
        left, right = 1 - right, 1 - left
    left, right = np.clip(left, 0, 1), np.clip(right, 0, 1)
    top, bottom = np.clip(top, 0, 1), np.clip(bottom, 0, 1)
    nb = np.stack([b[:, 0], (left + right) / 2, (top + bottom) / 2,
                   np.clip(right - left, 0, 1), np.clip(bottom - top, 0, 1)], 1)
    nb = nb[(nb[:, 3] >= 1.0 / w) & (nb[:, 4] >= 1.0 / h)]   # smaller than one pixel: dropped
    nb = nb[(nb[:, 1] > 0) & (nb[:, 2] > 0)]
    nb = nb[: p.max_boxes]

    # blur and noise (after the colour changes, on the 8-bit picture, as darknet)
    if blur > 1:
        # a strong blur is limited to 1/8 of the smallest object side (none without objects)
        min_side = int(min((nb[:, 3] * w).min(), (nb[:, 4] * h).min())) if len(nb) else 0
        blur = min(blur, min_side // 8)
    if blur:
        sized = _blur(np.ascontiguousarray(sized), blur, nb)
    if noise:
        sized = _gaussian_noise(sized, noise, rng)
    out = np.ascontiguousarray(np.asarray(sized).transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
    return out, nb.astype(np.float32), (pleft, pright, ptop, pbot, flip)


def augment(img: np.ndarray, boxes: np.ndarray, w: int, h: int, p: AugmentParams,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Darknet's OpenCV training augmentation of one image.

    ``img``: HxWx3 uint8 RGB; ``boxes``: (n, 5) ``class, x, y, w, h`` relative to the image.
    Returns (3, h, w) float32 in [0, 1] and the corrected (k, 5) truths (boxes that leave the
    crop or end up smaller than one network pixel are dropped, like fill_truth_detection).
    Jitter/resize crop, letterbox, flip, HSV, then ``blur`` and ``gaussian_noise`` when set;
    mosaic and mixup need several images: ``mosaic_images`` / ``mixup_images``."""
    out, truths, _ = _augment_one(img, boxes, w, h, p, rng)
    return out, truths


def mixup_images(samples: Sequence[Tuple[np.ndarray, np.ndarray]], w: int, h: int, p: AugmentParams,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """darknet's detector MixUp: two pictures, each augmented on its own, blended 0.5/0.5; the
    truths are the first picture's followed by the second's (at most ``max_boxes``)."""
    (xa, ta), (xb, tb) = (augment(img, lab, w, h, p, rng) for img, lab in samples[:2])
    x = xa * np.float32(0.5) + xb * np.float32(0.5)
    return x, np.concatenate([ta, tb])[: p.max_boxes]


def _mosaic_truths(t: np.ndarray, quadrant: int, shift_x: int, shift_y: int, cut_x: int, cut_y: int,
                   w: int, h: int, bound: int) -> np.ndarray:
    """blend_truth_mosaic: move a piece's truths by the pixel shift of its quadrant, clip them to
    the whole image (``mosaic_bound=0``) or to their quadrant (``mosaic_bound=1``), and keep those
    that stay inside the image and are more than one pixel wide and high."""
    if not len(t):
        return t
    xb = t[:, 1].astype(np.float64) + shift_x / w
    yb = t[:, 2].astype(np.float64) + shift_y / h
    wb, hb = t[:, 3].astype(np.float64), t[:, 4].astype(np.float64)

    def edges(xb, yb, wb, hb):        # darknet keeps the edges as ints (truncated pixel indices)
        return (np.trunc((xb - wb / 2) * w), np.trunc((xb + wb / 2) * w),
                np.trunc((yb - hb / 2) * h), np.trunc((yb + hb / 2) * h))

    left, right, top, bot = edges(xb, yb, wb, hb)
    if bound:
        lo_x, hi_x = (cut_x, w) if quadrant % 2 else (0, cut_x)
        lo_y, hi_y = (cut_y, h) if quadrant >= 2 else (0, cut_y)
        left, right = np.maximum(left, lo_x), np.minimum(right, hi_x)
        top, bot = np.maximum(top, lo_y), np.minimum(bot, hi_y)
        xb, wb = (right + left) / 2 / w, (right - left) / w
        yb, hb = (bot + top) / 2 / h, (bot - top) / h
    else:
        over = np.minimum(left, 0) / w                   # the part left of the image (<= 0)
        xb, wb = xb - over / 2, wb + over
        over = np.maximum(right - w, 0) / w              # the part right of the image (>= 0)
        xb, wb = xb - over / 2, wb - over
        over = np.minimum(top, 0) / h
        yb, hb = yb - over / 2, hb + over
        over = np.maximum(bot - h, 0) / h
        yb, hb = yb - over / 2, hb - over
        left, right, top, bot = edges(xb, yb, wb, hb)
    keep = ((left >= 0) & (right <= w) & (top >= 0) & (bot <= h) & (wb > 0) & (wb < 1) & (hb > 0)
            & (hb < 1) & (xb > 0) & (xb < 1) & (yb > 0) & (yb < 1) & (wb > 1 / w) & (hb > 1 / h))
    # darknet tests the truncated edges, so an edge may lie up to a pixel outside: clip it
    x0, x1 = np.clip(xb - wb / 2, 0, 1), np.clip(xb + wb / 2, 0, 1)
    y0, y1 = np.clip(yb - hb / 2, 0, 1), np.clip(yb + hb / 2, 0, 1)
    out = np.stack([t[:, 0], (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1)
    keep &= (out[:, 3] >= 1 / w) & (out[:, 4] >= 1 / h)  # still a pixel after the clip
    return out[keep].astype(np.float32)


def mosaic_images(samples: Sequence[Tuple[np.ndarray, np.ndarray]], w: int, h: int, p: AugmentParams,
                  rng: np.random.Generator, cut: Optional[Tuple[int, int]] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """darknet's 4-picture mosaic (load_data_detection with use_mixup 3).

    ``samples``: four ``(img, boxes)`` for the top-left, top-right, bottom-left and bottom-right
    quadrants. The image is split at ``cut = (cut_x, cut_y)`` (drawn uniformly in
    [0.2*side, 0.8*side] when not given). Each picture is augmented to the full w x h on its own
    (half of them with the crop pushed toward their corner); the quadrant shows the part of it
    that touches the cut (bottom-right part of the picture in the top-left quadrant, ...),
    shifted inward by the padding the jitter added on that side. Truths follow
    ``_mosaic_truths``; at most ``max_boxes`` in quadrant order."""
    if cut is None:
        cut_x = int(rng.integers(int(w * MOSAIC_MIN_OFFSET), int(w * (1 - MOSAIC_MIN_OFFSET)) + 1))
        cut_y = int(rng.integers(int(h * MOSAIC_MIN_OFFSET), int(h * (1 - MOSAIC_MIN_OFFSET)) + 1))
    else:
        cut_x, cut_y = cut
    out = np.empty((3, h, w), np.float32)
    truths = []
    for q, (img, boxes) in enumerate(samples[:4]):
        piece, t, (pleft, pright, ptop, pbot, flip) = _augment_one(img, boxes, w, h, p, rng, quadrant=q)
        # the padding each side got, in network pixels (the crop is sw x sh before the resize)
        sw, sh = img.shape[1] - pleft - pright, img.shape[0] - ptop - pbot
        if flip:                                   # the flipped picture's padding changes side
            pleft, pright = pright, pleft
        # darknet scales by w/ow instead of w/sw: the shift misses the padding and boxes cross the cut
        left_shift = min(cut_x, max(0, -pleft * w // sw))
        right_shift = min(w - cut_x, max(0, -pright * w // sw))
        top_shift = min(cut_y, max(0, -ptop * h // sh))
        bot_shift = min(h - cut_y, max(0, -pbot * h // sh))
        if q % 2:                                  # right column: [cut_x, w) <- [left_shift, ...)
            dst_x, src_x = slice(cut_x, w), left_shift
        else:                                      # left column: [0, cut_x) <- [..., w - right_shift)
            dst_x, src_x = slice(0, cut_x), w - cut_x - right_shift
        if q >= 2:
            dst_y, src_y = slice(cut_y, h), top_shift
        else:
            dst_y, src_y = slice(0, cut_y), h - cut_y - bot_shift
        nx, ny = dst_x.stop - dst_x.start, dst_y.stop - dst_y.start
        out[:, dst_y, dst_x] = piece[:, src_y:src_y + ny, src_x:src_x + nx]
        truths.append(_mosaic_truths(t, q, dst_x.start - src_x, dst_y.start - src_y, cut_x, cut_y,
                                     w, h, p.mosaic_bound))
    return out, np.concatenate(truths)[: p.max_boxes]


# ----------------------------------------------------------------------------- dataset/loader
class DetectionDataset:
    """Map-style dataset; items are requested as ``(index, width, height, seed)`` tuples by
    ScaleBatchSampler (so multi-scale training changes the size in the workers too). With
    mosaic/mixup, half of the items (darknet's coin flip) combine the requested picture with 3
    (mosaic) or 1 (mixup) others drawn at random with the item's generator, as darknet draws
    random pictures."""

    def __init__(self, images: Sequence[str], labels: Sequence[np.ndarray], params: AugmentParams):
        self.images, self.labels, self.params = list(images), list(labels), params
        self._warned = set()

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, i: int):
        import cv2
        from .preprocess import ImageDecodeError, decode_bgr
        try:
            bgr = decode_bgr(self.images[i], exif_orientation=True)  # as imread in Darknet
        except (ImageDecodeError, OSError):
            return None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _load(self, i: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """(RGB picture, labels) of item ``i``, or of a random decodable one if it fails."""
        img = self._read(i)
        tries = 0
        while img is None:                            # decode failure: warn once, use another
            if i not in self._warned:
                self._warned.add(i)
                warnings.warn(f"{self.images[i]}: cannot decode image, using another one")
            i = int(rng.integers(len(self.images)))
            img = self._read(i)
            tries += 1
            if tries > 100:
                raise DataError("no decodable image found")
        return img, self.labels[i]

    def __getitem__(self, item):
        i, w, h, seed = item
        rng = np.random.default_rng(seed)
        p = self.params
        mode = p.mix_mode
        if mode != SINGLE and rng.integers(2) == 0:     # darknet: half the time one picture
            mode = SINGLE
        if mode == SINGLE:
            img, lab = self._load(i, rng)
            return augment(img, lab, w, h, p, rng)
        others = rng.integers(len(self.images), size=3 if mode == MOSAIC else 1)
        samples = [self._load(k, rng) for k in [i, *map(int, others)]]
        if mode == MOSAIC:
            return mosaic_images(samples, w, h, p, rng)
        return mixup_images(samples, w, h, p, rng)


def collate(items):
    import torch
    xs = torch.from_numpy(np.stack([x for x, _ in items]))
    rows = [np.concatenate([np.full((len(t), 1), k, np.float32), t], 1) for k, (_, t) in enumerate(items)]
    targets = torch.from_numpy(np.concatenate(rows, 0) if rows else np.zeros((0, 6), np.float32))
    return xs, targets


class ThreadedBatches:
    """Batches loaded in the training process itself, the images of a batch decoded and
    augmented on ``threads`` threads (OpenCV releases the GIL). On a machine whose cores all
    run the training step, this beats worker processes, whose work preempts the step's OpenMP
    threads (yolov4-tiny@224 on 2 cores, interleaved runs: 19.6-20.4 images/s in-process vs
    18.9-19.0 with one worker)."""

    def __init__(self, dataset, batch_sampler, threads: int):
        self.dataset, self.batch_sampler, self.threads = dataset, batch_sampler, max(1, threads)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.threads, thread_name_prefix="darknet-cfg-data") as pool:
            for batch in self.batch_sampler:
                yield collate(list(pool.map(self.dataset.__getitem__, batch)))

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ScaleBatchSampler:
    """Infinite batch sampler: for each training iteration ``subdivisions`` mini-batches of
    ``(index, w, h, seed)``; images are drawn epoch by epoch in shuffled order. ``size_for(it)``
    gives the network size of iteration ``it`` (multi-scale training)."""

    def __init__(self, n: int, mini_batch: int, subdivisions: int, start_iteration: int,
                 end_iteration: int, size_for: Callable[[int], Tuple[int, int]], seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.mb, self.sub = n, mini_batch, subdivisions
        self.start, self.end, self.size_for, self.seed = start_iteration, end_iteration, size_for, seed
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[List[Tuple[int, int, int, int]]]:
        rng = np.random.default_rng([self.seed, self.start])
        order, pos = rng.permutation(self.n), 0
        per_iter = self.mb * self.sub * self.world
        for it in range(self.start, self.end):
            w, h = self.size_for(it)
            picks = []
            while len(picks) < per_iter:
                if pos >= len(order):
                    order, pos = rng.permutation(self.n), 0
                take = min(per_iter - len(picks), len(order) - pos)
                picks.extend(order[pos:pos + take].tolist())
                pos += take
            seeds = rng.integers(0, 2 ** 62, size=per_iter)
            for s in range(self.sub):
                lo = (self.rank * self.sub + s) * self.mb
                yield [(int(picks[k]), w, h, int(seeds[k])) for k in range(lo, lo + self.mb)]

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.sub
