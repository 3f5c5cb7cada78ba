"""Benchmark note: what Darknet's EMA (``ema_alpha``) does to synthetic mAP.

    python bench/ema.py [--out /tmp/bench_ema] [--max-batches 2200] [--alphas 0.9998,0.99]
                        [--threads 2] [--batch 16] [--size 224]

Darknet's schedule (train.DarknetEMA): the average starts at max_batches/2 (a copy of the
weights), is updated after every iteration, and replaces the weights once, at
max_batches - 1000; training then continues from it. So it only acts when max_batches > 2000.

One training run of the shipped cfg/yolov4-tiny-mini.cfg on bench/train_map.py's synthetic set
(400/100 images, 224x224), steps at 80 %/90 % of --max-batches, stopped at the apply point. Shadow
DarknetEMA copies (one per alpha, the cfg's 0.9998 and a shorter one) follow the run with Darknet's
arithmetic. At the apply point, in the same run: mAP@0.5 of the live weights (what a run without
EMA would have there) and of each EMA (what Darknet swaps in). Writes OUT/result.json.
"""
import argparse
import copy
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_ema")
    ap.add_argument("--max-batches", type=int, default=2200)
    ap.add_argument("--alphas", default="0.9998,0.99")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default: the cfg's (16)")
    ap.add_argument("--size", type=int, default=None, help="network width/height (default 224)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from darknet_cfg.evaluate import evaluate_model
    from darknet_cfg.synth import make_synthetic
    from darknet_cfg.train import DarknetEMA, Trainer, TrainOptions

    mb = args.max_batches
    start, apply_at = mb // 2, mb - 1000
    if apply_at <= start:
        sys.exit(f"--max-batches {mb}: Darknet never applies the EMA below 2001 iterations")
    os.makedirs(args.out, exist_ok=True)
    paths = make_synthetic(os.path.join(args.out, "data"), images=400, classes=3, size=224,
                           valid=100, seed=args.seed)
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "cfg", "yolov4-tiny-mini.cfg")).read()
    subs = {"max_batches": mb, "steps": f"{int(mb * 0.8)},{int(mb * 0.9)}", "batch": args.batch,
            "width": args.size, "height": args.size}
    for k, v in subs.items():
        if v is None:
            continue
        text, n = re.subn(rf"(?m)^{k}\s*=.*$", f"{k}={v}", text, count=1)
        assert n == 1, k
    cfg = os.path.join(args.out, "yolov4-tiny-mini.cfg")
    open(cfg, "w").write(text)

    alphas = [float(a) for a in args.alphas.split(",")]
    shadows = {}
    t0 = time.time()

    def on_iteration(tr, info):
        it = info["iteration"]
        if not shadows:
            for a in alphas:    # each shadow: a copy that follows the live model, and its EMA
                m = copy.deepcopy(tr.model)
                shadows[a] = (m, DarknetEMA(m, a))
        for a, (m, ema) in shadows.items():
            if it >= start:
                m.load_state_dict(tr.model.state_dict())    # the live weights and BN statistics
                ema.step(it, mb)                            # at apply_at: m holds the EMA
        if it % 100 == 0:
            print(f"it {it} loss {info['avg_loss']:.3f} t={time.time() - t0:.0f}s", flush=True)
        if it == apply_at:
            tr.max_batches = it                          # stop here

    tr = Trainer(TrainOptions(data=paths["data"], cfg=cfg, threads=args.threads, seed=args.seed,
                              progress=False, calc_map=True, map_every=10 ** 9,
                              backup=os.path.join(args.out, "backup"), on_iteration=on_iteration,
                              log=lambda m: None))
    tr.run()
    res = {"live": evaluate_model(tr.model, tr.val_scan.images, tr.val_scan.labels, 3)["map"]}
    for a, (m, _) in shadows.items():
        res[f"ema_{a}"] = evaluate_model(m, tr.val_scan.images, tr.val_scan.labels, 3)["map"]
    print(f"max_batches {mb}: EMA from {start}, applied at {apply_at}; "
          f"{time.time() - t0:.0f} s")
    for k, v in res.items():
        print(f"  mAP@0.5 at iteration {apply_at}: {k:12s} {v:.4f}  (ratio to live "
              f"{v / max(res['live'], 1e-9):.3f})")
    json.dump(dict(args=vars(args), start=start, apply=apply_at, map50=res),
              open(os.path.join(args.out, "result.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
