"""GPU benchmark: inference and training images/s, peak memory and model FLOP utilisation.

    python bench/gpu.py                          # everything, ~5-8 minutes on an H100/H200
    python bench/gpu.py --quick                  # fewer timed iterations
    python bench/gpu.py --only infer|train --json out.json

Inference (forward only: the input already on the GPU, as the published TensorRT figures count):
yolov4-tiny@416 (batch 1, 4), yolov4@608 and yolov4-csp@640 (batch 1, 32), each in exact float32
(no TF32: Darknet's numbers), float16, and float16 replayed from a CUDA graph; plus the
end-to-end ``Detector`` (pre-processing, copy, forward, decode, NMS) for yolov4-tiny.
Training: yolov4-tiny@416 batch 64 and yolov4-csp@512 batch 32, float32 and ``--amp``:
"model" is forward+backward with a plain sum as the loss (what the GPU does), "step" the whole
Darknet iteration with its exact loss and update on batches already loaded, "e2e" the same with
the data loader (augmentation in worker processes).
MFU = achieved FLOP/s over the GPU's dense peak for the precision (H100/H200 SXM: 989 TFLOP/s
float16/bfloat16 tensor cores, 67 float32 without TF32); training FLOPs = 3x the forward
(Darknet's BFLOPs, which count a multiply-add as 2). Weights are random (speed does not depend on
them); cfgs are read from ``--cfg-dir`` (default: ``$DARKNET_CFG_SHARED/darknet-cfg``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

PEAKS = {  # dense TFLOP/s: (float16/bfloat16 tensor cores, float32 without TF32)
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5),
    "RTX 2080 Ti": (107.6, 13.4), "L40S": (362.0, 91.6), "RTX 4090": (330.0, 82.6),
}


def peak_for(name: str, half: bool):
    for key, (p16, p32) in PEAKS.items():
        if key in name:
            return p16 if half else p32
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cfg-dir", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["infer", "e2e", "train"], default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--train-modes", default="fp32,amp", help="training modes to run")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (bench/gpu.py needs a GPU)")
        return 0
    shared = Path(os.environ.get("DARKNET_CFG_SHARED",
                                 Path(__file__).resolve().parents[2] / "shared"))
    cfg_dir = Path(args.cfg_dir) if args.cfg_dir else shared / "darknet-cfg"
    if not (cfg_dir / "yolov4-tiny.cfg").is_file():
        print(f"error: yolov4-tiny.cfg not found in {cfg_dir} (--cfg-dir)", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    results = {"gpu": gpu, "torch": torch.__version__, "infer": [], "train": []}
    if args.only in (None, "infer"):
        results["infer"] = bench_infer(cfg_dir, gpu, args.quick)
    if args.only in (None, "e2e"):
        results["e2e"] = bench_e2e(cfg_dir, args.quick)
    if args.only in (None, "train"):
        results["train"] = bench_train(cfg_dir, gpu, args.quick, args.train_modes.split(","))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _time_cuda(fn, iters: int, warmup: int) -> float:
    """Seconds per call (CUDA events around ``iters`` calls after ``warmup``)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def bench_infer(cfg_dir: Path, gpu: str, quick: bool):
    import torch
    import darknet_cfg
    from darknet_cfg.infer import CudaGraphForward
    from darknet_cfg.runtime import exact_float32
    cases = [("yolov4-tiny", 416, (1, 4)), ("yolov4", 608, (1, 32)), ("yolov4-csp", 640, (1, 32))]
    rows = []
    print("\ninference, forward only (images/s; MFU of the precision's dense peak)")
    print(f"{'model':<18}{'batch':>6}{'fp32 exact':>14}{'fp16':>14}{'fp16+graph':>14}"
          f"{'fp32+graph':>14}{'peak GB':>9}")
    for name, size, batches in cases:
        torch.manual_seed(0)
        model = darknet_cfg.build_model(cfg_dir / f"{name}.cfg", size, size).cuda().eval().fuse()
        flops = model.graph.total_bflops * 1e9
        for b in batches:
            x = torch.rand(b, 3, size, size, device="cuda")
            row = dict(model=f"{name}@{size}", batch=b, gflops_per_image=flops / 1e9)
            torch.cuda.reset_peak_memory_stats()
            for label, dtype, graph in (("fp32", torch.float32, False), ("fp16", torch.float16, False),
                                        ("fp16_graph", torch.float16, True),
                                        ("fp32_graph", torch.float32, True)):
                m = model.to(dtype).to(memory_format=torch.channels_last)
                xi = x.to(dtype).contiguous(memory_format=torch.channels_last)
                exact = dtype == torch.float32
                with torch.inference_mode(), exact_float32(exact):
                    fwd = CudaGraphForward(m, exact) if graph else m
                    iters = max(5, int((20 if quick else 60) * (4 / b) ** 0.5)) if b > 1 else \
                        (50 if quick else 200)
                    t = _time_cuda(lambda: fwd(xi), iters, warmup=5)
                ips = b / t
                peak = peak_for(gpu, dtype != torch.float32)
                row[label] = dict(images_per_s=ips, ms_per_batch=t * 1e3,
                                  mfu=(ips * flops / (peak * 1e12)) if peak else None)
                fwd = None  # frees the graph's memory
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            model.float()
            rows.append(row)

            def cell(k):
                r = row[k]
                mfu = f" {100 * r['mfu']:.0f}%" if r["mfu"] is not None else ""
                return f"{r['images_per_s']:>9.0f}{mfu:>5}"
            print(f"{row['model']:<18}{b:>6}{cell('fp32'):>14}{cell('fp16'):>14}"
                  f"{cell('fp16_graph'):>14}{cell('fp32_graph'):>14}{row['peak_gb']:>9.2f}")
        del model
        torch.cuda.empty_cache()
    return rows


