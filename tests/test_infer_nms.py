"""The vectorised NMS of the detector pipeline equals postprocess.do_nms bit for bit."""
import numpy as np
import pytest

from conftest import needs_shared

from darknet_cfg.infer import nms_matrix
from darknet_cfg.postprocess import NMS_KINDS, Detections, do_nms
from test_postprocess import _detector_dirs, _run_oracle


@needs_shared
@pytest.mark.parametrize("model_dir", _detector_dirs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_nms_matrix_equals_do_nms_on_oracles(model_dir):
    heads, dets, after, ref, _ = _run_oracle(model_dir)
    last = heads[ref["nms_layer"]]
    np.testing.assert_array_equal(nms_matrix(dets, ref["nms"], last.nms_kind, last.beta_nms).probs,
                                  after.probs)


@pytest.mark.parametrize("seed", range(6))
def test_nms_matrix_random_clusters(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 5
    centres = rng.uniform(0.2, 0.8, (12, 2))
    xy = centres[rng.integers(0, 12, n)] + rng.normal(0, 0.02, (n, 2))
    boxes = np.concatenate([xy, rng.uniform(0.05, 0.3, (n, 2))], axis=1).astype(np.float32)
    probs = np.where(rng.random((n, c)) < 0.4, rng.choice([0.3, 0.5, 0.7], (n, c)), 0).astype(np.float32)
    obj = np.where(rng.random(n) < 0.1, 0, 1).astype(np.float32)  # some objectness 0 boxes
    z = np.zeros(n, np.int64)
    dets = Detections(boxes, obj, probs, z, z, z, z, z)
    for kind in NMS_KINDS:
        for th in (0.3, 0.45, 0.6):
            want = do_nms(dets, th, kind, 0.8).probs
            np.testing.assert_array_equal(nms_matrix(dets, th, kind, 0.8).probs, want)
            np.testing.assert_array_equal(nms_matrix(dets, th, kind, 0.8, max_boxes=10).probs, want)


def test_paired_diou_equals_outer_entries():
    """nms_matrix computes DIoU only for pairs whose IoU passes: the paired form must give the
    outer matrix's values bit for bit, and DIoU never exceeds IoU (so the filter is exact)."""
    from darknet_cfg.postprocess import _diou_matrix, box_iou_matrix
    rng = np.random.default_rng(1)
    b = np.concatenate([rng.random((200, 2)), rng.random((200, 2)) * 0.3], 1).astype(np.float32)
    b[:5, 2:] = 0                                   # zero-size boxes: c == 0 for some pairs
    for e in (0.6, 0.8, 1.0):
        full = _diou_matrix(b, b, e)
        i, j = np.nonzero(np.ones_like(full, bool))
        np.testing.assert_array_equal(_diou_matrix(b[i], b[j], e, outer=False), full[i, j])
        iou = box_iou_matrix(b, b)
        assert not np.any(full > iou)


def _darknet_nms_literal(dets, thresh):
    """do_nms_sort written out as Darknet runs it: the objectness-0 swap loop, then per class
    an in-place stable sort of the whole array (glibc's qsort is a merge sort) and the greedy
    pass. Returns (probs after NMS, final array order)."""
    from darknet_cfg.postprocess import box_iou_matrix
    iou = box_iou_matrix(dets.boxes, dets.boxes)  # box_iou(a, b) of every pair
    arr = list(range(len(dets)))
    probs = dets.probs.copy()
    k = len(arr) - 1
    i = 0
    while i <= k:
        if dets.objectness[arr[i]] == 0:
            arr[i], arr[k] = arr[k], arr[i]
            k -= 1
            i -= 1
        i += 1
    total = k + 1
    for c in range(probs.shape[1]):
        head = sorted(arr[:total], key=lambda b: -dets.probs[b, c])  # pre-NMS prob[c]: unchanged
        arr[:total] = head
        for a in range(total):
            if probs[arr[a], c] == 0:
                continue
            for b in range(a + 1, total):
                if iou[arr[a], arr[b]] > np.float32(thresh):
                    probs[arr[b], c] = 0
    return probs, arr


@pytest.mark.parametrize("seed", range(4))
def test_ties_and_final_order_as_darknets_in_place_sorts(seed):
    """Equal probabilities are common here (3 values): which of two tied overlapping boxes
    survives follows the order the previous classes' sorts left, as in Darknet."""
    from darknet_cfg.postprocess import box_iou_matrix, darknet_order
    rng = np.random.default_rng(seed)
    n, c = 60, 4
    xy = rng.uniform(0.3, 0.7, (n, 2))
    boxes = np.concatenate([xy, rng.uniform(0.2, 0.4, (n, 2))], axis=1).astype(np.float32)
    probs = np.where(rng.random((n, c)) < 0.5, rng.choice([0.3, 0.5, 0.7], (n, c)), 0).astype(np.float32)
    obj = np.where(rng.random(n) < 0.15, 0, 1).astype(np.float32)
    z = np.zeros(n, np.int64)
    dets = Detections(boxes, obj, probs, z, z, z, z, z)
    want, order = _darknet_nms_literal(dets, 0.45)
    np.testing.assert_array_equal(do_nms(dets, 0.45).probs, want)
    np.testing.assert_array_equal(nms_matrix(dets, 0.45).probs, want)
    got = darknet_order(dets)
    total = int((obj != 0).sum())
    assert list(got[:total]) == order[:total]
    assert sorted(got[total:]) == sorted(order[total:])
    # the old rule (ties in input order) differs on these inputs: the test can tell them apart
    if seed == 0:
        iou = box_iou_matrix(boxes, boxes)
        alt = probs.copy()
        for k in range(c):
            cand = [b for b in np.argsort(-probs[:, k], kind="stable") if probs[b, k] and obj[b]]
            for a_i, a in enumerate(cand):
                if alt[a, k] == 0:
                    continue
                for b in cand[a_i + 1:]:
                    if iou[a, b] > np.float32(0.45):
                        alt[b, k] = 0
        assert not np.array_equal(alt, want)



def _orders_by_sequential_sorts(dets):
    """The definition: one stable sort per class (prob descending, zeros last) of the array the
    previous class left."""
    from darknet_cfg.postprocess import _active_order
    order = _active_order(dets.objectness)
    per_class = {}
    for k in range(dets.probs.shape[1]):
        col = dets.probs[order, k]
        nz = np.flatnonzero(col != 0)
        lead = order[nz[np.argsort(-col[nz], kind="stable")]]
        order = np.concatenate([lead, order[col == 0]])
        per_class[k] = lead
    return order, per_class


@pytest.mark.parametrize("seed", range(8))
def test_nms_orders_equal_sequential_sorts(seed):
    """nms_orders' single lexsort (and per-class tie handling) equals the chain of stable sorts,
    with ties, NaN probabilities, objectness-0 boxes and classes without boxes."""
    from darknet_cfg.postprocess import nms_orders
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(0, 90)), int(rng.integers(1, 40))
    values = rng.choice([0.3, 0.5, 0.7, 0.9], (n, c)) if seed % 2 else rng.random((n, c))
    probs = np.where(rng.random((n, c)) < 0.3, values, 0).astype(np.float32)
    probs[rng.random((n, c)) < 0.02] = np.nan
    obj = np.where(rng.random(n) < 0.15, 0, 1).astype(np.float32)
    z = np.zeros(n, np.int64)
    dets = Detections(np.zeros((n, 4), np.float32), obj, probs, z, z, z, z, z)
    want_final, want = _orders_by_sequential_sorts(dets)
    final, per_class = nms_orders(dets)
    np.testing.assert_array_equal(final, want_final)
    assert per_class.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(per_class[k], want[k], err_msg=f"class {k}")
    some = sorted(rng.choice(c, size=min(c, 3), replace=False).tolist())
    _, part = nms_orders(dets, some)
    assert sorted(part) == some and all(np.array_equal(part[k], want[k]) for k in some)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["default", "diounms"])
