"""Accuracy cost of the low-precision CPU paths (Detector precision="bf16" / "int8").

    python bench/lowp_accuracy.py --trained OUT      # OUT: a bench/train_map.py --out folder
    python bench/lowp_accuracy.py --oracle yolov4-tiny yolov3-tiny ...

``--trained``: the model ``darknet-cfg train`` wrote there (``backup/*_final.weights``, the cfg
beside it), evaluated on its synthetic validation set as ``darknet detector map`` does (thresh
0.005, NMS 0.45): mAP@0.5 and COCO AP@[.5:.95] for float32, bf16 and int8 (int8 calibrated on
the first ``--calib-count`` training images). ``--oracle``: the oracle detectors (synthetic
weights) on dog.png at the oracle's thresholds, before NMS: the largest box-coordinate
(relative to the image) and class-probability differences (where both are above the threshold)
to float32 over the boxes both keep, how
many boxes only one of them keeps (objectness crossing the threshold), and the boxes left with
a class after NMS.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "int8")


def trained(out: str, calib_count: int):
    import cv2
    import darknet_cfg
    from darknet_cfg.data import read_data_file, read_list, scan_dataset
    from darknet_cfg.evaluate import coco_map, compute_map
    from darknet_cfg.infer import Detector
    cfg = os.path.join(out, "yolov4-tiny-mini.cfg")
    weights = sorted(glob.glob(os.path.join(out, "backup", "*_final.weights")))[-1]
    data = read_data_file(os.path.join(out, "data", "obj.data"))
    val = scan_dataset(read_list(data.valid), data.classes)
    calib = read_list(data.train)[:calib_count]
    sizes = [(im.shape[1], im.shape[0]) for im in (cv2.imread(p) for p in val.images)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prec in PRECISIONS:
            t0 = time.time()
            det = Detector(darknet_cfg.load(cfg, weights).fuse(), thresh=0.005, nms=0.45,
                           precision=prec, calib=calib, calib_count=calib_count,
                           calib_cache=os.path.join(tmp, "c.onnx"))
            t1 = time.time()
            dets = det.detect(val.images, batch_size=16)
            m = compute_map(dets, val.labels, data.classes)
            c = coco_map(dets, val.labels, sizes, data.classes) or {"ap": float("nan")}
            rows.append((prec, det.precision, m["map"], c["ap"], t1 - t0))
            print(f"{prec}: runs {det.precision}, mAP@0.5 {m['map'] * 100:.2f}, COCO AP "
                  f"{c['ap'] * 100:.2f} (setup {t1 - t0:.1f} s)", flush=True)
    base = rows[0]
    print(f"\n{len(val.images)} validation images, {os.path.basename(weights)}\n"
          "| precision | mAP@0.5 | change | COCO AP | change |\n|---|---|---|---|---|")
    for prec, ran, m, c, _ in rows:
        print(f"| {prec} | {m * 100:.2f} | {(m - base[2]) * 100:+.2f} | {c * 100:.2f} | "
              f"{(c - base[3]) * 100:+.2f} |")


def _compare(a, b):
    """(max |box diff|, max |prob diff|, boxes kept by only one) over boxes keyed by provenance."""
    key = lambda d: {(int(l), int(n), int(r), int(c)): i for i, (l, n, r, c) in
                     enumerate(zip(d.layer, d.anchor, d.row, d.col))}
    ka, kb = key(a), key(b)
    common = sorted(set(ka) & set(kb))
    ia, ib = [ka[k] for k in common], [kb[k] for k in common]
    box = float(np.abs(a.boxes[ia] - b.boxes[ib]).max(initial=0))
    pa, pb = a.probs[ia], b.probs[ib]
    both = (pa > 0) & (pb > 0)  # a prob at or below thresh is 0: crossings are not differences
    prob = float(np.abs(pa - pb)[both].max(initial=0))
    return box, prob, len(set(ka) ^ set(kb)), len(ka)


def _boxes(det):
    """(before NMS, after NMS) detections of dog.png."""
    from conftest import IMAGES
    x, size = det.prepare(IMAGES / "dog.png")
    dets = det.decode(det.forward(x[None])[0], size)
    return dets, det.suppress(dets)


def oracle(names):
    sys.path.insert(0, str(REPO / "tests"))
    import json
    from conftest import IMAGES, ORACLE
    from test_infer_parity import load_oracle_model
    from darknet_cfg.infer import Detector
    print("| model | precision | boxes (fp32) | max box diff | max prob diff | boxes above thresh in "
          "one only | boxes with a class after NMS, fp32 / low |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in names:
            ref = json.loads((ORACLE / "models" / name / "detections.json").read_text())
            kw = dict(thresh=ref["thresh"], nms=ref["nms"])
            d32 = Detector(load_oracle_model(name, tmp)[0].fuse(), **kw)
            base = _boxes(d32)
            for prec in PRECISIONS[1:]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    det = Detector(load_oracle_model(name, tmp)[0], precision=prec, calib=IMAGES, **kw)
                got = _boxes(det)
                box, prob, only, n = _compare(base[0], got[0])
                kept = (sum(bool(p.any()) for p in base[1].probs), sum(bool(p.any()) for p in got[1].probs))
                print(f"| {name} | {det.precision} | {n} | {box:.4f} | {prob:.4f} | {only} | "
                      f"{kept[0]} / {kept[1]} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trained", help="a bench/train_map.py --out folder")
    ap.add_argument("--calib-count", type=int, default=100)
    ap.add_argument("--oracle", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.trained:
        trained(args.trained, args.calib_count)
    if args.oracle:
        oracle(args.oracle)


if __name__ == "__main__":
    main()
