"""Test-time augmentation (tta.py): sizes, and the merged result equals the union of plain
Darknet pipelines run at each pass's size (flipped where the recipe flips), then one NMS."""
import os

import numpy as np
import torch
from click.testing import CliRunner

import darknet_cfg
from darknet_cfg.evaluate import predict
from darknet_cfg.infer import Detector, nms_matrix
from darknet_cfg.synth import make_synthetic
from darknet_cfg.tta import TTA_PASSES, largest_stride, merge_detections, tta_sizes

MINI = os.path.join(os.path.dirname(darknet_cfg.__file__), "cfg", "yolov4-tiny-mini.cfg")
if not os.path.isfile(MINI):
    MINI = os.path.join(os.path.dirname(__file__), "..", "cfg", "yolov4-tiny-mini.cfg")


def _model(w=None, h=None, seed=0):
    torch.manual_seed(seed)
    return darknet_cfg.load(MINI, width=w, height=h)   # random weights: many boxes


def test_sizes_round_to_the_largest_stride():
    assert TTA_PASSES == ((1.0, False), (0.83, True), (0.67, False))
    m = darknet_cfg.build_model(MINI, 416, 416)
    assert largest_stride(m) == 32
    # 0.83*416 = 345.3 -> 352, 0.67*416 = 278.7 -> 288
    assert tta_sizes(m) == [(416, 416, False), (352, 352, True), (288, 288, False)]
    m = darknet_cfg.build_model(MINI, 320, 96)
    assert tta_sizes(m) == [(320, 96, False), (256, 64, True), (224, 64, False)]  # 79.7 -> 64


def test_tta_is_the_union_of_the_passes():
    rng = np.random.default_rng(0)
    ims = [rng.random((3, 150, 220), dtype=np.float32), rng.random((3, 200, 120), dtype=np.float32)]
    kw = dict(thresh=0.01, prepack=False, channels_last=False)
    det = Detector(_model(), tta=True, **kw)
    got = det.detect(ims)
    state = det.model.state_dict()
    for k, im in enumerate(ims):
        parts = []
        for w, h, flip in tta_sizes(det.model):
            m = darknet_cfg.load(MINI, width=w, height=h)
            m.load_state_dict(state)
            x = np.ascontiguousarray(im[:, :, ::-1]) if flip else im
            d = Detector(m, nms=0, **kw).detect(x)[0]
            if flip:
                d.boxes[:, 0] = 1 - d.boxes[:, 0]
            parts.append(d)
        assert all(len(p) for p in parts)
        ref = nms_matrix(merge_detections(parts), 0.45, kind=det.nms_kind, beta_nms=det.beta_nms)
        assert len(got[k]) == sum(len(p) for p in parts)
        np.testing.assert_allclose(got[k].boxes, ref.boxes, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[k].probs, ref.probs, rtol=1e-5, atol=1e-6)


def test_map_path_and_detector_agree(tmp_path):
    d = make_synthetic(tmp_path / "s", images=2, classes=3, size=64, valid=3, seed=2)
    paths = [l.strip() for l in open(os.path.join(tmp_path, "s", "valid.txt")) if l.strip()]
    paths = [p if os.path.isabs(p) else os.path.join(tmp_path, "s", p) for p in paths]
    m = _model(64, 64)
    a = predict(m, paths, tta=True)
    b = Detector(m, thresh=0.005, tta=True, prepack=False, channels_last=False).detect(paths)
    for x, y in zip(a, b):   # the same boxes (predict keeps them in Darknet's array order)
        rows = [np.concatenate([d.boxes, d.probs], 1) for d in (x, y)]
        rows = [r[np.lexsort(r.T[::-1])] for r in rows]
        np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5, atol=1e-6)
    assert sum(len(x) for x in a) > sum(len(x) for x in predict(m, paths))
    assert d["data"]


def test_cli_detect_and_map_tta(tmp_path):
    from darknet_cfg.cli import main
    d = make_synthetic(tmp_path / "s", images=2, classes=3, size=64, valid=2, seed=2)
    cfg = tmp_path / "mini.cfg"
    text = open(MINI).read().replace("width=224", "width=64")
    cfg.write_text(text.replace("height=224", "height=64"))
    m = darknet_cfg.load(str(cfg))
    w = str(tmp_path / "m.weights")
    darknet_cfg.save_weights(m, w)
    img = next(p for p in sorted(os.listdir(tmp_path / "s" / "obj")) if p.endswith(".jpg"))
    r = CliRunner().invoke(main, ["detect", str(cfg), w, str(tmp_path / "s" / "obj" / img),
                                  "--tta", "--thresh", "0.9"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["map", d["data"], str(cfg), w, "--tta", "--no-coco"])
    assert r.exit_code == 0, r.output
    assert "mean average precision" in r.output
