"""Inference latency race: darknet_cfg (eager, fused, ONNX in onnxruntime) vs OpenCV DNN.

    python bench/infer.py                       # yolov4-tiny@416, yolov4@416, yolov4-csp@512
    python bench/infer.py --runs 30 --models yolov4-tiny --batches 1
    python bench/infer.py --levers              # channels_last, inference_mode, ORT opt levels

Every engine runs the same cfg and the same synthetic weights (darknet_cfg random init,
calibrated so that ~3% of the cells pass the 0.25 objectness threshold, saved as .weights) on
dog.png, with 2 threads. Engines are interleaved round by round; figures are medians over
``--runs`` rounds, per image (batch time / batch). Forward, decode (get_network_boxes; OpenCV:
reading its decoded rows) and NMS (Darknet's; OpenCV: cv2.dnn.NMSBoxes per class) are timed
separately. "fused" is what ``Detector`` runs on CPU by default: BN folded, channels_last,
prepacked oneDNN convolutions (``model.prepack()``), in-place one-exp mish, batches of up
to 4 images at once; "compiled" adds ``model.compile_activations()`` (detect --compile); "winograd" adds
Winograd 3x3 convolutions to that (detect --compile --winograd; opt-in). "bf16" and "int8"
are ``Detector(precision=...)`` (detect --bf16 / --int8; opt-in, not Darknet's numbers;
int8 calibrated on the shared images; darknet_cfg/lowp.py); "int8-ort" is ONNX Runtime's
static quantization of the ONNX export on the same images (bench/int8_ort.py), for comparison.
``--levers`` adds
"fused+winograd" (detect --winograd, without --compile) and "fused+winograd2" (F(2x2) tiles
only, ``Detector(winograd=2)``). The process runs with
``runtime.keep_freed_memory()`` as Detector sets it (process-wide, so every engine has it).
Peak memory: each engine alone in a fresh process (peak RSS after loading and 3 batch-1
inferences). Ratios are to OpenCV DNN measured in the same run. The CPU's measured FMA peak
(bench/cpu_peak.py) is printed before and after: it moves between runs on shared machines.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# --omp-passive: PyTorch's OpenMP threads sleep at once at barriers instead of spinning briefly.
# Use it only on a machine busy with other work (there, spinning made 2 threads 5-10x slower than
# 1); on a quiet machine it costs PyTorch 1.3-1.5x here (a wake-up per operator).
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numpy as np  # noqa: E402  (torch is imported lazily: the memory probes of
# onnxruntime and OpenCV must not pay for it)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DARKNET_CFG_SHARED", REPO.parent / "shared"))
MODELS = {"yolov4-tiny": 416, "yolov4": 416, "yolov4-csp": 512}
TORCH_ENGINES = ("eager", "fused", "compiled", "winograd", "bf16", "int8", "int8-ort")
ENGINES = TORCH_ENGINES + ("onnxruntime", "opencv")


# ------------------------------------------------------------------------- synthetic weights

def synthetic_weights(name: str, size: int, path: Path, seed: int = 0) -> None:
    """Random weights that behave like trained ones on dog.png: conv U(+-sqrt(3/fan_in)), BN
    scale 0.8-1.2 with running statistics taken from the data (so activations stay O(1) in deep
    nets), head convs scaled to an output std of 1.4 and objectness biases set so ~3% of the
    cells pass 0.25 (a realistic decode/NMS load). Saved as Darknet .weights."""
    import torch
    import darknet_cfg
    from darknet_cfg.infer import Detector
    model = darknet_cfg.build_model(SHARED / "darknet-cfg" / f"{name}.cfg", size, size).eval()
    g = torch.Generator().manual_seed(seed)
    u = lambda t, lo, hi: t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    head_convs = {s.index: model.layers[s.index - 1].conv for s in model.heads}
    det = Detector(model)
    x = torch.from_numpy(det.prepare(_image())[0][None])

    def bn_from_data(bn, inputs):  # running stats = this input's statistics
        t = inputs[0]
        bn.running_mean.copy_(t.mean((0, 2, 3)))
        bn.running_var.copy_(t.var((0, 2, 3)) + 1e-3)

    def head_std(conv, inputs, out):
        s = float(out.std()) or 1.0
        conv.weight.mul_(1.4 / s)
        conv.bias.mul_(1.4 / s)

    with torch.no_grad():
        for m in convs:
            b = (3 / m.weight[0].numel()) ** 0.5
            u(m.weight, -b, b)
            if m.bias is not None:
                u(m.bias, -0.5, 0.5)
        for m in bns:
            u(m.weight, 0.8, 1.2), u(m.bias, -0.1, 0.1)
        hooks = [m.register_forward_pre_hook(bn_from_data) for m in bns]
        hooks += [c.register_forward_hook(head_std) for c in head_convs.values()]
        model(x)
        for h in hooks:
            h.remove()
        outs = det.forward(x.numpy())[0]
        for spec in model.heads:
            k = 5 + spec.classes
            obj = np.clip(outs[spec.index][4::k].ravel(), 1e-6, 1 - 1e-6)
            q = np.quantile(obj, 0.97)
            head_convs[spec.index].bias[4::k] += float(np.log(1 / 3) - np.log(q / (1 - q)))
    darknet_cfg.save_weights(model, path)


def _image():
    return SHARED / "images" / "dog.png"


def _cfg_at_size(name: str, size: int, tmp: Path) -> Path:
    """The upstream cfg with width/height first in [net] (OpenCV has no size override)."""
    text = (SHARED / "darknet-cfg" / f"{name}.cfg").read_text()
    out = tmp / f"{name}-{size}.cfg"
    out.write_text(text.replace("[net]", f"[net]\nwidth={size}\nheight={size}", 1))
    return out


# ----------------------------------------------------------------------------------- engines

class Engine:
    """forward(batch NCHW float32) -> raw outputs; post(outputs, n) -> (decode s, nms s)."""

    def __init__(self, kind, cfg, weights, size, detector, opts):
        self.kind = kind
        if kind in TORCH_ENGINES:
            import torch
            import darknet_cfg
            from darknet_cfg.runtime import keep_freed_memory
            keep_freed_memory()  # as Detector does on CPU (process-wide: every engine gets it)
            model = darknet_cfg.load(cfg, weights)
            if kind != "eager":
                model.fuse()
            self.dtype, self.run = torch.float32, model
            if kind == "bf16":  # as Detector(precision="bf16")
                from darknet_cfg import lowp
                lowp.to_bf16(model)
                self.dtype = torch.bfloat16
            if kind == "int8":  # as Detector(precision="int8"), calibrated on the shared images
                from darknet_cfg import lowp
                from darknet_cfg.infer import Detector
                prep = Detector(darknet_cfg.load(cfg, weights)).prepare
                self.dtype = lowp.to_int8(model, lowp.int8_ranges(
                    model, prep, sorted(_image().parent.glob("*.png")),
                    Path(weights).with_suffix(".int8.json")))
            if kind == "int8-ort":  # ONNX Runtime's static quantization, the same images
                import int8_ort
                from darknet_cfg.infer import Detector
                prep = Detector(darknet_cfg.load(cfg, weights)).prepare
                path = Path(weights).with_suffix(".int8.onnx")
                if not path.exists():
                    int8_ort.quantize(model, [prep(p)[0][None] for p in
                                              sorted(_image().parent.glob("*.png"))], path)
                self.run = int8_ort.Int8Runner(path, THREADS)
                opts = dict(opts, channels_last=False, prepack=False)
            if kind in ("compiled", "winograd"):
                model.compile_activations()
            cl = opts.get("channels_last", kind != "eager")  # as Detector does on CPU
            if cl:
                model.to(memory_format=torch.channels_last)
            if opts.get("prepack", kind != "eager"):
                model.prepack(winograd=opts.get("winograd", 4 if kind == "winograd" else 0))
            self.model, self.cl = model, cl
            self.no_grad = opts.get("no_grad", False)
        elif kind == "onnxruntime":
            import onnxruntime as ort
            onnx_path = Path(weights).with_suffix(".onnx")
            if not onnx_path.exists():
                import darknet_cfg
                from darknet_cfg.export import export_onnx
                export_onnx(darknet_cfg.load(cfg, weights).fuse(), onnx_path, dynamic_batch=True)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
            # no busy-waiting between runs: it would steal the cores of the next engine
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            level = opts.get("ort_level", "all")
            so.graph_optimization_level = {
                "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
            self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        elif kind == "opencv":
            import cv2
            cv2.setNumThreads(THREADS)
            self.net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            self.names = self.net.getUnconnectedOutLayersNames()
        self.det = detector

    def forward(self, x):
        if self.kind in TORCH_ENGINES:
            import torch
            from darknet_cfg.infer import CPU_MICRO_BATCH, forward_micro_batches
            t = torch.from_numpy(x).to(self.dtype)
            if self.cl:
                t = t.contiguous(memory_format=torch.channels_last)
            ctx = torch.no_grad() if self.no_grad else torch.inference_mode()
            with ctx:
                # as Detector does on CPU (micro_batch=CPU_MICRO_BATCH); eager: the plain call
                outs = forward_micro_batches(self.run, t,
                                             0 if self.kind == "eager" else CPU_MICRO_BATCH)
                return [o.float().contiguous().numpy() for o in outs]  # as Detector
        if self.kind == "onnxruntime":
            return self.sess.run(None, {"input": x})
        self.net.setInput(x)
        return self.net.forward(self.names)

    def post(self, outs, n, sizes):
        """(decode seconds, nms seconds) for all n images."""
        if self.kind == "opencv":
            return _opencv_post(outs, n, sizes, self.det)
        t0 = time.perf_counter()
        idx = self.det.model.output_indices
        dets = [self.det.decode({li: o[k] for li, o in zip(idx, outs)}, sizes[k]) for k in range(n)]
        t1 = time.perf_counter()
        for d in dets:
            self.det.suppress(d)
        return t1 - t0, time.perf_counter() - t1


def _opencv_post(outs, n, sizes, det):
    """The usual OpenCV pipeline: rows with obj > thresh, per-class scores, NMSBoxes per class."""
    import cv2
    t0 = time.perf_counter()
    rows = np.concatenate([o.reshape(n, -1, o.shape[-1]) if o.ndim == 3 else o.reshape(n, -1, o.shape[-1])
                           for o in outs], axis=1)
    picked = []
    for k in range(n):
        r = rows[k][rows[k][:, 4] > det.thresh]
        w, h = sizes[k]
        xywh = np.stack([(r[:, 0] - r[:, 2] / 2) * w, (r[:, 1] - r[:, 3] / 2) * h,
                         r[:, 2] * w, r[:, 3] * h], axis=1)
        picked.append((r, xywh))
    t1 = time.perf_counter()
    for r, xywh in picked:
        scores = r[:, 5:]
        for c in np.flatnonzero((scores > det.thresh).any(axis=0)):
            sel = scores[:, c] > det.thresh
            cv2.dnn.NMSBoxes(xywh[sel].tolist(), scores[sel, c].tolist(), det.thresh, det.nms_thresh)
    return t1 - t0, time.perf_counter() - t1


# ------------------------------------------------------------------------------- the race

def _inputs(det, batch):
    x, size = det.prepare(_image())
    return np.ascontiguousarray(np.repeat(x[None], batch, axis=0)), [size] * batch


def race(name, size, runs, batches, tmp, engines=ENGINES, opts=None, warmup=2):
    import darknet_cfg
    from darknet_cfg.infer import Detector
    opts = opts or {}
    weights = tmp / f"{name}-{size}.weights"
    if not weights.exists():
        synthetic_weights(name, size, weights)
    cfg = _cfg_at_size(name, size, tmp)
    det = Detector(darknet_cfg.load(cfg, weights).fuse())
    built = {e: Engine(opts.get(e, {}).get("kind", e), cfg, weights, size, det, opts.get(e, {}))
             for e in engines}
    results = {}
    for batch in batches:
        x, sizes = _inputs(det, batch)
        times = {e: {"forward": [], "decode": [], "nms": []} for e in built}
        for r in range(warmup + runs):
            for e, eng in built.items():  # interleaved
                t0 = time.perf_counter()
                outs = eng.forward(x)
                fwd = time.perf_counter() - t0
                dec, nms = eng.post(outs, batch, sizes)
                if r >= warmup:
                    for key, v in (("forward", fwd), ("decode", dec), ("nms", nms)):
                        times[e][key].append(v * 1000 / batch)
        results[batch] = {e: {k: statistics.median(v) for k, v in t.items()} for e, t in times.items()}
        n_boxes = len(det.detect(_image())[0])
        results[batch]["_boxes"] = n_boxes
    return results


def peak_memory(name, size, engine, tmp) -> float:
    """Peak RSS (GB) of a fresh process that loads ``engine`` and runs 3 batch-1 inferences."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import infer, pathlib; "
            f"infer._mem_child({name!r}, {size}, {engine!r}, pathlib.Path({str(tmp)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _mem_child(name, size, engine, tmp):
    import cv2
    if engine in TORCH_ENGINES:
        import torch
        torch.set_num_threads(THREADS)
    eng = Engine(engine, _cfg_at_size(name, size, tmp), tmp / f"{name}-{size}.weights", size,
                 None, {})
    bgr = cv2.resize(cv2.imread(str(_image())), (size, size))
    x = np.ascontiguousarray(bgr[None, :, :, ::-1].transpose(0, 3, 1, 2), np.float32) / 255
    for _ in range(3):
        eng.forward(x)
    # VmHWM: peak RSS of this process image (ru_maxrss would include the parent's at fork)
    hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")]
    kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(kb / 1024 ** 2)


