"""darknet detector map statistics (validate_detector_map) on hand-made detections."""
import numpy as np
import pytest

from darknet_cfg.evaluate import compute_map, format_report
from darknet_cfg.postprocess import Detections


def _dets(rows, classes):
    """rows: (x, y, w, h, class, prob)"""
    n = len(rows)
    probs = np.zeros((n, classes), np.float32)
    boxes = np.zeros((n, 4), np.float32)
    for i, (x, y, w, h, c, p) in enumerate(rows):
        boxes[i] = (x, y, w, h)
        probs[i, c] = p
    z = np.zeros(n, np.int64)
    return Detections(boxes, np.ones(n, np.float32), probs, z, z, z, z, z)


def test_perfect_detections_give_ap_1():
    truths = [np.array([[0, .3, .3, .2, .2], [1, .7, .7, .2, .2]], np.float32)]
    dets = [_dets([(.3, .3, .2, .2, 0, .9), (.7, .7, .2, .2, 1, .8)], 2)]
    for points in (0, 11, 101):
        r = compute_map(dets, truths, 2, points=points)
        assert r["map"] == pytest.approx(1.0)
    assert r["tp"] == 2 and r["fp"] == 0 and r["fn"] == 0
    assert r["precision"] == 1 and r["recall"] == 1 and r["f1"] == 1


def test_voc_area_and_recall_points():
    # class 0: truths A, B. ranked detections: FP (0.9), A (0.8), dup of A (0.7), B (0.6)
    truths = [np.array([[0, .2, .2, .2, .2], [0, .7, .7, .2, .2]], np.float32)]
    dets = [_dets([(.5, .2, .1, .1, 0, .9), (.2, .2, .2, .2, 0, .8), (.21, .2, .2, .2, 0, .7),
                   (.7, .7, .2, .2, 0, .6)], 1)]
    # precision/recall by rank: (0, 0), (1/2, 1/2), (1/3, 1/2), (2/4, 1)
    r = compute_map(dets, truths, 1, points=0)
    # area: recall 0->0.5 at max precision 1/2 (from rank 2 and later), 0.5->1 at 1/2
    assert r["map"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    r11 = compute_map(dets, truths, 1, points=11)
    assert r11["map"] == pytest.approx(11 * 0.5 / 11)
    # thresh 0.25 statistics: the duplicate is a false positive
    assert (r["tp"], r["fp"], r["fn"]) == (2, 2, 0)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(1.0)
    assert r["avg_iou"] > 0
    text = format_report(r, ["shape"])
    assert "class_id = 0, name = shape, ap = 50.00%" in text
    assert "mean average precision (mAP@0.50) = 0.500000" in text


def test_class_must_match_and_iou_threshold():
    truths = [np.array([[0, .5, .5, .4, .4]], np.float32)]
    wrong_class = [_dets([(.5, .5, .4, .4, 1, .9)], 2)]
    r = compute_map(wrong_class, truths, 2)
    assert r["ap"] == [0.0, 0.0] and r["fp"] == 1
    shifted = [_dets([(.6, .5, .4, .4, 0, .9)], 2)]          # IoU = 0.6
    assert compute_map(shifted, truths, 2, iou_thresh=0.5)["ap"][0] == pytest.approx(1.0)
    assert compute_map(shifted, truths, 2, iou_thresh=0.75)["ap"][0] == 0.0


def test_no_detections():
    truths = [np.array([[0, .5, .5, .4, .4]], np.float32)]
    r = compute_map([_dets([], 1)], truths, 1)
    assert r["map"] == 0.0 and r["tp"] == 0 and r["fn"] == 1


def test_coco_map_through_pycocotools():
    pytest.importorskip("pycocotools")
    from darknet_cfg.evaluate import coco_map
    truths = [np.array([[0, .3, .3, .2, .2], [1, .7, .7, .2, .2]], np.float32)]
    perfect = [_dets([(.3, .3, .2, .2, 0, .9), (.7, .7, .2, .2, 1, .8)], 2)]
    r = coco_map(perfect, truths, [(100, 100)], 2)
    assert r["ap"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0)
    # a box shifted to IoU ~0.67 counts at 0.5 but not at 0.75
    shifted = [_dets([(.34, .3, .2, .2, 0, .9), (.7, .7, .2, .2, 1, .8)], 2)]
    r = coco_map(shifted, truths, [(100, 100)], 2)
    assert r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(0.5) and r["ap"] < 1.0
