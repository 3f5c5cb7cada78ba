"""yolo_loss (vectorised) against yolo_loss_reference (Darknet's loops transcribed): random heads,
random truths (several per cell, on borders, zero-size, bad classes, early x == 0 terminators) and
every [yolo] training option.  Deltas (= -gradients) must be bit-identical float32, costs and
statistics equal to 1e-12 relative."""
import math
import random

import pytest
import torch

from darknet_cfg.loss import YoloLossParams, yolo_loss, yolo_loss_reference

ANCHORS = [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319]
STATS = ("avg_iou", "count", "n_assigned", "class_loss", "iou_loss", "total_loss", "avg_class", "avg_obj",
         "avg_noobj", "recall50", "recall75", "tot_iou", "tot_iou_loss", "tot_giou_loss",
         "rewritten_bbox", "total_bbox")


def random_params(rng: random.Random) -> YoloLossParams:
    num = rng.choice([3, 6, 9])
    anchors = [rng.choice([4, 10, 23, 37, 81, 135, 344]) * rng.uniform(0.5, 1.5) for _ in range(2 * num)]
    n = rng.randint(1, min(num, 4))
    mask = sorted(rng.sample(range(num), n)) if rng.random() < 0.8 else [rng.randrange(num) for _ in range(n)]
    kw = dict(classes=rng.choice([1, 2, 3, 7]), num=num, mask=mask, anchors=anchors,
              iou_loss=rng.choice(["mse", "iou", "giou", "diou", "ciou"]),
              iou_normalizer=rng.choice([0.07, 0.75, 1.0, 0.05]),
              obj_normalizer=rng.choice([1.0, 0.4, 4.0]), cls_normalizer=rng.choice([1.0, 0.5]),
              ignore_thresh=rng.choice([0.7, 0.5, 0.0, 0.01, 0.3]),
              truth_thresh=rng.choice([1.0, 1.0, 0.1, 0.3, 0.0]),
              new_coords=int(rng.random() < 0.3), scale_x_y=rng.choice([1.0, 1.05, 1.1, 1.2, 2.0]),
              max_boxes=rng.choice([200, 200, 3, 8]))
    if rng.random() < 0.4:
        kw.update(iou_thresh=rng.choice([0.213, 0.1, 0.5, 0.0]),
                  iou_thresh_kind=rng.choice(["iou", "giou", "diou", "ciou"]))
    if rng.random() < 0.3:
        kw["label_smooth_eps"] = rng.choice([0.1, 0.01])
    if rng.random() < 0.2:
        kw["focal_loss"] = 1
    if rng.random() < 0.3:
        kw["objectness_smooth"] = 1
    if rng.random() < 0.3:
        kw["counters_per_class"] = ",".join(str(rng.randint(0, 500)) for _ in range(kw["classes"]))
    if rng.random() < 0.3:
        kw["max_delta"] = rng.choice([5.0, 0.01, 20.0])
    if rng.random() < 0.15:
        kw["show_details"] = 0
    return YoloLossParams.from_layout_params(kw)


def random_head(rng: random.Random, g: torch.Generator, p: YoloLossParams, N: int, H: int, W: int):
    K = p.classes + 5
    scale = rng.choice([0.5, 2.0, 6.0])
    x = torch.randn(N, p.n * K, H, W, generator=g) * scale
    if p.new_coords:
        x = torch.sigmoid(x * 0.5) * rng.choice([1.0, 1.5])       # the conv before applies logistic
    if rng.random() < 0.3:                                        # extreme logits
        m = torch.rand(x.shape, generator=g) < 0.05
        ext = torch.tensor([-1e4, -90.0, -30.0, 30.0, 90.0, 1e4])
        x = torch.where(m, ext[torch.randint(0, 6, x.shape, generator=g)], x)
        if p.new_coords:
            x = x.clamp(-3, 3)
    return x


