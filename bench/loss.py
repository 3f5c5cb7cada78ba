"""Benchmark: Darknet's [yolo] training loss, the loop transcription (yolo_loss_reference) against
the vectorised yolo_loss, on the CPU (and on CUDA with --device cuda for the vectorised one).

    python bench/loss.py [--threads 1] [--reps 5] [--device cpu]

Cases: yolov4-csp @512 batch 8 and yolov4-tiny @416 batch 64, random head inputs and random
targets (10-50 boxes per image).  Times loss + backward of all [yolo] layers of one mini-batch;
prints ms per mini-batch, images/s and the ratio reference / vectorised measured in this run, and
checks that both give the same deltas.
"""
import argparse
import os
import time

import torch


def case(name, width, batch, seed=0):
    import darknet_cfg
    from darknet_cfg.loss import YoloLossParams
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.environ.get("DARKNET_CFG_SHARED", os.path.join(here, "..", "..", "shared"))
    cfg = os.path.join(shared, "darknet-cfg", name + ".cfg")
    model = darknet_cfg.load(cfg, width=width, height=width)
    shapes = {r["index"]: r["input"] for r in darknet_cfg.summary(cfg, width, width)}
    g = torch.Generator().manual_seed(seed)
    heads = []
    for spec in model.heads:
        p = YoloLossParams.from_spec(spec)
        c, h, w = shapes[spec.index]
        x = torch.randn(batch, c, h, w, generator=g) * 2 - 1
        if p.new_coords:
            x = torch.sigmoid(x)            # the conv before a new_coords [yolo] has logistic
        heads.append((p, x))
    rows = []
    for b in range(batch):
        k = int(torch.randint(10, 51, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 0.98 + 0.01
        wh = torch.rand(k, 2, generator=g) ** 2 * 0.6 + 0.005
        cls = torch.randint(0, heads[0][0].classes, (k, 1), generator=g).float()
        rows.append(torch.cat([torch.full((k, 1), float(b)), cls, xy, wh], 1))
    return heads, torch.cat(rows), width


def run(fn, heads, targets, net, device):
    total, deltas = None, []
    for p, x in heads:
        xi = x.to(device).requires_grad_(True)
        loss, st = fn(xi, targets, p, net, net)
        loss.backward()
        deltas.append(xi.grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return deltas


def timed(fn, heads, targets, net, device, reps):
    run(fn, heads, targets, net, device)                # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        run(fn, heads, targets, net, device)
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-reps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from darknet_cfg.loss import yolo_loss, yolo_loss_reference
    dev = torch.device(args.device)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {args.threads} thread(s), vectorised on {dev}")
    for name, width, batch in (("yolov4-csp", 512, 8), ("yolov4-tiny", 416, 64)):
        heads, targets, net = case(name, width, batch)
        same = all(torch.equal(a.cpu(), b) for a, b in zip(run(yolo_loss, heads, targets, net, dev),
                                                           run(yolo_loss_reference, heads, targets, net, cpu)))
        t_ref = timed(yolo_loss_reference, heads, targets, net, cpu, args.ref_reps)
        t_vec = timed(yolo_loss, heads, targets, net, dev, args.reps)
        print(f"{name}@{width} batch {batch}, {len(targets)} boxes: reference {t_ref * 1e3:.0f} ms "
              f"({batch / t_ref:.1f} img/s), vectorised {t_vec * 1e3:.1f} ms ({batch / t_vec:.0f} img/s), "
              f"ratio {t_ref / t_vec:.1f}x, identical deltas: {same}")


if __name__ == "__main__":
    main()
