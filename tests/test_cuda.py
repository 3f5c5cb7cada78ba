"""CUDA: exact float32 parity with Darknet (TF32 off), half precision, CUDA graphs, --amp
training; and the CPU side of the same code (flags restored, bf16 autocast training, the GPU
benchmark's clean exit). The ``cuda`` tests run where a GPU is present and skip elsewhere."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import darknet_cfg
from darknet_cfg.infer import Detector
from darknet_cfg.runtime import cudnn_autotune, exact_float32

from conftest import IMAGES, ORACLE, HAVE_SHARED, model_names

HAVE_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[1]


def _cuda_param(names):
    return [pytest.param(n, marks=cuda, id=n) for n in names]


def _detectors():
    if not HAVE_SHARED:
        return []
    out = []
    for n in model_names():
        meta = json.loads((ORACLE / "models" / n / "meta.json").read_text())
        if meta["kind"] == "detector" and n != "cspx-p7-mish":  # see test_infer_parity.SKIP
            out.append(n)
    return out


# ----------------------------------------------------------------------------- CPU side
def test_exact_float32_restores_the_users_settings():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flags")
    before = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    with exact_float32():
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with pytest.raises(RuntimeError):
        with exact_float32():
            raise RuntimeError("boom")
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    bench = torch.backends.cudnn.benchmark
    with cudnn_autotune():
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == bench


def test_amp_training_runs_on_cpu_in_bfloat16(tmp_path):
    """The mixed-precision path (autocast, float32 loss) exercised without a GPU."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import _cfg, _opts
    from darknet_cfg.synth import make_synthetic
    from darknet_cfg.train import Trainer, amp_dtype
    ds = make_synthetic(tmp_path / "synth", images=8, classes=3, size=64, valid=2, seed=5)
    tr = Trainer(_opts(ds, _cfg(tmp_path, max_batches=2), tmp_path, amp=True))
    assert tr.amp == torch.bfloat16 and tr.scaler is None
    assert amp_dtype(torch.device("cuda"), True) == torch.float16
    seen_dtypes = set()
    hook = tr.model.layers[1].register_forward_hook(lambda m, i, o: seen_dtypes.add(o.dtype))
    res = tr.run()
    hook.remove()
    assert res["iteration"] == 2 and np.isfinite(res["avg_loss"])
    assert torch.bfloat16 in seen_dtypes
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())   # master weights


def test_cuda_options_need_a_cuda_device(tmp_path):
    from test_train import MINI
    model = darknet_cfg.build_model(MINI)
    with pytest.raises(darknet_cfg.DarknetError, match="cuda_graph=True needs a CUDA device"):
        Detector(model, cuda_graph=True)


@pytest.mark.skipif(HAVE_CUDA, reason="checks the no-GPU exit")
def test_gpu_bench_exits_cleanly_without_cuda():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout + r.stderr


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.parametrize("name", _cuda_param(model_names() if HAVE_SHARED else []))
def test_forward_matches_darknet_on_cuda(name, tmp_path):
    from test_parity import ATOL, RTOL, load_oracle_model, reference
    oio, m, model = load_oracle_model(name, tmp_path)
    model.cuda()
    x = torch.from_numpy(m.input)[None].cuda()
    with torch.no_grad(), exact_float32():
        ys = model(x)
    refs = reference(oio, model, m)
    for idx, y in zip(model.output_indices, ys):
        ref = refs[idx]
        got = y[0].cpu().numpy().reshape(ref.shape)
        diff = np.abs(got - ref)
        assert np.all(diff <= ATOL + RTOL * np.abs(ref)), f"layer {idx}: max |diff| {diff.max():.3g}"
        print(f"{name}: layer {idx} max |diff| {diff.max():.2e}")


@pytest.mark.parametrize("name", _cuda_param(_detectors()))
def test_detector_matches_darknet_on_cuda(name, tmp_path):
    """Exact mode (the default on CUDA), eager and from a CUDA graph; then float16, whose
    distance from Darknet is printed (README: half precision)."""
    from test_infer_parity import _assert_outputs_close, assert_same_detections, load_oracle_model
    model, meta = load_oracle_model(name, tmp_path)
    ref = json.loads((ORACLE / "models" / name / "detections.json").read_text())
    for graphs in (False, True):
        det = Detector(model.fuse(), thresh=ref["thresh"], nms=ref["nms"], device="cuda",
                       cuda_graph=graphs)
        assert det.exact
        x, size = det.prepare(IMAGES / "dog.png")
        out = det.forward(x[None])[0]
        _assert_outputs_close(name, out)
        dets = det.decode(out, size)
        assert_same_detections(dets, det.suppress(dets), ref)
    report = {}
    for label, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        low = Detector(model, thresh=ref["thresh"], nms=ref["nms"], device="cuda", dtype=dtype,
                       cuda_graph=True)
        out_low = low.forward(x[None])[0]
        worst = max(float(np.abs(out_low[k] - out[k]).max()) for k in out)
        d_low = low.suppress(low.decode(out_low, size))
        report[label] = dict(max_head_diff=worst, finite=bool(np.isfinite(worst)),
                             **_box_diff(det.suppress(dets), d_low))
        model.float()
    print(f"{name}: {report}")
    _record(name, report)
    assert report["bfloat16"]["finite"]  # float16 can overflow (65504) on synthetic weights