def random_targets(rng: random.Random, N: int, H: int, W: int, classes: int) -> torch.Tensor:
    rows = []
    for b in range(N):
        for _ in range(rng.choice([0, 1, 3, 8, 20])):
            r = rng.random()
            if r < 0.25 and rows and rows[-1][0] == b:              # same cell / same box as before
                prev = rows[-1]
                jit = lambda v: min(max(v + rng.uniform(-0.3, 0.3) / W, 0.0), 1.0)   # noqa: E731
                rows.append([b, rng.randrange(classes), jit(prev[2]), jit(prev[3]),
                             prev[4] * rng.choice([1.0, 1.1, 0.9]), prev[5]])
                continue
            x, y = rng.random(), rng.random()
            if r < 0.35:                                            # borders
                x = rng.choice([1.0, 0.999999, 1e-6, x])
                y = rng.choice([1.0, 0.0, 0.999999, y])
            w = rng.choice([rng.uniform(0.01, 0.3), rng.uniform(0.3, 1.0), 0.0, 1e-4])
            h = rng.choice([rng.uniform(0.01, 0.3), rng.uniform(0.3, 1.0), 0.0, 1e-4, w])
            c = rng.randrange(classes) if rng.random() > 0.05 else rng.choice([-1, classes])
            rows.append([b, c, x, y, w, h])
        if rng.random() < 0.05:                                     # x == 0 ends the image's list
            rows.append([b, 0, 0.0, 0.5, 0.1, 0.1])
            rows.append([b, 0, 0.5, 0.5, 0.1, 0.1])
    rng.shuffle(rows) if rng.random() < 0.3 else None
    if rng.random() < 0.05:
        rows.append([N + 1, 0, 0.5, 0.5, 0.1, 0.1])                 # image index out of range
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia, ib = a.view(torch.int32).to(torch.int64), b.view(torch.int32).to(torch.int64)
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    d = (ia - ib).abs()
    same = ((a == 0) & (b == 0)) | (torch.isnan(a) & torch.isnan(b))
    d = torch.where(same, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(a) ^ torch.isnan(b), torch.full_like(d, 2 ** 31), d)
    return int(d.max()) if d.numel() else 0


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def compare(x: torch.Tensor, targets, p, net_w, net_h, device="cpu", dense=None):
    """Run both; return (max ulp of the deltas, worst relative error of cost/stats)."""
    xr = x.clone().to(device).requires_grad_(True)   # the same layer output on both sides
    lr, sr = yolo_loss_reference(xr, targets, p, net_w, net_h)
    lr.backward()
    sr = dict(sr, delta=sr["delta"].cpu(), output=sr["output"].cpu())
    xv = x.clone().to(device).requires_grad_(True)
    lv, sv = yolo_loss(xv, targets, p, net_w, net_h, dense=dense)
    lv.backward()
    dv = sv["delta"].cpu()
    assert _equal(-xv.grad.cpu(), dv)
    assert _equal(sv["output"].cpu(), sr["output"])
    ulp = _ulps(dv, sr["delta"])
    worst = 0.0
    for k in ("cost",) + STATS:
        a, b = sv[k], sr[k]
        if isinstance(b, (int,)) and not isinstance(b, bool):
            assert a == b, (k, a, b)
            continue
        if math.isnan(b):
            assert math.isnan(a), (k, a, b)
            continue
        scale = abs(b)
        if k == "iou_loss":          # total - class_loss: relative to the terms, not the difference
            scale = max(abs(sr["total_loss"]), abs(sr["class_loss"]))
        err = abs(a - b) / max(scale, 1e-300) if a != b else 0.0
        worst = max(worst, err)
    # the value is the cost in float32 (the reference's surrogate turns an inf cost into nan)
    c32 = torch.tensor(sr["cost"], dtype=torch.float32).item()
    assert lv.item() == c32 or lv.item() == pytest.approx(c32, rel=1e-6) or (math.isnan(c32) and math.isnan(lv.item()))
    mine = [(a["image"], a["target"], a["anchor_id"], a["slot"], a["cell"]) for a in sv["assignments"]]
    ref = [(a["image"], a["target"], a["anchor_id"], a["slot"], a["cell"]) for a in sr["assignments"]]
    assert mine == ref
    return ulp, worst


def run_cases(seed: int, cases: int, device="cpu", dense=None):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    worst_ulp, worst_rel = 0, 0.0
    for c in range(cases):
        p = random_params(rng)
        N = rng.choice([1, 1, 2, 3])
        H = rng.choice([1, 2, 4, 7, 8])
        W = rng.choice([H, 1, 5])
        net = rng.choice([(32 * W, 32 * H), (416, 416), (608, 320)])
        x = random_head(rng, g, p, N, H, W)
        t = random_targets(rng, N, H, W, p.classes)
        try:
            u, r = compare(x, t, p, *net, device=device, dense=dense)
        except AssertionError as e:
            raise AssertionError(f"seed {seed} case {c}: {p} N={N} H={H} W={W} net={net}: {e}") from e
        worst_ulp, worst_rel = max(worst_ulp, u), max(worst_rel, r)
    return worst_ulp, worst_rel