def test_nms_sparse_lockstep_equals_do_nms(seed, kind):
    """The sparse path (many candidates per class, e.g. map's thresh 0.005) equals do_nms."""
    rng = np.random.default_rng(100 + seed)
    n, c = int(rng.integers(50, 400)), int(rng.integers(1, 12))
    centres = rng.uniform(0.2, 0.8, (int(rng.integers(3, 30)), 2))
    xy = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.03, (n, 2))
    boxes = np.concatenate([xy, rng.uniform(0.02, 0.3, (n, 2))], axis=1).astype(np.float32)
    values = rng.choice([0.3, 0.5, 0.7], (n, c)) if seed % 2 else rng.random((n, c))
    probs = np.where(rng.random((n, c)) < 0.5, values, 0).astype(np.float32)
    obj = np.where(rng.random(n) < 0.1, 0, 1).astype(np.float32)
    z = np.zeros(n, np.int64)
    dets = Detections(boxes, obj, probs, z, z, z, z, z)
    want = do_nms(dets, 0.45, kind, 0.6).probs
    np.testing.assert_array_equal(nms_matrix(dets, 0.45, kind, 0.6, dense_limit=0).probs, want)
    np.testing.assert_array_equal(nms_matrix(dets, 0.45, kind, 0.6).probs, want)


