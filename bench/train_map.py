"""Benchmark: train the shipped cfg/yolov4-tiny-mini.cfg on a synthetic dataset (>= 400 train /
100 valid images at 224x224) on CPU within a time budget and report the mAP@0.5 curve.

    python bench/train_map.py [--out /tmp/bench_map] [--budget 900] [--threads 2] [--workers N]
                              [--max-batches 1500] [--batch 16] [--lr 0.005]

The cfg is copied with the batch size, learning rate, max_batches and steps (at 80 % / 90 % of
max_batches) this run uses; nothing else changes. Training stops at max_batches or when the
time budget (training + evaluations) runs out, whichever comes first. mAP@0.5 (darknet's
area-under-curve AP, NMS as the cfg says) on the 100 validation images is measured every
--map-every iterations and at the end. Prints the curve and writes OUT/result.json.
"""
import argparse
import json
import os
import re
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_train_map")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds (training + evaluation)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None,
                    help="data worker processes (default: Trainer's choice; 0 on 2 cores)")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--valid", type=int, default=100)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--max-batches", type=int, default=0,
                    help="0: fit to the time budget (measured after 50 iterations)")
    ap.add_argument("--batch", type=int, default=None, help="default: the cfg's")
    ap.add_argument("--lr", type=float, default=None, help="default: the cfg's")
    ap.add_argument("--burn-in", type=int, default=None, help="default: the cfg's")
    ap.add_argument("--map-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from darknet_cfg.synth import make_synthetic
    from darknet_cfg.train import Trainer, TrainOptions
    from darknet_cfg.evaluate import evaluate_model

    os.makedirs(args.out, exist_ok=True)
    paths = make_synthetic(os.path.join(args.out, "data"), images=args.images, classes=args.classes,
                           size=224, valid=args.valid, seed=args.seed)
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "cfg", "yolov4-tiny-mini.cfg")).read()
    mb = args.max_batches or 20000
    subs = {"batch": args.batch, "learning_rate": args.lr, "burn_in": args.burn_in, "max_batches": mb,
            "steps": f"{int(mb * 0.8)},{int(mb * 0.9)}"}
    for k, v in subs.items():
        if v is None:
            continue
        text, n = re.subn(rf"(?m)^{k}\s*=.*$", f"{k}={v}", text, count=1)
        assert n == 1, k
    filters = 3 * (args.classes + 5)
    text = re.sub(r"(?m)^classes=\d+$", f"classes={args.classes}", text)
    text = re.sub(r"(?m)^filters=24$", f"filters={filters}", text)
    cfg = os.path.join(args.out, "yolov4-tiny-mini.cfg")
    open(cfg, "w").write(text)

    curve = []
    t0 = time.time()
    state = {}

    def on_iteration(tr, info):
        it = info["iteration"]
        if not args.max_batches and it == 50:
            # fit max_batches (and the steps at 80 % / 90 %) to the remaining time budget,
            # counting one evaluation per --map-every iterations
            per_it = (time.time() - state["t50"]) / 40
            t_eval = 3.0 * args.valid / 100
            left = args.budget - (time.time() - t0) - 2 * t_eval
            n = int(left / (per_it + t_eval / args.map_every))
            tr.max_batches = it + max(n, 1)
            tr.settings["max_batches"] = tr.max_batches
            tr.settings["steps"] = [int(tr.max_batches * 0.8), int(tr.max_batches * 0.9)]
            print(f"{per_it:.3f} s/iteration -> max_batches {tr.max_batches}, steps {tr.settings['steps']}",
                  flush=True)
        if it == 10:
            state["t50"] = time.time()
        if it % 20 == 0:
            print(f"it {it:5d} loss {info['loss']:8.3f} avg {info['avg_loss']:8.3f} lr {info['rate']:.2e} "
                  f"{info['images_per_s']:.1f} img/s  t={time.time() - t0:.0f}s", flush=True)
        if it % args.map_every == 0 or it == tr.max_batches:
            r = evaluate_model(tr.model, tr.val_scan.images, tr.val_scan.labels, tr.data.classes)
            curve.append(dict(iteration=it, seconds=round(time.time() - t0, 1), map50=r["map"],
                              precision=r["precision"], recall=r["recall"], avg_loss=info["avg_loss"]))
            print(f"   mAP@0.5 {r['map']:.4f}  P {r['precision']:.3f} R {r['recall']:.3f}  "
                  f"(t={time.time() - t0:.0f}s)", flush=True)
            state["last_eval_it"] = it
        if time.time() - t0 > args.budget and it < tr.max_batches:
            print(f"time budget reached at iteration {it}", flush=True)
            tr.max_batches = it          # ends the loop after this iteration

    opts = TrainOptions(data=paths["data"], cfg=cfg, workers=args.workers, threads=args.threads,
                        calc_map=True, map_every=10 ** 9, seed=args.seed, progress=False,
                        backup=os.path.join(args.out, "backup"), on_iteration=on_iteration,
                        log=lambda m: print(m, flush=True))
    tr = Trainer(opts)
    tr.run()
    if state.get("last_eval_it") != tr.iteration:
        r = evaluate_model(tr.model, tr.val_scan.images, tr.val_scan.labels, tr.data.classes)
        curve.append(dict(iteration=tr.iteration, seconds=round(time.time() - t0, 1), map50=r["map"],
                          precision=r["precision"], recall=r["recall"], avg_loss=tr.avg_loss))
    total = time.time() - t0
    final = curve[-1]["map50"] if curve else float("nan")
    print("\niteration  seconds  mAP@0.5")
    for c in curve:
        print(f"{c['iteration']:9d} {c['seconds']:8.0f}  {c['map50']:.4f}")
    print(f"\nfinal mAP@0.5 = {final:.4f} after {tr.iteration} iterations, {total:.0f} s "
          f"({args.threads} threads, {tr.workers} workers); target >= 0.90 within 900 s")
    json.dump(dict(args=vars(args), curve=curve, final_map50=final, seconds=total,
                   iterations=tr.iteration), open(os.path.join(args.out, "result.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