def _box_diff(a, b):
    """Largest box / probability difference between two detection sets of the same network
    (boxes matched by provenance: layer, anchor, cell)."""
    ka = {k: i for i, k in enumerate(zip(a.layer.tolist(), a.anchor.tolist(), a.row.tolist(),
                                         a.col.tolist()))}
    kb = {k: i for i, k in enumerate(zip(b.layer.tolist(), b.anchor.tolist(), b.row.tolist(),
                                         b.col.tolist()))}
    common = sorted(set(ka) & set(kb))
    ia, ib = [ka[k] for k in common], [kb[k] for k in common]
    box = float(np.abs(a.boxes[ia] - b.boxes[ib]).max(initial=0))
    prob = float(np.abs(a.probs[ia] - b.probs[ib]).max(initial=0))
    classes = int(((a.probs[ia] > 0) != (b.probs[ib] > 0)).sum())
    return dict(boxes=(len(ka), len(kb)), max_box_diff=box, max_prob_diff=prob,
                class_set_changes=classes)


def _record(name, report):
    """Append the figures to $DARKNET_CFG_REPORT (a JSON-lines file) when it is set."""
    path = os.environ.get("DARKNET_CFG_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"model": name, **report}) + "\n")


@pytest.mark.parametrize("case", [pytest.param(0, marks=cuda, id="oracle-loss")])
def test_loss_gradients_on_cuda_equal_darknet(case):
    """The head input on the GPU: the loss (a float64 transcription) gives Darknet's delta."""
    from test_loss import DELTA_ATOL, DELTA_RTOL, _cases, _targets, _train
    from darknet_cfg.loss import RegionLossParams, YoloLossParams, region_loss, yolo_loss
    checked = 0
    for p in _cases()[:6]:
        name, variant, k, L = p.values
        t = _train(name, variant)
        layer = t.layout["layers"][L]
        it = t.stats["iterations"][k - 1]
        x = torch.from_numpy(t.iters[k - 1]["in_%d" % L].copy())[None].cuda().requires_grad_(True)
        fn, P = (yolo_loss, YoloLossParams) if layer["type"] == "yolo" else (region_loss, RegionLossParams)
        loss, _ = fn(x, _targets(t), P.from_layout_params(layer["params"]), t.layout["net_w"],
                     t.layout["net_h"], seen=it["seen_during_forward"])
        loss.backward()
        np.testing.assert_allclose(-x.grad[0].cpu().numpy(), t.iters[k - 1]["delta_%d" % L],
                                   atol=DELTA_ATOL, rtol=DELTA_RTOL)
        checked += 1
    assert checked


@pytest.mark.parametrize("amp", [pytest.param(False, marks=cuda, id="fp32"),
                                 pytest.param(True, marks=cuda, id="amp")])
def test_training_on_cuda(amp, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import _cfg, _opts
    from darknet_cfg.synth import make_synthetic
    from darknet_cfg.train import Trainer
    ds = make_synthetic(tmp_path / "synth", images=8, classes=3, size=64, valid=2, seed=5)
    tr = Trainer(_opts(ds, _cfg(tmp_path, max_batches=3), tmp_path, device="cuda", amp=amp))
    assert (tr.scaler is not None) == amp
    res = tr.run()
    assert res["iteration"] == 3 and np.isfinite(res["avg_loss"])
    m = darknet_cfg.load(tr.o.cfg, tr.names["final"])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_half_precision_stays_finite_on_cpu():
    """float16 guards that the GPU run exposed: the one-exp mish overflowed (inf/inf) above
    x = 5.5 and max-pool padding used -FLT_MAX, which float16 cannot hold."""
    from darknet_cfg.layers.activations import _mish_one_exp, _mish_one_exp_
    x = torch.linspace(-30, 60, 2001)
    for dtype in (torch.float16, torch.bfloat16):
        ref = torch.nn.functional.mish(x.to(dtype)).double()
        for fn in (_mish_one_exp, lambda t: _mish_one_exp_(t.clone())):
            y = fn(x.to(dtype)).double()
            assert torch.isfinite(y).all()
            assert float(((y - ref).abs() / (ref.abs() + 1e-2)).max()) < 2e-2
    from darknet_cfg.layers.pooling import MaxPool
    pool = MaxPool(2, 1, 1, 1, False, 4)  # yolov3-tiny: one padding column, right only
    y = pool(torch.full((1, 4, 5, 5), -60000.0).half())
    assert torch.isfinite(y).all() and y.dtype == torch.float16