def bench_e2e(cfg_dir: Path, quick: bool):
    """End-to-end ``Detector`` on a 768x576 picture (numpy pre-processing, decode and NMS on
    the CPU), images/s."""
    import torch
    import darknet_cfg
    from darknet_cfg.infer import Detector
    from darknet_cfg.preprocess import load_image
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from infer import SHARED, synthetic_weights  # weights with a realistic decode/NMS load
    rows = []
    img = load_image(SHARED / "images" / "dog.png")
    weights = Path(tempfile.mkdtemp(prefix="gpu-bench-")) / "yolov4-tiny.weights"
    synthetic_weights("yolov4-tiny", 416, weights)
    model = darknet_cfg.load(cfg_dir / "yolov4-tiny.cfg", weights, width=416, height=416).fuse()
    for label, kw in (("fp32 exact", {}), ("fp16+graph", dict(dtype=torch.float16, cuda_graph=True))):
        det = Detector(model, device="cuda", **kw)
        for b in (1, 4):
            ims = [img] * b
            t0 = time.perf_counter()
            det.detect(ims, batch_size=b)
            print(f"  first call (batch {b}, {label}): {time.perf_counter() - t0:.2f} s")
            n = 5 if quick else 20
            t0 = time.perf_counter()
            for _ in range(n):
                det.detect(ims, batch_size=b)
            ips = n * b / (time.perf_counter() - t0)
            rows.append(dict(model="yolov4-tiny@416 Detector e2e", batch=b, mode=label,
                             images_per_s=ips))
            print(f"yolov4-tiny@416 Detector end-to-end ({label}), batch {b}: {ips:.0f} images/s")
        model.float()
    return rows


def _train_cfg(src: Path, size: int, batch: int, tmp: Path) -> str:
    """The cfg at a fixed size and batch (subdivisions=1), multi-scale off (random=0)."""
    from darknet_cfg.reader import read_cfg, with_net_overrides, write_cfg
    cfg = with_net_overrides(read_cfg(src), width=size, height=size, batch=batch, subdivisions=1,
                             max_batches=100000, burn_in=0)
    for sec in cfg.sections[1:]:
        if sec.name == "yolo":
            sec.set("random", 0)
    out = tmp / src.name
    out.write_text(write_cfg(cfg))
    return str(out)