# -------------------------------------------------------------------------------- reports

def table(all_results, mem):
    lines = ["| model | batch | engine | forward ms/img | decode ms/img | NMS ms/img | total ms/img "
             "| total / OpenCV | peak RSS GB |", "|---" * 9 + "|"]
    for model, res in all_results.items():
        for batch, per in res.items():
            ref = per.get("opencv")
            ref_total = sum(ref.values()) if ref else None
            for e, t in per.items():
                if e.startswith("_"):
                    continue
                total = sum(t.values())
                ratio = f"{total / ref_total:.2f}x" if ref_total else "-"
                m = mem.get((model, e))
                lines.append(f"| {model} | {batch} | {e} | {t['forward']:.1f} | {t['decode']:.2f} | "
                             f"{t['nms']:.2f} | {total:.1f} | {ratio} | "
                             f"{f'{m:.2f}' if m and batch == 1 else ''} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--levers", action="store_true",
                    help="instead: fused eager variants and ORT optimisation levels")
    ap.add_argument("--json", help="also write the raw medians here")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for PyTorch (only for a busy machine)")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="darknet-cfg-bench."))
    from cpu_peak import fma_peak
    print(f"torch {torch.__version__}, {THREADS} threads, runs={args.runs}, tmp={tmp}, "
          f"FMA peak now {fma_peak(THREADS) or float('nan'):.0f} GFLOP/s", flush=True)
    if args.levers:
        return levers(args, tmp)
    results, mem = {}, {}
    for name in args.models:
        size = MODELS[name]
        t0 = time.time()
        results[f"{name}@{size}"] = race(name, size, args.runs, args.batches, tmp, args.engines)
        if not args.no_memory:
            for e in args.engines:
                mem[(f"{name}@{size}", e)] = peak_memory(name, size, e, tmp)
        key = f"{name}@{size}"
        print(f"{key}: {time.time() - t0:.0f} s, {results[key][args.batches[0]]['_boxes']} boxes",
              flush=True)
        print(table({key: results[key]}, mem), flush=True)  # as soon as it is measured
    if len(results) > 1:
        print(table(results, mem))
    print(f"FMA peak at the end: {fma_peak(THREADS) or float('nan'):.0f} GFLOP/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "memory_gb": {
            f"{k[0]} {k[1]}": v for k, v in mem.items()}}, indent=1))


def levers(args, tmp):
    """Variants of the fused model and of onnxruntime, batch 1, vs OpenCV in the same run."""
    variants = {
        "fused-nchw": {"kind": "fused", "channels_last": False, "prepack": False},
        "fused-unpacked": {"kind": "fused", "prepack": False},
        "fused+no_grad": {"kind": "fused", "no_grad": True},
        "fused": {}, "fused+winograd2": {"kind": "fused", "winograd": 2},
        "fused+winograd": {"kind": "fused", "winograd": 4}, "winograd": {},
        "ort-basic": {"kind": "onnxruntime", "ort_level": "basic"},
        "ort-extended": {"kind": "onnxruntime", "ort_level": "extended"},
        "ort-all": {"kind": "onnxruntime", "ort_level": "all"}, "opencv": {},
    }
    results = {}
    for name in args.models:
        size = MODELS[name]
        results[f"{name}@{size}"] = race(name, size, args.runs, [1], tmp, list(variants), variants)
    print(table(results, {}))


if __name__ == "__main__":
    main()
