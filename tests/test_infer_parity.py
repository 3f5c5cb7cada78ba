"""End-to-end detector parity: dog.png -> Detector (unfused, then fused) == detections.json."""
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import IMAGES, ORACLE, model_names, needs_shared, oracle_io
from test_postprocess import _probs_dense

import darknet_cfg
from darknet_cfg.infer import Detector
from darknet_cfg.layers.activations import COMPILABLE

SKIP = {"cspx-p7-mish": "darknet read anchors past its list for layer 374 (oracle README)"}
BIG_BYTES = 100_000_000  # weights files above this are marked slow (still run in CI)


def _detectors():
    params = []
    for name in model_names():
        meta = json.loads((ORACLE / "models" / name / "meta.json").read_text())
        if meta["kind"] != "detector":
            continue
        marks = [pytest.mark.slow] if meta["weights_file_bytes"] > BIG_BYTES else []
        if name in SKIP:
            marks.append(pytest.mark.skip(reason=SKIP[name]))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def load_oracle_model(name, tmp_path):
    """The oracle's model with its regenerated synthetic weights, at the oracle's run size."""
    oio = oracle_io()
    m = oio.load_model(name)
    weights = tmp_path / f"{name}.weights"
    weights.write_bytes(oio.weights_bytes(m.layout, m.meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", darknet_cfg.CfgWarning)  # unused keys of upstream cfgs
        model = darknet_cfg.load(ORACLE / "models" / name / "model.cfg", weights,
                                 width=m.meta["width"], height=m.meta["height"])
    weights.unlink()
    return model, m.meta


def assert_same_detections(dets, after, ref):
    """Same boxes by provenance and order, same class sets before/after NMS, values to 1e-4."""
    boxes = ref["boxes"]
    mine = list(zip(dets.layer.tolist(), dets.anchor.tolist(), dets.row.tolist(), dets.col.tolist()))
    theirs = [(b["layer"], b["anchor"], b["row"], b["col"]) for b in boxes]
    assert mine == theirs, f"{len(set(mine) ^ set(theirs))} boxes differ by provenance"
    np.testing.assert_allclose(dets.objectness, [b["objectness"] for b in boxes], rtol=0, atol=1e-4)
    for key, got in (("probs_pre_nms", dets.probs), ("probs", after.probs)):
        want = _probs_dense(boxes, key, dets.classes)
        bad = np.flatnonzero(((got != 0) != (want != 0)).any(axis=1))
        assert bad.size == 0, f"{key}: class sets differ for boxes {[theirs[i] for i in bad[:5]]}"
        assert np.abs(got - want).max(initial=0) <= 1e-4
    assert int((after.probs != 0).any(axis=1).sum()) == ref["n_with_class_after_nms"]
    want_bbox = np.array([b["bbox"] for b in boxes], np.float64).reshape(-1, 4)
    np.testing.assert_allclose(dets.boxes[:, :2], want_bbox[:, :2], rtol=1e-4, atol=1e-6)
    # w, h: 1e-4 relative, or 5e-5 of the image size (0.04 px at 768) for thin boxes: with
    # new_coords w ~ tw^2, so the ~2e-5 float32 noise of a deep net's head output gives up to
    # 2e-4 relative on boxes with a small tw (yolov4-csp-swish); darknet vs OpenCV differ alike.
    np.testing.assert_allclose(dets.boxes[:, 2:], want_bbox[:, 2:], rtol=1e-4, atol=5e-5)


def _assert_outputs_close(name, out):
    """Head tensors vs outputs.npz: 1e-4 * max(1, |x|) (the oracle README's tolerance)."""
    layout = json.loads((ORACLE / "models" / name / "layout.json").read_text())
    with np.load(ORACLE / "models" / name / "outputs.npz") as z:
        for key in z.files:
            want = z[key]
            if layout["layers"][int(key)]["type"] == "region":
                want = oracle_io().region_output_to_chw(want)
            got = out[int(key)]
            assert np.all(np.abs(got - want) <= 1e-4 * np.maximum(1, np.abs(want))), \
                f"layer {key}: max abs diff {np.abs(got - want).max():.2e}"


@needs_shared
@pytest.mark.parametrize("name", _detectors())
def test_detector_end_to_end_matches_darknet(name, tmp_path):
    model, meta = load_oracle_model(name, tmp_path)
    ref = json.loads((ORACLE / "models" / name / "detections.json").read_text())
    det = Detector(model, thresh=ref["thresh"], nms=ref["nms"])
    assert det.letter_box == bool(ref["letter_box"])
    assert det.nms_kind == ref["nms_kind"] and max(det.heads) == ref["nms_layer"]

    # the network input is the oracle's, bit for bit
    x, size = det.prepare(IMAGES / "dog.png")
    assert size == (ref["image_w"], ref["image_h"])
    np.testing.assert_array_equal(x, np.load(ORACLE / "models" / name / "input.npy"))

    # Detector runs channels_last on CPU; then BN folded; then mish etc. compiled
    assert det.memory_format == torch.channels_last
    for step in ("eager", "fused", "compiled"):
        if step == "fused":
            model.fuse()
        if step == "compiled":
            if not any(getattr(m, "name", "") in COMPILABLE for m in model.modules()):
                continue
            model.compile_activations()
        out = det.forward(x[None])[0]
        _assert_outputs_close(name, out)
        dets = det.decode(out, size)
        after = det.suppress(dets)
        assert_same_detections(dets, after, ref)
    # detect() is the same steps
    np.testing.assert_array_equal(det.detect(IMAGES / "dog.png")[0].probs, after.probs)


@needs_shared
def test_batch_equals_single(tmp_path):
    """A batch of different images gives each image's own boxes (letterboxed model)."""
    model, _ = load_oracle_model("yolov4-csp-s-mish", tmp_path)
    det = Detector(model.fuse())
    paths = [IMAGES / f"{n}.png" for n in ("dog", "person")]
    batched = det.detect(paths)
    for p, b in zip(paths, batched):
        single = det.detect(p)[0]
        assert single.layer.tolist() == b.layer.tolist() and single.row.tolist() == b.row.tolist()
        np.testing.assert_allclose(single.boxes, b.boxes, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(single.probs, b.probs, atol=1e-5)


@needs_shared
@pytest.mark.parametrize("name", [p.values[0] for p in _detectors()] + ["cspx-p7-mish"])
def test_head_params_from_spec_equal_layout(name):
    """HeadParams.from_spec (our parsed cfg) == from_layout_layer (what darknet parsed)."""
    from darknet_cfg.postprocess import HeadParams
    d = ORACLE / "models" / name
    layout = json.loads((d / "layout.json").read_text())
    meta = json.loads((d / "meta.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = darknet_cfg.build_graph(d / "model.cfg", meta["width"], meta["height"])
    specs = [s for s in graph.layers if s.type in ("yolo", "Gaussian_yolo", "region")]
    assert specs
    for spec in specs:
        mine = HeadParams.from_spec(spec)
        theirs = HeadParams.from_layout_layer(layout["layers"][spec.index])
        f32 = lambda v: float(np.float32(v))  # layout.json prints floats with 9 digits
        theirs = dataclasses.replace(theirs, scale_x_y=f32(theirs.scale_x_y),
                                     beta_nms=f32(theirs.beta_nms),
                                     anchors=[f32(a) for a in theirs.anchors])
        if max(getattr(spec, "mask", (0,))) >= spec.num:  # cspx-p7-mish layer 374: listed anchors past num
            assert (name, spec.index) == ("cspx-p7-mish", 374)
            assert mine.num == max(spec.mask) + 1 and mine.anchors[:2 * spec.num] == theirs.anchors
            continue
        assert mine == theirs
