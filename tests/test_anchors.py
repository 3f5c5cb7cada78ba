"""`darknet-cfg anchors`: darknet's calc_anchors k-means, against a transcription of matrix.c."""
import os

import numpy as np
import pytest
from click.testing import CliRunner

import darknet_cfg
from darknet_cfg.anchors import format_anchors, kmeans_anchors, read_boxes_wh
from darknet_cfg.cli import main
from darknet_cfg.data import DataError
from darknet_cfg.graph import build_graph
from darknet_cfg.synth import make_synthetic

MINI = os.path.join(os.path.dirname(darknet_cfg.__file__), "cfg", "yolov4-tiny-mini.cfg")
if not os.path.isfile(MINI):
    MINI = os.path.join(os.path.dirname(__file__), "..", "cfg", "yolov4-tiny-mini.cfg")
f32 = np.float32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=40, classes=3, size=64, valid=2,
                          seed=5)


def darknet_kmeans(points, centers):
    """matrix.c do_kmeans (closest_center, kmeans_expectation, kmeans_maximization, dist) and
    calc_anchors' sort and avg IoU, one float32 scalar operation at a time."""
    pts = [[f32(a), f32(b)] for a, b in points]
    k = len(centers)
    cen = [[f32(a), f32(b)] for a, b in centers]

    def dist(x, y):
        mw = x[0] if x[0] < y[0] else y[0]
        mh = x[1] if x[1] < y[1] else y[1]
        inter = f32(mw * mh)
        un = f32(f32(f32(x[0] * x[1]) + f32(y[0] * y[1])) - inter)
        return f32(1) - f32(inter / un)

    def closest(x):
        best, best_d = 0, dist(x, cen[0])
        for j in range(k):
            d = dist(x, cen[j])
            if d < best_d:
                best, best_d = j, d
        return best

    assign = [0] * len(pts)

    def expectation():
        conv = True
        for i, x in enumerate(pts):
            c = closest(x)
            if c != assign[i]:
                conv = False
            assign[i] = c
        return conv

    def maximization():
        old = [list(c) for c in cen]
        counts = [0] * k
        for c in cen:
            c[0] = c[1] = f32(0)
        for i, x in enumerate(pts):
            counts[assign[i]] += 1
            for j in range(2):
                cen[assign[i]][j] = f32(cen[assign[i]][j] + x[j])
        for i in range(k):
            if counts[i]:
                for j in range(2):
                    cen[i][j] = f32(cen[i][j] / f32(counts[i]))
        for i in range(k):
            for j in range(2):
                if cen[i][j] == 0:
                    cen[i][j] = old[i][j]

    if k == 1:
        maximization()
    i = 0
    while i < 1000 and not expectation():
        maximization()
        i += 1
    cen.sort(key=lambda c: f32(c[0] * c[1]))
    avg = f32(0)
    for x in pts:
        best_iou, min_d = f32(0), np.finfo(np.float32).max
        for c in cen:
            mw = x[0] if x[0] < c[0] else c[0]
            mh = x[1] if x[1] < c[1] else c[1]
            inter = f32(mw * mh)
            iou = f32(inter / f32(f32(f32(x[0] * x[1]) + f32(c[0] * c[1])) - inter))
            if f32(1) - iou < min_d:
                min_d, best_iou = f32(1) - iou, iou
        if 0 <= best_iou <= 1:
            avg = f32(avg + best_iou)
    avg = f32(f32(100 * avg) / f32(len(pts)))
    return np.array(cen, np.float32), i, float(avg)


@pytest.mark.parametrize("k,seed", [(9, 0), (6, 1), (1, 0)])
def test_kmeans_matches_darknet_transcription(dataset, k, seed):
    wh, counts, n_images, _ = read_boxes_wh(dataset["data"], 416, 416)
    assert n_images == 40 and len(wh) == sum(counts) > 40
    init = wh[np.random.default_rng(seed).permutation(len(wh))[:k]]
    res = kmeans_anchors(wh, k, init=init)
    ref, iterations, avg = darknet_kmeans(wh, init)
    np.testing.assert_array_equal(res.anchors, ref)
    assert res.iterations == iterations and res.avg_iou == avg
    assert 0 < res.avg_iou < 100
    areas = res.anchors[:, 0] * res.anchors[:, 1]
    assert (np.diff(areas) >= 0).all()
    # the seed picks the initial centroids (darknet: srand(time(0)))
    np.testing.assert_array_equal(kmeans_anchors(wh, k, seed=seed).anchors, res.anchors)


def test_format_is_darknets():
    a = np.array([[10.4, 13.6], [116.5, 90.0]], np.float32)
    assert format_anchors(a, 416) == " 10, 14, 116, 90"
    assert format_anchors(a / 32, 13) == "0.3250,0.4250, 3.6406,2.8125"


def test_cli_prints_and_writes_cfg_with_masks_kept(dataset, tmp_path, monkeypatch):
    out = tmp_path / "new.cfg"
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["anchors", dataset["data"], "--num", "6", "--cfg", MINI,
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert os.path.isfile("anchors.txt") and os.path.isfile("counters_per_class.txt")
    saved = open("anchors.txt").read()
    assert "avg IoU = " in r.output and f"anchors = {saved}" in r.output
    assert "num_of_clusters = 6, width = 224, height = 224" in r.output
    old, new = build_graph(MINI), build_graph(str(out))
    for a, b in zip(old.layers, new.layers):
        assert a.out_shape == b.out_shape
        if a.type == "yolo":
            assert a.mask == b.mask and b.num == 6
            assert ", ".join(f"{v:3.0f}" for v in b.all_anchors).replace(" ", "") == \
                saved.replace(" ", "")


def test_errors(dataset, tmp_path):
    runner = CliRunner()
    # masks that need more anchors than --num
    r = runner.invoke(main, ["anchors", dataset["data"], "--num", "3", "--no-save", "--cfg", MINI,
                             "-o", str(tmp_path / "x.cfg")])
    assert r.exit_code == 1 and "mask=" in r.output and "--num is 3" in r.output
    assert not (tmp_path / "x.cfg").exists()
    r = runner.invoke(main, ["anchors", dataset["data"], "--no-save"])
    assert r.exit_code == 1 and "--width and --height" in r.output
    # a dataset without labels: the error names the list file
    d = make_synthetic(tmp_path / "nolabels", images=3, classes=2, size=32, valid=1, seed=0)
    for root, _, files in os.walk(tmp_path / "nolabels"):
        for f in files:
            if f.endswith(".txt") and f not in ("train.txt", "valid.txt"):
                os.remove(os.path.join(root, f))
    with pytest.raises(DataError, match=r"train\.txt: no labels to compute anchors from"):
        read_boxes_wh(d["data"], 416, 416)
    r = runner.invoke(main, ["anchors", d["data"], "--width", "416", "--height", "416",
                             "--no-save"])
    assert r.exit_code == 1 and "train.txt: no labels" in r.output
