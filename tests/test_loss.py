"""Detection-layer training losses against Darknet's training oracle (shared/oracle/train/).

For every model, iteration and detection layer the layer INPUT Darknet saw (``in_L``) is fed to
yolo_loss / region_loss with the oracle's truths; then
  * ``-d loss / d in_L`` must equal Darknet's ``l.delta`` (``delta_L``),
  * ``stats['cost']`` (= the loss value) must equal Darknet's ``l.cost`` (``layer_cost``),
  * the statistics Darknet printed must match,
  * the activated output must equal ``out_L``.
"""
import functools
import math

import numpy as np
import pytest
import torch

from conftest import HAVE_SHARED, ORACLE, needs_shared, oracle_io
from darknet_cfg.loss import (RegionLossParams, YoloLossParams, _box_giou, _box_iou, _dx_box_iou,
                              region_loss, yolo_loss)

DELTA_ATOL, DELTA_RTOL = 1e-5, 1e-4      # -grad vs delta_L
COST_RTOL = 1e-5                         # stats['cost'] vs l.cost
OUT_ATOL = 1e-6                          # activated output vs out_L (README: ulps, <= 2.4e-7)
PRINT_ATOL, PRINT_RTOL = 1e-6, 1e-5      # printed with %f (6 decimals)


@functools.lru_cache(maxsize=None)
def _train(name, variant):
    return oracle_io().load_train(name, variant)


def _cases():
    if not HAVE_SHARED:
        return [pytest.param(None, None, 0, 0, id="no-shared")]
    import json
    out = []
    for d in sorted((ORACLE / "train").iterdir()):
        if not (d / "meta.json").is_file():
            continue
        meta = json.loads((d / "meta.json").read_text())
        for variant in (None, "fixed"):
            for k in range(1, meta["iterations"] + 1):
                for L in meta["detection_layers"]:
                    out.append(pytest.param(d.name, variant, k, L,
                                            id=f"{d.name}-{variant or 'cpu'}-it{k}-L{L}"))
    return out


def _targets(t):
    return torch.tensor([[0.0, r["class_id"], *r["truth_xywh"]] for r in t.truths], dtype=torch.float32)


def _run(t, k, L):
    """(loss, stats, head_input with .grad) for layer L of iteration k."""
    layer = t.layout["layers"][L]
    it = t.stats["iterations"][k - 1]
    x = torch.from_numpy(t.iters[k - 1]["in_%d" % L].copy())[None].requires_grad_(True)
    fn, P = (yolo_loss, YoloLossParams) if layer["type"] == "yolo" else (region_loss, RegionLossParams)
    loss, stats = fn(x, _targets(t), P.from_layout_params(layer["params"]), t.layout["net_w"],
                     t.layout["net_h"], seen=it["seen_during_forward"])
    loss.backward()
    return loss, stats, x


def _close_printed(mine, ref, scale=None):
    scale = abs(ref) if scale is None else scale
    return abs(mine - ref) <= PRINT_ATOL + PRINT_RTOL * scale


