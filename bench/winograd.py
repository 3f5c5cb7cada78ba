"""Winograd F(2x2,3x3) and F(4x4,3x3) against oneDNN's prepacked direct convolution, per layer
shape: the measurements behind ``layers/winograd.tile_for``.

    python bench/winograd.py [--runs 15] [--batch 1]
    python bench/winograd.py --train [--batch 64]     # forward + both gradients, training shapes

Each shape is a 3x3 stride-1 convolution with bias and leaky ReLU (what both paths fuse), on a
channels_last batch, 2 threads. Printed: the direct time (ms) and GFLOP/s (direct-equivalent
FLOPs), each Winograd tile's speed-up (>1: faster), its max error against float64 relative to
the output's scale (direct's too), and the tile ``tile_for`` picks. Winograd runs with the
compiled transforms (layers/_winograd.c) where they are built, else with torch's. Runs are
interleaved; medians. The CPU's FMA peak is printed first (shared machines drift).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

THREADS = 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_peak import fma_peak  # noqa: E402

from darknet_cfg.layers import winograd  # noqa: E402

# training: the 3x3 stride-1 layers of yolov4-tiny@224 and yolov4-tiny@416, and neighbours
TRAIN_SHAPES = [(32, 32, 56), (64, 64, 56), (64, 64, 28), (128, 128, 28), (128, 128, 14),
                (256, 256, 14), (384, 256, 14), (256, 512, 7), (512, 512, 7), (32, 32, 104),
                (64, 64, 104), (128, 128, 52), (64, 64, 52), (256, 256, 26)]
# (c_in, c_out, size): the 3x3 stride-1 layers of yolov4-tiny@416, yolov4@416, yolov4-csp@512,
# and neighbours (608 inputs, thin layers)
SHAPES = [(32, 64, 208), (64, 64, 208), (16, 16, 104), (32, 32, 104), (64, 64, 104), (64, 64, 52), (64, 128, 64), (128, 128, 104),
          (128, 128, 52), (128, 128, 26), (128, 128, 64), (128, 128, 32), (128, 256, 52),
          (128, 256, 26), (256, 256, 52), (256, 256, 26), (256, 256, 32), (256, 256, 16),
          (256, 256, 13), (256, 512, 26), (256, 512, 13), (384, 256, 26), (512, 512, 13),
          (512, 512, 16), (512, 512, 19), (512, 1024, 13), (1024, 1024, 13)]


def _median_ms(fns, runs):
    times = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(runs):
        for k, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=None, help="default: 1, or 64 with --train")
    ap.add_argument("--train", action="store_true",
                    help="forward + input and weight gradients against F.conv2d's autograd")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args.train:
        return train(args.runs, args.batch or 64)
    args.batch = args.batch or 1
    print(f"torch {torch.__version__}, {THREADS} threads, batch {args.batch}, "
          f"FMA peak {fma_peak(THREADS) or float('nan'):.0f} GFLOP/s")
    print("| c_in | c_out | size | direct ms | direct GFLOP/s | F(2x2) | F(4x4) | err direct / "
          "F2 / F4 (x1e-6 of scale) | tile_for |")
    print("|---" * 9 + "|")
    with torch.inference_mode():
        for c, k, s in SHAPES:
            torch.manual_seed(0)
            conv = nn.Conv2d(c, k, 3, 1, 1)
            x = torch.rand(args.batch, c, s, s).contiguous(memory_format=torch.channels_last)
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                conv.weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape))

            def direct():
                return torch.ops.mkldnn._convolution_pointwise(
                    x, packed, conv.bias, [1, 1], [1, 1], [1, 1], 1, "leaky_relu", [0.1], "")

            fns = [direct] + [lambda m=m: winograd.conv3x3(conv, x, m, leaky=True) for m in (2, 4)]
            t_dir, t2, t4 = _median_ms(fns, args.runs)
            ref = F.leaky_relu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(),
                                        padding=1), 0.1)
            scale = float(ref.abs().max())
            errs = [float((f().double() - ref).abs().max()) / scale * 1e6 for f in fns]
            gflop = 2 * c * k * 9 * s * s * args.batch / 1e9
            print(f"| {c} | {k} | {s} | {t_dir:.2f} | {gflop / t_dir * 1e3:.0f} | "
                  f"{t_dir / t2:.2f}x | {t_dir / t4:.2f}x | "
                  f"{errs[0]:.1f} / {errs[1]:.1f} / {errs[2]:.1f} | "
                  f"{winograd.tile_for(c, k, s, s) or 'direct'} |", flush=True)


def train(runs, batch):
    """Training step of one layer: conv (+ bias), then backward of a fixed output gradient."""
    print(f"torch {torch.__version__}, {THREADS} threads, batch {batch}, training (forward + "
          f"both gradients), FMA peak {fma_peak(THREADS) or float('nan'):.0f} GFLOP/s")
    print("| c_in | c_out | size | direct ms | F(2x2) | F(4x4) | tile_for |")
    print("|---" * 7 + "|")
    for c, k, s in TRAIN_SHAPES:
        torch.manual_seed(0)
        x = torch.rand(batch, c, s, s).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w = (torch.randn(k, c, 3, 3) * 0.05).requires_grad_()
        b = torch.zeros(k, requires_grad=True)
        g = torch.randn(batch, k, s, s).contiguous(memory_format=torch.channels_last)

        def step(m):
            y = winograd.conv3x3_train(x, w, b, m) if m else F.conv2d(x, w, b, padding=1)
            y.backward(g)
            x.grad = w.grad = b.grad = None

        t_dir, t2, t4 = _median_ms([lambda m=m: step(m) for m in (0, 2, 4)], runs)
        print(f"| {c} | {k} | {s} | {t_dir:.1f} | {t_dir / t2:.2f}x | {t_dir / t4:.2f}x | "
              f"{winograd.tile_for(c, k, s, s, training=True, batch=batch) or 'direct'} |",
              flush=True)


if __name__ == "__main__":
    main()
