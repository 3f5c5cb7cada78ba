"""Benchmark: test-time augmentation on the synthetic validation set.

    python bench/tta.py [--out /tmp/bench_tta] [--weights W --cfg C] [--iterations 800]
                        [--threads 2]

Without --weights, first trains the shipped cfg/yolov4-tiny-mini.cfg on the synthetic dataset of
bench/train_map.py (400 train / 100 valid images, 224x224, 3 classes) for --iterations
iterations (steps at 80 % / 90 %). Then, in the same run, on the 100 validation images:
mAP@0.5 (darknet's `detector map`) without and with --tta, and the latency of
``Detector.detect`` per image (batch 1, median of the images) without and with TTA, as a ratio.
Writes OUT/result.json.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _mini_cfg(out, classes, iterations, batch):
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "cfg", "yolov4-tiny-mini.cfg")).read()
    subs = {"max_batches": iterations, "steps": f"{int(iterations * 0.8)},{int(iterations * 0.9)}",
            "batch": batch}
    for k, v in subs.items():
        if v is not None:
            text, n = re.subn(rf"(?m)^{k}\s*=.*$", f"{k}={v}", text, count=1)
            assert n == 1, k
    text = re.sub(r"(?m)^classes=\d+$", f"classes={classes}", text)
    text = re.sub(r"(?m)^filters=24$", f"filters={3 * (classes + 5)}", text)
    path = os.path.join(out, "yolov4-tiny-mini.cfg")
    open(path, "w").write(text)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_tta")
    ap.add_argument("--cfg", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--batch", type=int, default=None, help="default: the cfg's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import darknet_cfg
    from darknet_cfg.data import read_data_file, read_list, scan_dataset
    from darknet_cfg.evaluate import evaluate_model
    from darknet_cfg.infer import Detector
    from darknet_cfg.synth import make_synthetic
    from darknet_cfg.tta import tta_sizes

    os.makedirs(args.out, exist_ok=True)
    paths = make_synthetic(os.path.join(args.out, "data"), images=400, classes=3, size=224,
                           valid=100, seed=args.seed)
    cfg, weights = args.cfg, args.weights
    t_train = 0.0
    if weights is None:
        from darknet_cfg.train import Trainer, TrainOptions
        cfg = _mini_cfg(args.out, 3, args.iterations, args.batch)
        t0 = time.time()
        tr = Trainer(TrainOptions(data=paths["data"], cfg=cfg, threads=args.threads, seed=args.seed,
                                  progress=False, backup=os.path.join(args.out, "backup"),
                                  log=lambda m: None))
        res = tr.run()
        weights, t_train = res["final"], time.time() - t0
        print(f"trained {tr.iteration} iterations in {t_train:.0f} s", flush=True)
    model = darknet_cfg.load(cfg, weights)
    d = read_data_file(paths["data"])
    val = scan_dataset(read_list(d.valid), d.classes)

    out = {}
    for tta in (False, True):
        t0 = time.time()
        r = evaluate_model(model, val.images, val.labels, d.classes, tta=tta)
        out[tta] = dict(map50=r["map"], precision=r["precision"], recall=r["recall"],
                        eval_seconds=time.time() - t0)
    lat = {}
    for tta in (False, True):
        det = Detector(darknet_cfg.load(cfg, weights).fuse(), tta=tta)
        det.detect(val.images[:2])                       # warm-up
        times = []
        for p in val.images:
            t0 = time.perf_counter()
            det.detect([p])
            times.append(time.perf_counter() - t0)
        lat[tta] = statistics.median(times) * 1000
    ratio = lat[True] / lat[False]
    print(f"passes (w, h, flip): {tta_sizes(model)}")
    print(f"mAP@0.5 plain {out[False]['map50']:.4f}   --tta {out[True]['map50']:.4f}   "
          f"(delta {out[True]['map50'] - out[False]['map50']:+.4f})")
    print(f"P/R plain {out[False]['precision']:.3f}/{out[False]['recall']:.3f}   "
          f"--tta {out[True]['precision']:.3f}/{out[True]['recall']:.3f}")
    print(f"latency per image (Detector, batch 1, median): plain {lat[False]:.1f} ms, "
          f"--tta {lat[True]:.1f} ms, ratio {ratio:.2f}x ({args.threads} threads)")
    json.dump(dict(args=vars(args), plain=out[False], tta=out[True], latency_ms_plain=lat[False],
                   latency_ms_tta=lat[True], latency_ratio=ratio, train_seconds=t_train,
                   passes=tta_sizes(model)),
              open(os.path.join(args.out, "result.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