@needs_shared
@pytest.mark.parametrize("name,variant,k,L", _cases())
def test_detection_loss_matches_darknet(name, variant, k, L):
    t = _train(name, variant)
    it = t.stats["iterations"][k - 1]
    loss, stats, x = _run(t, k, L)

    ref_delta = t.iters[k - 1]["delta_%d" % L]
    grad = -x.grad[0].numpy()
    assert grad.shape == ref_delta.shape
    np.testing.assert_allclose(grad, ref_delta, atol=DELTA_ATOL, rtol=DELTA_RTOL)
    np.testing.assert_array_equal(stats["delta"][0].numpy(), grad)

    ref_cost = it["layer_cost"][str(L)]
    assert abs(stats["cost"] - ref_cost) <= COST_RTOL * abs(ref_cost), (stats["cost"], ref_cost)
    assert loss.item() == pytest.approx(stats["cost"], rel=1e-6)

    if ("out_%d" % L) in t.iters[k - 1]:   # variant_fixed stores out_L for iteration 1 only
        ref_out = t.iters[k - 1]["out_%d" % L]
        out = stats["output"][0].numpy()
        assert out.shape == ref_out.shape
        np.testing.assert_allclose(out, ref_out, atol=OUT_ATOL, rtol=0)

    if t.layout["layers"][L]["type"] == "yolo":
        pr = [e for e in it["printed"]["yolo_printed"] if e["layer"] == L]
        assert len(pr) == 1
        pr = pr[0]
        assert stats["count"] == pr["count"]
        for key in ("avg_iou", "class_loss", "total_loss"):
            assert _close_printed(stats[key], pr[key]), (key, stats[key], pr[key])
        # iou_loss = total_loss - class_loss: a difference of two float32 sums, so its error scales
        # with their size (Darknet's own float accumulation error), not with its own
        scale = max(abs(pr["class_loss"]), abs(pr["total_loss"]))
        assert _close_printed(stats["iou_loss"], pr["iou_loss"], scale), (stats["iou_loss"], pr["iou_loss"])
    else:
        pr = it["printed"]["region_printed"]
        assert len(pr) == 1
        pr = pr[0]
        assert stats["count"] == pr["count"]
        for key in ("avg_iou", "avg_class", "avg_obj", "avg_noobj", "avg_recall"):
            assert _close_printed(stats[key], pr[key]), (key, stats[key], pr[key])


@needs_shared
@pytest.mark.parametrize("variant", [None, "fixed"])
@pytest.mark.parametrize("name", sorted(p.name for p in (ORACLE / "train").iterdir() if p.is_dir())
                         if HAVE_SHARED else ["none"])
def test_network_cost_is_mean_of_layer_costs(name, variant):
    """train_network_datum returns the mean of the detection layers' l.cost."""
    t = _train(name, variant)
    for k in range(1, t.meta["iterations"] + 1):
        costs = [_run(t, k, L)[1]["cost"] for L in t.meta["detection_layers"]]
        ref = t.stats["iterations"][k - 1]["train_network_datum_return"]
        assert abs(sum(costs) / len(costs) - ref) <= COST_RTOL * abs(ref)


@needs_shared
@pytest.mark.parametrize("name", sorted(p.name for p in (ORACLE / "train").iterdir() if p.is_dir())
                         if HAVE_SHARED else ["none"])
def test_assignment_counts_iter1(name):
    t = _train(name, None)
    for L in t.meta["detection_layers"]:
        stats = _run(t, 1, L)[1]
        assert stats["n_assigned"] == t.meta["assigned_truths_per_layer_iter1"][str(L)]
        names = [r["name"] for r in t.truths]
        mine = [(names[a["target"]], a["anchor_id"], a["slot"], list(a["cell"])) for a in stats["assignments"]]
        ref = [(r["truth"], r["anchor_id"], r["slot"], r["cell"]) for r in t.meta["assignments_iter1"][str(L)]]
        assert mine == ref
        for a, r in zip(stats["assignments"], t.meta["assignments_iter1"][str(L)]):
            assert abs(a["iou"] - r["iou"]) <= 5e-4 + 1e-6      # meta rounds the IoU to 3 decimals


# ------------------------------------------------------------------ synthetic (no oracle needed)
def _yolo_params(**kw):
    base = dict(classes=3, num=6, mask=[0, 1, 2], anchors=[10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319],
                ignore_thresh=0.7, iou_loss="ciou", iou_normalizer=0.07)
    base.update(kw)
    return YoloLossParams.from_layout_params(base)


_TARGETS = torch.tensor([[0, 1, 0.40, 0.45, 0.30, 0.40], [0, 2, 0.70, 0.30, 0.10, 0.15],
                         [0, 0, 0.20, 0.80, 0.05, 0.08]], dtype=torch.float32)


