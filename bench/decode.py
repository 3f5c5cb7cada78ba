"""Decode + NMS after the forward: full head copy vs the device-side prefilter (prefilter.py).

    python bench/decode.py                      # yolov4-tiny, yolov4; batch 1 and 8; CPU
    python bench/decode.py --models yolov4 --batches 8 --runs 50 --device cuda

Input: the oracle's real Darknet head outputs for dog.png (shared/oracle/models/NAME/outputs.npz),
repeated to the batch size, as the batched (N, C, H, W) tensors the forward leaves (channels_last
on CPU, as ``Detector`` runs there). Timed, per batch, from those tensors to post-NMS boxes:

* full: ``o.float().cpu().contiguous().numpy()`` per head (what ``Detector.forward`` copies),
  then ``get_network_boxes`` + NMS per image;
* prefilter: ``head_candidates`` (objectness test, one nonzero, one packed copy), then the same
  ``get_network_boxes`` + NMS per image.

Both give identical boxes (checked each run). Figures: medians over ``--runs`` interleaved
rounds, ms per batch, bytes copied device -> host per batch, and prefilter/full ratios. thresh
0.25 (``detector test``) by default; ``--thresh 0.005 --no-nms`` shows ``detector map``'s
case, where nearly every slot passes (copy + decode only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DARKNET_CFG_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))

from darknet_cfg.infer import nms_matrix  # noqa: E402
from darknet_cfg.postprocess import get_network_boxes  # noqa: E402
from darknet_cfg.prefilter import head_candidates  # noqa: E402


def load_case(name: str):
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import oracle_detector  # the suite's reader of an oracle detector folder
    return oracle_detector(SHARED / "oracle" / "models" / name)


def run_case(name, batch, thresh, runs, device, nms=True):
    heads, outs, ref = load_case(name)
    idx = sorted(outs)
    mf = torch.channels_last if device == "cpu" else torch.contiguous_format
    tensors = [torch.from_numpy(np.ascontiguousarray(outs[i]))[None].repeat(batch, 1, 1, 1)
               .to(device).contiguous(memory_format=mf) for i in idx]
    last = heads[max(heads)]
    geo = (ref["net_w"], ref["net_h"], ref["image_w"], ref["image_h"])
    lb = bool(ref["letter_box"])

    def post(per_image):
        dets = [get_network_boxes(o, heads, *geo, thresh=thresh, letter_box=lb) for o in per_image]
        return [nms_matrix(d, 0.45, last.nms_kind, last.beta_nms) for d in dets] if nms else dets

    def full():
        arrays = [t.float().cpu().contiguous().numpy() for t in tensors]
        return post([{li: a[n] for li, a in zip(idx, arrays)} for n in range(batch)]), \
            sum(a.nbytes for a in arrays)

    def pre():
        c = head_candidates(tensors, idx, heads, thresh)
        return post(c), c.nbytes

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = {"full": [], "prefilter": []}
    nbytes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, _ = full()
        b, _ = pre()
        for x, y in zip(a, b):  # identical results
            assert all(np.array_equal(getattr(x, f), getattr(y, f))
                       for f in ("boxes", "objectness", "probs", "layer", "row", "col", "anchor"))
        nboxes = len(a[0])
        for _ in range(runs):
            for key, fn in (("full", full), ("prefilter", pre)):
                sync()
                t0 = time.perf_counter()
                _, nbytes[key] = fn()
                sync()
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return dict(model=name, batch=batch, thresh=thresh, nms=nms, boxes_per_image=nboxes,
                full_ms=med["full"], prefilter_ms=med["prefilter"],
                time_ratio=med["prefilter"] / med["full"],
                full_bytes=nbytes["full"], prefilter_bytes=nbytes["prefilter"],
                bytes_ratio=nbytes["prefilter"] / nbytes["full"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["yolov4-tiny", "yolov4"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--thresh", nargs="+", type=float, default=[0.25])
    ap.add_argument("--no-nms", action="store_true",
                    help="time copy + decode only (NMS is the same work on both paths; at thresh "
                         "0.005 it takes seconds per image)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    print(f"{'model':<14}{'batch':>6}{'thresh':>7}{'boxes':>7}{'full ms':>10}{'pre ms':>9}"
          f"{'time x':>8}{'full KB':>10}{'pre KB':>9}{'bytes x':>9}")
    for name in a.models:
        for batch in a.batches:
            for th in a.thresh:
                r = run_case(name, batch, th, a.runs, a.device, nms=not a.no_nms)
                rows.append(r)
                print(f"{name:<14}{batch:>6}{th:>7}{r['boxes_per_image']:>7}{r['full_ms']:>10.2f}"
                      f"{r['prefilter_ms']:>9.2f}{r['time_ratio']:>8.2f}"
                      f"{r['full_bytes'] / 1024:>10.0f}{r['prefilter_bytes'] / 1024:>9.1f}"
                      f"{r['bytes_ratio']:>9.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
