"""ONNX export (torch.export-based exporter) checked with onnxruntime against the PyTorch model."""
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import IMAGES, ORACLE, model_names, needs_shared

import darknet_cfg

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.onnx

from darknet_cfg.export import DecodedModel, export_onnx  # noqa: E402
from darknet_cfg.infer import Detector  # noqa: E402
from test_infer_parity import BIG_BYTES, load_oracle_model  # noqa: E402


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _models():
    params = []
    for name in model_names():
        meta = json.loads((ORACLE / "models" / name / "meta.json").read_text())
        marks = [pytest.mark.slow] if meta["weights_file_bytes"] > BIG_BYTES else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@needs_shared
@pytest.mark.parametrize("name", _models())
def test_export_matches_torch(name, tmp_path):
    """Raw outputs of the fused model, exported, equal PyTorch's to 1e-4 on the oracle input."""
    model, _ = load_oracle_model(name, tmp_path)
    model.fuse()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = export_onnx(model, path)
    assert not caught, [str(w.message) for w in caught]
    x = np.load(ORACLE / "models" / name / "input.npy")[None]
    with torch.inference_mode():
        want = [o.numpy() for o in model(torch.from_numpy(x))]
    got = _session(path).run(names, {"input": x})
    for i, g, w in zip(model.output_indices, got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= 1e-4, f"layer {i}: max abs diff {np.abs(g - w).max():.2e}"


@needs_shared
def test_dynamic_batch_and_decode_match_darknet_boxes(tmp_path):
    """--decode --dynamic-batch on yolov4-tiny: batch of 2, boxes/scores equal get_network_boxes'."""
    model, meta = load_oracle_model("yolov4-tiny", tmp_path)
    model.fuse()
    path = tmp_path / "d.onnx"
    export_onnx(model, path, dynamic_batch=True, decode=True)
    det = Detector(model)
    xs, sizes = zip(*[det.prepare(IMAGES / f"{n}.png") for n in ("dog", "person")])
    boxes, obj, scores = _session(path).run(None, {"input": np.stack(xs)})
    with torch.inference_mode():
        tb, to, ts = DecodedModel(model)(torch.from_numpy(np.stack(xs)))
    np.testing.assert_allclose(boxes, tb.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(obj, to.numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, ts.numpy(), atol=1e-4)
    outs = det.forward(np.stack(xs))
    for n in range(2):
        dets = det.decode(outs[n], sizes[n])  # letter_box=0: relative to net == to image
        keep = obj[n] > 0.25
        assert keep.sum() == len(dets)
        np.testing.assert_allclose(boxes[n][keep], dets.boxes, rtol=1e-4, atol=1e-5)
        p = np.where(scores[n][keep] > 0.25, scores[n][keep], 0)
        np.testing.assert_allclose(p, dets.probs, atol=1e-4)


@needs_shared
@pytest.mark.parametrize("name", ["yolov2-tiny", "yolov4-csp-s-mish"])
def test_decode_region_and_new_coords(name, tmp_path):
    """In-graph decoding of [region] (yolov2-tiny) and new_coords=1 (csp) heads equals torch's."""
    model, _ = load_oracle_model(name, tmp_path)
    model.fuse()
    path = tmp_path / "d.onnx"
    export_onnx(model, path, decode=True)
    x = np.load(ORACLE / "models" / name / "input.npy")[None]
    got = _session(path).run(None, {"input": x})
    with torch.inference_mode():
        want = [t.numpy() for t in DecodedModel(model)(torch.from_numpy(x))]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    # the torch decoding equals get_network_boxes (before letterbox correction)
    det = Detector(model, letter_box=False)
    dets = det.decode(det.forward(x)[0], (model.width, model.height))
    boxes, obj, scores = want
    keep = np.ones(boxes.shape[1], bool) if name == "yolov2-tiny" else obj[0] > 0.25
    np.testing.assert_allclose(boxes[0][keep], dets.boxes, rtol=1e-4, atol=1e-5)


def test_cli_export(tmp_path):
    from click.testing import CliRunner
    from darknet_cfg.cli import main
    from test_infer_cli import TINY_CFG
    cfg = tmp_path / "t.cfg"
    cfg.write_text(TINY_CFG)
    weights = tmp_path / "t.weights"
    darknet_cfg.save_weights(darknet_cfg.build_model(cfg), weights)
    out = tmp_path / "t.onnx"
    r = CliRunner().invoke(main, ["export", str(cfg), str(weights), "-o", str(out), "--width", "96",
                                  "--height", "96", "--opset", "17", "--dynamic-batch"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out}") and "warning" not in r.output.lower()
    import onnx
    m = onnx.load(str(out))
    assert m.opset_import[0].version == 17
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 96, 96]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unreachable_opset_is_an_error(tmp_path):
    """torch.export's exporter writes opset 18; down-conversion of Pad (max-pool) fails: say so."""
    from darknet_cfg import DarknetError
    from test_infer_cli import TINY_CFG
    cfg = tmp_path / "p.cfg"
    cfg.write_text(TINY_CFG.replace("[convolutional]\nfilters=21",
                                    "[maxpool]\nsize=2\nstride=1\n\n[convolutional]\nfilters=21"))
    model = darknet_cfg.build_model(cfg).eval()
    out = tmp_path / "p.onnx"
    with pytest.raises(DarknetError, match="opset 11 is not reachable"):
        export_onnx(model, out, opset=11)
    assert list(tmp_path.iterdir()) == [cfg]
