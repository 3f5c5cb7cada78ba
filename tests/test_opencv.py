"""Cross-check against OpenCV DNN (cv2.dnn.readNetFromDarknet, opencv-python-headless 4.x).

Where OpenCV differs from Darknet (and from us), checked below:
* batch-norm eps: OpenCV's importer uses 1e-6, Darknet 1e-5. Given weights with
  ``rolling_variance += 9e-6`` it computes Darknet's numbers; without, heads move by ~1e-3.
* letter_box: OpenCV ignores ``[net] letter_box`` (``blobFromImage`` is a plain cv2 resize, not
  Darknet's bilinear); we feed both the same Darknet-made tensor.
* yolo outputs are decoded in-layer (rows ``x, y, w, h, obj, obj*cls`` in Darknet's box order,
  relative to the network input) and class scores <= 0.2 are set to 0.
* [region] (YOLOv2): objectness is ``sigmoid(t_o)`` (Darknet's boxes have 1) and OpenCV runs
  its own NMS inside the layer, so most class scores are 0.
Models: yolov4-tiny, yolov3-tiny, yolov4-csp (letter_box=1, new_coords=1) at the oracle sizes.
"""
import numpy as np
import pytest
import torch

from conftest import ORACLE, needs_shared

import darknet_cfg
from darknet_cfg.export import DecodedModel
from test_infer_parity import load_oracle_model

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
    pytest.skip(f"OpenCV {cv2.__version__} has no readNetFromDarknet (removed in 5.x; "
                "pip install 'opencv-python-headless<5')", allow_module_level=True)

OPENCV_SCORE_THRESH = 0.2


def _opencv_net(name, model, meta, tmp_path, eps_compensation=True):
    """OpenCV net for the oracle cfg at its run size, with our weights (BN variance + 9e-6)."""
    text = (ORACLE / "models" / name / "model.cfg").read_text()
    cfg = tmp_path / "cv.cfg"  # OpenCV has no size override: put it first in [net]
    cfg.write_text(text.replace("[net]", f"[net]\nwidth={meta['width']}\nheight={meta['height']}", 1))
    weights = tmp_path / "cv.weights"
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    delta = 9e-6 if eps_compensation else 0.0
    with torch.no_grad():
        for bn in bns:
            bn.running_var += delta
        darknet_cfg.save_weights(model, weights)
        for bn in bns:
            bn.running_var -= delta
    return cv2.dnn.readNetFromDarknet(str(cfg), str(weights))


def _compare(name, tmp_path, eps_compensation=True):
    model, meta = load_oracle_model(name, tmp_path)
    net = _opencv_net(name, model, meta, tmp_path, eps_compensation)
    x = np.load(ORACLE / "models" / name / "input.npy")[None]
    net.setInput(x)
    cv = np.concatenate(net.forward(net.getUnconnectedOutLayersNames()))
    with torch.inference_mode():
        boxes, obj, scores = (t[0].numpy() for t in DecodedModel(model)(torch.from_numpy(x)))
    return cv, boxes, obj, scores


@needs_shared
@pytest.mark.parametrize("name", ["yolov4-tiny", "yolov3-tiny", "yolov4-csp"])
def test_opencv_yolo_outputs_match(name, tmp_path):
    cv, boxes, obj, scores = _compare(name, tmp_path)
    assert cv.shape == (len(boxes), 5 + scores.shape[1])
    np.testing.assert_allclose(cv[:, :2], boxes[:, :2], atol=1e-5)
    np.testing.assert_allclose(cv[:, 2:4], boxes[:, 2:4], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cv[:, 4], obj, atol=1e-4)
    cvs = cv[:, 5:]
    clear_above = scores > OPENCV_SCORE_THRESH + 1e-4
    clear_below = scores < OPENCV_SCORE_THRESH - 1e-4
    assert np.all(cvs[clear_above] > 0) and np.all(cvs[clear_below] == 0)
    np.testing.assert_allclose(cvs[clear_above], scores[clear_above], atol=1e-4)


@needs_shared
def test_opencv_bn_eps_differs(tmp_path):
    """Without the variance compensation OpenCV's eps 1e-6 moves yolov4-tiny's boxes ~10x more."""
    cv, boxes, obj, _ = _compare("yolov4-tiny", tmp_path, eps_compensation=False)
    raw = np.abs(cv[:, 4] - obj).max()
    cv_c, _, obj_c, _ = _compare("yolov4-tiny", tmp_path, eps_compensation=True)
    assert raw > 10 * np.abs(cv_c[:, 4] - obj_c).max() and raw > 1e-5


@needs_shared
def test_opencv_region_layer_differences(tmp_path):
    """[region] (yolov2-tiny): same boxes; objectness sigmoid(t_o); in-layer NMS keeps few scores."""
    cv, boxes, obj, scores = _compare("yolov2-tiny", tmp_path)
    np.testing.assert_allclose(cv[:, :2], boxes[:, :2], atol=1e-5)
    np.testing.assert_allclose(cv[:, 2:4], boxes[:, 2:4], rtol=1e-4, atol=1e-6)
    assert np.all(obj == 1) and np.all(cv[:, 4] < 1)  # darknet: 1; OpenCV: sigmoid(t_o)
    kept = cv[:, 5:] > 0
    assert 0 < kept.sum() < (scores > OPENCV_SCORE_THRESH).sum()
    np.testing.assert_allclose(cv[:, 5:][kept], scores[kept], atol=1e-4)
