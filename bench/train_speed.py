"""Benchmark: training throughput of yolov4-tiny at 224x224 on CPU, batch 64 (subdivisions 1),
counting data loading + forward + loss + backward + SGD step.

    python bench/train_speed.py [--threads 2] [--workers N] [--iterations 6] [--warmup 2]

Uses darknet's yolov4-tiny.cfg (from ../shared/darknet-cfg or --cfg) with batch=64,
subdivisions=1, width=height=224 and max_batches set for the run; data: a synthetic dataset
(256x256 JPEGs, resized/augmented to 224 by the loader). Prints images/s and where the time goes
(waiting for data, forward, loss, backward, optimizer step). The model trains channels_last as
the Trainer does on CPU (--nchw for the NCHW comparison), with Winograd 3x3 convolutions as the
Trainer's CPU default (--no-winograd: oneDNN's direct ones). Darknet's CPU build: 13-16 s per
64-image iteration (about 4.4 images/s); target >= 22 images/s.
"""
import argparse
import os
import re
import time

import torch


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.environ.get("DARKNET_CFG_SHARED", os.path.join(here, "..", "..", "shared"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", default=os.path.join(shared, "darknet-cfg", "yolov4-tiny.cfg"))
    ap.add_argument("--out", default="/tmp/bench_train_speed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None,
                    help="data worker processes (default: Trainer's choice; 0 on 2 cores)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-bn", action="store_true", help="PyTorch's BN instead of darknet's")
    ap.add_argument("--nchw", action="store_true", help="NCHW instead of the default channels_last")
    ap.add_argument("--no-winograd", action="store_true",
                    help="oneDNN's direct 3x3 convolutions (train --no-winograd) instead of the "
                         "default Winograd ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from cpu_peak import fma_peak
    peak0 = fma_peak(args.threads)

    from darknet_cfg.synth import make_synthetic
    from darknet_cfg.train import Trainer, TrainOptions, get_current_rate, set_rate

    os.makedirs(args.out, exist_ok=True)
    paths = make_synthetic(os.path.join(args.out, "data"), images=128, classes=3, size=256, valid=1)
    text = open(args.cfg).read()
    total = args.iterations + args.warmup
    for k, v in dict(batch=64, subdivisions=1, width=224, height=224, max_batches=total).items():
        text, n = re.subn(rf"(?m)^{k}\s*=.*$", f"{k}={v}", text, count=1)
        assert n == 1, k
    cfg = os.path.join(args.out, "yolov4-tiny-224.cfg")
    open(cfg, "w").write(text)
    import darknet_cfg
    classes = next(l.classes for l in darknet_cfg.build_graph(cfg).layers if l.type == "yolo")
    data = paths["data"]
    text = open(data).read().replace("classes = 3", f"classes = {classes}")
    open(data, "w").write(text)

    tr = Trainer(TrainOptions(data=data, cfg=cfg, workers=args.workers, threads=args.threads,
                              progress=False, darknet_bn=not args.torch_bn,
                              channels_last=not args.nchw, winograd=not args.no_winograd,
                              backup=os.path.join(args.out, "backup"), log=lambda m: None))
    model, hl = tr.model, tr.head_loss
    it = iter(tr.loader())
    phases = dict(data=0.0, forward=0.0, loss=0.0, backward=0.0, step=0.0)
    t_start = None
    import resource
    faults = 0
    for i in range(total):
        if i == args.warmup:
            phases = {k: 0.0 for k in phases}
            t_start = time.perf_counter()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        x, t = next(it)
        x = x.contiguous(memory_format=tr.memory_format)  # as Trainer.train_iteration
        t1 = time.perf_counter()
        model.train()
        tr.opt.zero_grad(set_to_none=True)
        outs = model(x)
        t2 = time.perf_counter()
        loss, _ = hl(outs, t, x.shape[3], x.shape[2], (i + 1) * 64)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        set_rate(tr.opt, get_current_rate(tr.settings, i + 1), tr.settings, 64)
        tr.opt.step()
        t5 = time.perf_counter()
        for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("loss", t2, t3), ("backward", t3, t4),
                        ("step", t4, t5)):
            phases[k] += b - a
        print(f"iteration {i + 1}: {t5 - t0:.2f} s ({64 / (t5 - t0):.1f} images/s)"
              f"{'  [warm-up]' if i < args.warmup else ''}", flush=True)
    wall = time.perf_counter() - t_start
    ips = 64 * args.iterations / wall
    print(f"\nyolov4-tiny 224x224, batch 64, {args.threads} threads, {tr.workers} workers, "
          f"{'torch' if args.torch_bn else 'darknet'} BN, {'NCHW' if args.nchw else 'channels_last'}"
          f"{', direct 3x3 convolutions' if args.no_winograd else ', Winograd'}: "
          f"{ips:.1f} images/s "
          f"({wall / args.iterations:.2f} s per iteration; darknet CPU ~4.4 images/s, target 22)")
    for k, v in phases.items():
        print(f"  {k:9s} {v / args.iterations:6.2f} s/it  {100 * v / wall:5.1f} %")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(f"  page faults (main process): {faults / args.iterations:.0f} per iteration; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    peak1 = fma_peak(args.threads)
    if peak0 and peak1:
        print(f"  FMA peak before / after: {peak0:.0f} / {peak1:.0f} GFLOP/s (bench/cpu_peak.py)")
    print(f"  load average: {open('/proc/loadavg').read().split()[:3]} (other processes share the cores)")


if __name__ == "__main__":
    main()