@pytest.mark.parametrize("kw", [dict(), dict(iou_loss="mse"), dict(iou_loss="giou"), dict(iou_loss="diou"),
                                dict(iou_thresh=0.1, objectness_smooth=1), dict(new_coords=1, scale_x_y=2),
                                dict(new_coords=1, iou_loss="mse"), dict(label_smooth_eps=0.1),
                                dict(focal_loss=1), dict(counters_per_class="10,200,50"),
                                dict(truth_thresh=0.05, ignore_thresh=0.01)])
def test_yolo_loss_contract(kw):
    """value = stats['cost'], gradient = -stats['delta']; a batch of two identical images gives the
    same per-image delta, twice the cost and the same printed (per-image) losses."""
    p = _yolo_params(**kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 8, 8, 8, generator=g)
    if p.new_coords:
        x = torch.sigmoid(x)
    x1 = x.clone().requires_grad_(True)
    loss, st = yolo_loss(x1, _TARGETS, p, 256, 256)
    loss.backward()
    assert loss.item() == st["cost"] or math.isclose(loss.item(), st["cost"], rel_tol=1e-6)
    assert torch.equal(-x1.grad, st["delta"])
    assert torch.isfinite(st["delta"]).all()
    x2 = x.repeat(2, 1, 1, 1).requires_grad_(True)
    t2 = torch.cat([_TARGETS, _TARGETS.clone().index_fill_(1, torch.tensor([0]), 1.0)])
    loss2, st2 = yolo_loss(x2, t2, p, 256, 256)
    assert torch.equal(st2["delta"][0], st["delta"][0]) and torch.equal(st2["delta"][1], st["delta"][0])
    assert st2["total_loss"] == pytest.approx(st["total_loss"], rel=1e-9)
    if p.iou_loss == "mse":
        assert st2["cost"] == pytest.approx(2 * st["cost"], rel=1e-9)


def test_region_loss_contract():
    p = RegionLossParams(classes=3, num=2, anchors=(1.0, 1.5, 3.0, 2.0), softmax=1, bias_match=1,
                         object_scale=5, thresh=0.6)
    x = torch.randn(1, 2 * 8, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    loss, st = region_loss(x, _TARGETS, p, 256, 256, seen=0)
    loss.backward()
    assert math.isclose(loss.item(), st["cost"], rel_tol=1e-6)
    assert torch.equal(-x.grad, st["delta"])
    assert st["count"] == 3
    # after 12800 images the prior-matching deltas disappear: only assigned anchors keep box deltas
    _, st_late = region_loss(x.detach(), _TARGETS, p, 256, 256, seen=12800)
    box = st_late["delta"][0].view(2, 8, 8, 8)[:, :4]
    assert int((box != 0).any(dim=1).sum()) == 3


def test_counters_per_class_multipliers():
    p = _yolo_params(counters_per_class="10,200,0", max_delta=5)
    assert p.classes_multipliers == (5.0, 1.0, 5.0)     # max/count, count<1 -> 1, capped at max_delta


@pytest.mark.parametrize("kind", ["iou", "giou"])
def test_dx_box_iou_is_darknets_gradient(kind):
    """dx_box_iou's x/y entries are d(IoU)/d(x,y); its w/h entries are twice d/d(w,h) (not halved)."""
    f = _box_iou if kind == "iou" else _box_giou
    pred, truth = (0.52, 0.47, 0.30, 0.22), (0.50, 0.50, 0.25, 0.30)
    dx, dy, dw, dh = _dx_box_iou(pred, truth, kind)
    eps = 1e-6

    def fd(k):
        a, b = list(pred), list(pred)
        a[k] += eps
        b[k] -= eps
        return (f(tuple(a), truth) - f(tuple(b), truth)) / (2 * eps)

    assert dx == pytest.approx(fd(0), rel=1e-5, abs=1e-7)
    assert dy == pytest.approx(fd(1), rel=1e-5, abs=1e-7)
    assert dw == pytest.approx(2 * fd(2), rel=1e-5, abs=1e-7)
    assert dh == pytest.approx(2 * fd(3), rel=1e-5, abs=1e-7)