@needs_shared
@pytest.mark.parametrize("model_dir", _detector_dirs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_nms_sparse_equals_do_nms_on_oracles(model_dir):
    heads, dets, after, ref, _ = _run_oracle(model_dir)
    last = heads[ref["nms_layer"]]
    got = nms_matrix(dets, ref["nms"], last.nms_kind, last.beta_nms, dense_limit=0)
    np.testing.assert_array_equal(got.probs, after.probs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["default", "greedynms", "diounms"])
def test_native_nms_equals_numpy_and_do_nms(seed, kind, monkeypatch):
    """layers/_nms.c (IoU flags and greedy passes for many boxes) gives do_nms's result, as the
    numpy paths do; boxes with ties, zero sizes, duplicates; a NaN box keeps numpy's path."""
    from darknet_cfg import infer
    if infer._NMS is None:
        pytest.skip("layers/_nms.c not built here")
    rng = np.random.default_rng(200 + seed)
    n, c = int(rng.integers(260, 500)), int(rng.integers(1, 8))
    centres = rng.uniform(0.1, 0.9, (int(rng.integers(5, 40)), 2))
    xy = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.02, (n, 2))
    wh = np.where(rng.random((n, 2)) < 0.03, 0, rng.uniform(0.02, 0.3, (n, 2)))
    boxes = np.concatenate([xy, wh], axis=1).astype(np.float32)
    boxes[1] = boxes[0]
    values = rng.choice([0.3, 0.5, 0.7], (n, c)) if seed % 2 else rng.random((n, c))
    probs = np.where(rng.random((n, c)) < 0.6, values, 0).astype(np.float32)
    obj = np.where(rng.random(n) < 0.05, 0, 1).astype(np.float32)
    z = np.zeros(n, np.int64)
    dets = Detections(boxes, obj, probs, z, z, z, z, z)
    want = do_nms(dets, 0.45, kind, 0.6).probs
    for limit in (0, 1 << 22):  # sparse greedy pass and dense table
        got = nms_matrix(dets, 0.45, kind, 0.6, dense_limit=limit)
        np.testing.assert_array_equal(got.probs, want)
    monkeypatch.setattr(infer, "_NMS", None)
    np.testing.assert_array_equal(nms_matrix(dets, 0.45, kind, 0.6, dense_limit=0).probs, want)
    monkeypatch.undo()
    boxes[5, 0] = np.nan
    want = do_nms(dets, 0.45, kind, 0.6).probs
    np.testing.assert_array_equal(nms_matrix(dets, 0.45, kind, 0.6, dense_limit=0).probs, want)