def bench_train(cfg_dir: Path, gpu: str, quick: bool, modes=("fp32", "amp")):
    import torch
    from darknet_cfg.synth import make_synthetic
    from darknet_cfg.train import Trainer, TrainOptions
    from darknet_cfg.runtime import cudnn_autotune, exact_float32
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    rows = []
    print("\ntraining (images/s; MFU = 3 x forward FLOPs / dense peak of the precision)")
    print(f"{'model':<18}{'batch':>6}{'mode':>10}{'model fwd+bwd':>16}{'Darknet step':>16}"
          f"{'e2e (loader)':>16}{'e2e/step':>9}{'peak GB':>9}")
    for name, size, batch in (("yolov4-tiny", 416, 64), ("yolov4-csp", 512, 32)):
        data = make_synthetic(tmp / f"synth{size}", images=2 * batch, classes=8, size=size,
                              valid=2, seed=1)
        obj = Path(data["data"])  # 8 shapes labelled as 8 of the cfg's 80 classes
        obj.write_text(re.sub(r"(?m)^classes = \d+", "classes = 80", obj.read_text()))
        cfg = _train_cfg(cfg_dir / f"{name}.cfg", size, batch, tmp)
        for amp in [m == "amp" for m in modes]:
            torch.manual_seed(0)
            workers = min(12, max(1, (os.cpu_count() or 2) - 2))
            tr = Trainer(TrainOptions(data=data["data"], cfg=cfg, device="cuda", amp=amp,
                                      workers=workers, progress=False, log=lambda m: None,
                                      backup=str(tmp / "backup")))
            flops = tr.model.graph.total_bflops * 1e9 * 3
            peak = peak_for(gpu, amp)
            torch.cuda.reset_peak_memory_stats()
            loader = iter(tr.loader())
            batches = [next(loader)]
            x = batches[0][0].to("cuda").contiguous(memory_format=tr.memory_format)
            # model only: forward + backward with a plain sum as the loss
            def model_step():
                with exact_float32(not amp), cudnn_autotune(), \
                        torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    outs = tr.model(x)
                    loss = sum(o.float().sum() for o in outs)
                (tr.scaler.scale(loss) if tr.scaler is not None else loss).backward()
            n = 5 if quick else 15
            t_model = _time_cuda(model_step, n, warmup=3)
            t_step = _time_cuda(lambda: tr.train_iteration(batches), n, warmup=2)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                tr.train_iteration([next(loader)])
            torch.cuda.synchronize()
            t_e2e = (time.perf_counter() - t0) / n
            nhwc = tr.memory_format == torch.channels_last
            row = dict(model=f"{name}@{size}", batch=batch, amp=amp, channels_last=nhwc,
                       model_images_per_s=batch / t_model, step_images_per_s=batch / t_step,
                       e2e_images_per_s=batch / t_e2e,
                       mfu_model=(batch / t_model * flops / (peak * 1e12)) if peak else None,
                       mfu_step=(batch / t_step * flops / (peak * 1e12)) if peak else None,
                       peak_gb=torch.cuda.max_memory_allocated() / 2**30)
            rows.append(row)

            def cell(ips, mfu):
                return f"{ips:>9.0f}" + (f" {100 * mfu:>3.0f}%" if mfu is not None else "")
            mode = ("amp" if amp else "fp32") + ("/NHWC" if nhwc else "")
            print(f"{row['model']:<18}{batch:>6}{mode:>10}"
                  f"{cell(row['model_images_per_s'], row['mfu_model']):>16}"
                  f"{cell(row['step_images_per_s'], row['mfu_step']):>16}"
                  f"{row['e2e_images_per_s']:>16.0f}"
                  f"{row['e2e_images_per_s'] / row['step_images_per_s']:>9.2f}"
                  f"{row['peak_gb']:>9.2f}")
            tr = loader = batches = x = None
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())