# ----------------------------------------------------------------------------------- tests
CASES = int(__import__("os").environ.get("DARKNET_CFG_LOSS_CASES", "250"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_cases_match_reference(seed):
    ulp, rel = run_cases(seed, CASES)
    assert ulp == 0, f"deltas differ by up to {ulp} float32 ulp"
    assert rel <= 1e-12


def test_dense_slot_table_matches_reference():
    """The GPU's layout (a delta row for every anchor slot, no host synchronisation) on the CPU."""
    ulp, rel = run_cases(5, CASES // 3, dense=True)
    assert ulp == 0 and rel <= 1e-12


def _crowded(N=4, H=13, W=13, per_image=50, seed=7):
    """Many boxes per image, a third of them sharing a cell with the previous one."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(N):
        xy = torch.rand(per_image, 2, generator=g)
        wh = torch.rand(per_image, 2, generator=g) * 0.5 + 0.01
        same = torch.rand(per_image, generator=g) < 0.35
        for k in range(1, per_image):
            if same[k]:
                xy[k] = xy[k - 1] + (torch.rand(2, generator=g) - 0.5) / (4 * W)
        cls = torch.randint(0, 5, (per_image, 1), generator=g).float()
        rows.append(torch.cat([torch.full((per_image, 1), float(b)), cls, xy.clamp(1e-6, 1), wh], 1))
    return torch.cat(rows)


@pytest.mark.parametrize("kw", [dict(), dict(iou_loss="mse"), dict(iou_loss="giou", iou_thresh=0.2),
                                dict(iou_loss="diou", objectness_smooth=1, truth_thresh=0.3),
                                dict(new_coords=1, scale_x_y=2.0, iou_thresh=0.213, iou_thresh_kind="ciou"),
                                dict(focal_loss=1, counters_per_class="10,200,50,1,7", max_delta=5),
                                dict(label_smooth_eps=0.1, cls_normalizer=0.5, counters_per_class="1,2,3,4,5")])
def test_crowded_batch_matches_reference(kw):
    """A larger grid and batch, 50 boxes per image, several truths per anchor slot."""
    base = dict(classes=5, num=9, mask=[3, 4, 5], anchors=ANCHORS + [142, 110, 192, 243, 459, 401],
                iou_loss="ciou", iou_normalizer=0.07, ignore_thresh=0.7, scale_x_y=1.05)
    base.update(kw)
    p = YoloLossParams.from_layout_params(base)
    x = torch.randn(4, 3 * 10, 13, 13, generator=torch.Generator().manual_seed(3)) * 2
    if p.new_coords:
        x = torch.sigmoid(x)
    for dense in (False, True):
        ulp, rel = compare(x, _crowded(), p, 416, 416, dense=dense)
        assert ulp == 0 and rel <= 1e-12


def test_stats_are_read_lazily():
    """The loss keeps its statistics as tensors until they are read (no host synchronisation)."""
    p = YoloLossParams.from_layout_params(dict(classes=5, num=9, mask=[0, 1, 2], anchors=ANCHORS + [1] * 6))
    x = torch.randn(2, 30, 8, 8)
    _, st = yolo_loss(x, _crowded(N=2, H=8, W=8, per_image=10), p, 256, 256)
    assert isinstance(st.raw("cost"), torch.Tensor) and callable(st.raw("assignments"))
    assert isinstance(st["cost"], float) and isinstance(st["rewritten_bbox"], int)
    assert len(st["assignments"]) == st["n_assigned"] > 0


def test_no_truths():
    p = YoloLossParams.from_layout_params(dict(classes=2, num=3, mask=[0, 1, 2], anchors=ANCHORS[:6],
                                               iou_loss="ciou"))
    x = torch.randn(2, 21, 4, 4)
    for t in (torch.zeros(0, 6), None, torch.tensor([[0, 1, 0.0, 0.5, 0.1, 0.1]])):
        assert compare(x, t, p, 128, 128) == (0, 0.0)


@pytest.mark.cuda
def test_cuda_matches_reference():
    """On the GPU: the same deltas and statistics as the reference (which gets the same layer
    output and computes on the CPU).  CUDA's exp/log/atan/pow may differ from the CPU's by an ulp
    in float64, which can move a float32 delta by one ulp: at most 1 ulp is allowed here."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ulp, rel = run_cases(11, 100, device="cuda")
    assert ulp <= 1 and rel <= 1e-12, (ulp, rel)
    for kw in (dict(), dict(iou_loss="mse", iou_thresh=0.2, objectness_smooth=1, truth_thresh=0.3)):
        base = dict(classes=5, num=9, mask=[3, 4, 5], anchors=ANCHORS + [142, 110, 192, 243, 459, 401],
                    iou_loss="ciou", iou_normalizer=0.07, scale_x_y=1.05)
        base.update(kw)
        p = YoloLossParams.from_layout_params(base)
        x = torch.randn(4, 30, 13, 13, generator=torch.Generator().manual_seed(3)) * 2
        ulp, rel = compare(x, _crowded(), p, 416, 416, device="cuda")
        assert ulp <= 1 and rel <= 1e-12, (ulp, rel)
