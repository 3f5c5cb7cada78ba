"""Our model run by other engines, with Darknet's post-processing: ONNX Runtime and OpenCV DNN.

Every engine answers ``run(paths)`` with, per image, the objects Darknet's ``-out`` JSON would
hold (``{class_id, x, y, w, h, prob}``, relative to the image, rounded like ``%f``) or, for a
classifier, its top-k ``{class_id, prob}``; ``None`` for an image that could not be decoded.

* ``TorchEngine``: ``infer.Detector`` (Darknet's pre-processing, decoding and NMS), or for a
  classifier ``classifier_input`` + forward + Darknet's ``top_k``.
* ``OnnxEngine``: a ``darknet-cfg export`` model in onnxruntime fed the same input tensors; raw
  exports go through ``Detector.decode``/``suppress``; ``--decode`` exports through the same
  thresholds, letterbox correction and NMS.
* ``OpenCVEngine``: ``cv2.dnn.readNetFromDarknet`` on the cfg and .weights as users run it
  (``blobFromImage``, no letterbox), rows decoded by OpenCV, then Darknet's threshold and NMS.
  Its documented differences from Darknet are listed by ``opencv_differences``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import DarknetError
from .postprocess import Detections, _correct_boxes

__all__ = ["TorchEngine", "OnnxEngine", "OpenCVEngine", "top_k", "opencv_differences",
           "OPENCV_BN_EPS", "OPENCV_CLASS_SCORE_FLOOR"]

OPENCV_BN_EPS = 1e-6            # OpenCV's Darknet importer (Darknet: 1e-5)
OPENCV_CLASS_SCORE_FLOOR = 0.2  # OpenCV's yolo layer zeroes class scores at or below this


def top_k(probs: np.ndarray, k: int) -> List[int]:
    """Darknet's ``top_k``: the k largest, ties to the lower index."""
    return [int(i) for i in np.argsort(-np.asarray(probs, np.float32), kind="stable")[:k]]


def _objects(dets: Detections, names: Sequence[str]) -> List[dict]:
    from .darknet_exe import frame_objects
    from .infer import json_frame
    return frame_objects(json_frame(dets, names, 1, None))


def _load(path: str):
    from .preprocess import ImageDecodeError, load_image
    try:
        return load_image(path)
    except (ImageDecodeError, OSError):
        return None


class TorchEngine:
    """Our PyTorch model (``Detector`` for detectors, the classifier path otherwise)."""
    name = "pytorch"

    def __init__(self, model, kind: str, names: Sequence[str], thresh: float = 0.25,
                 nms: float = 0.45, letter_box: Optional[bool] = None, top: int = 5):
        from .infer import Detector
        self.model, self.kind, self.names, self.top = model, kind, list(names), top
        self.det = Detector(model, thresh=thresh, nms=nms, letter_box=letter_box) \
            if kind == "detector" else None

    def prepare(self, im: np.ndarray):
        if self.det is not None:
            return self.det.prepare(im)
        from .preprocess import classifier_input
        return classifier_input(im, self.model.width, self.model.height), None

    def forward(self, x: np.ndarray) -> Dict[int, np.ndarray]:
        import torch
        if self.det is not None:
            return self.det.forward(x[None])[0]
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x[None])))
        return {0: out[-1][0].reshape(-1).float().numpy()}

    def post(self, outs: Dict[int, np.ndarray], size) -> List[dict]:
        if self.det is None:
            probs = next(iter(outs.values())).reshape(-1)
            return [{"class_id": i, "prob": round(float(probs[i]), 6)}
                    for i in top_k(probs, min(self.top, len(probs)))]
        return _objects(self.det.suppress(self.det.decode(outs, size)), self.names)

    def run(self, paths: Sequence[str]) -> List[Optional[List[dict]]]:
        results = []
        for p in paths:
            im = _load(p)
            if im is None:
                results.append(None)
                continue
            x, size = self.prepare(im)
            results.append(self.post(self.forward(x), size))
        return results


class OnnxEngine(TorchEngine):
    """A ``darknet-cfg export`` ONNX model in onnxruntime (raw or ``--decode`` outputs)."""
    name = "onnx"

    def __init__(self, onnx_path: str, model, kind: str, names: Sequence[str], **kw):
        super().__init__(model, kind, names, **kw)
        try:
            import onnxruntime as ort
        except ImportError:
            raise DarknetError("--onnx needs onnxruntime: pip install onnxruntime "
                               "(or pip install 'darknet_cfg[onnx]')") from None
        try:
            self.sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise DarknetError(f"--onnx {onnx_path}: onnxruntime cannot load it: {first}") from None
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        want = [model.channels, model.height, model.width]
        if len(inp.shape) != 4 or [d for d in inp.shape[1:]] != want:
            raise DarknetError(f"--onnx {onnx_path}: input {inp.shape} does not match the "
                               f"model's 1x{want[0]}x{want[1]}x{want[2]} (export at the same size)")
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.decoded = self.out_names == ["boxes", "objectness", "scores"]
        if kind == "detector" and not self.decoded:
            expect = [f"out_{i}" for i in model.output_indices]
            if self.out_names != expect:
                raise DarknetError(f"--onnx {onnx_path}: outputs {self.out_names} are not those "
                                   f"of `darknet-cfg export` for this cfg ({expect})")

    def forward(self, x: np.ndarray) -> Dict[int, np.ndarray]:
        outs = self.sess.run(None, {self.input_name: np.ascontiguousarray(x[None], np.float32)})
        if self.kind != "detector":
            return {0: outs[-1][0].reshape(-1)}
        if self.decoded:
            return {"decoded": [o[0] for o in outs]}
        return {li: o[0] for li, o in zip(self.model.output_indices, outs)}

    def post(self, outs, size) -> List[dict]:
        if self.kind == "detector" and self.decoded:
            dets = _from_decoded(self.det, *outs["decoded"], size, correct=True)
            return _objects(self.det.suppress(dets), self.names)
        return super().post(outs, size)


def _head_slices(det):
    """(layer index, HeadParams, first box, last box) of each head in Darknet's box order."""
    specs = {s.index: s for s in det.model.graph.layers}
    start, out = 0, []
    for li in sorted(det.heads):
        h = det.heads[li]
        n = specs[li].outputs // h.entries  # boxes = H*W*anchors
        out.append((li, h, start, start + n))
        start += n
    return out


def _from_decoded(det, boxes, obj, scores, size, correct: bool) -> Detections:
    """Detections from decoded rows (x, y, w, h relative to the network input, objectness,
    obj*class scores): Darknet's thresholds (yolo boxes need obj > thresh; region keeps all,
    objectness 1), and its letterbox correction when ``correct``."""
    th = np.float32(det.thresh)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    obj = np.asarray(obj, np.float32).reshape(-1)
    scores = np.asarray(scores, np.float32).reshape(len(boxes), -1)
    keep = np.zeros(len(boxes), bool)
    layer = np.zeros(len(boxes), np.int64)
    fixed = boxes.copy()
    slices = _head_slices(det)
    if slices[-1][3] != len(boxes):
        raise DarknetError(f"{len(boxes)} decoded boxes, but the model's heads have "
                           f"{slices[-1][3]}")
    for li, h, a, b in slices:
        keep[a:b] = True if h.kind == "region" else obj[a:b] > th
        layer[a:b] = li
        if correct:
            fixed[a:b] = _correct_boxes(boxes[a:b], h.kind, size[0], size[1], det.net_w,
                                        det.net_h, det.letter_box)
    probs = np.where(scores > th, scores, np.float32(0))[keep]
    zeros = np.zeros(int(keep.sum()), np.int64)
    return Detections(fixed[keep], obj[keep], probs, layer[keep], zeros, zeros, zeros, zeros)


def opencv_differences(model, letter_box: bool, thresh: float) -> List[str]:
    """OpenCV DNN's documented differences from Darknet that apply to this model."""
    kinds = {s.type for s in model.heads}
    notes = ["blobFromImage resizes with cv2 (INTER_LINEAR), not Darknet's resize_image"]
    bn = lambda s: getattr(s, "batch_normalize", 0) or getattr(getattr(s, "conv", None),
                                                                "batch_normalize", 0)
    if any(bn(s) for s in model.graph.layers):
        notes.append(f"batch-norm eps {OPENCV_BN_EPS:g} (Darknet 1e-05): outputs move ~1e-3")
    if letter_box:
        notes.append("no letter_box: OpenCV stretches the image to the network size")
    if "region" in kinds:
        notes.append("[region]: OpenCV's objectness is sigmoid(t_o) and it runs its own NMS")
    if thresh <= OPENCV_CLASS_SCORE_FLOOR:
        notes.append(f"class scores <= {OPENCV_CLASS_SCORE_FLOOR} are zeroed inside the layer")
    return notes


class OpenCVEngine(TorchEngine):
    """OpenCV DNN 4.x as users run it: ``readNetFromDarknet`` + ``blobFromImage``."""
    name = "opencv"

    def __init__(self, cfg_path: str, weights: str, model, kind: str, names, **kw):
        super().__init__(model, kind, names, **kw)
        try:
            import cv2
        except ImportError:
            raise DarknetError("--opencv needs OpenCV: pip install 'opencv-python-headless<5'") \
                from None
        if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
            raise DarknetError(f"--opencv: OpenCV {cv2.__version__} has no readNetFromDarknet "
                               "(removed in 5.x; pip install 'opencv-python-headless<5')")
        try:
            self.net = cv2.dnn.readNetFromDarknet(str(cfg_path), str(weights))
        except cv2.error as e:
            first = [ln for ln in str(e).splitlines() if ln.strip()][-1:] or [""]
            raise DarknetError(f"--opencv: OpenCV cannot load this model: {first[0][:200]}") \
                from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.out_layers = self.net.getUnconnectedOutLayersNames()
        self.cv2 = cv2

    def prepare(self, im: np.ndarray):
        bgr = (im.transpose(1, 2, 0)[:, :, ::-1] * 255).round().astype(np.uint8)
        if self.kind == "detector":
            blob = self.cv2.dnn.blobFromImage(bgr, 1 / 255.0, (self.model.width, self.model.height),
                                              swapRB=True, crop=False)
        else:  # the classifier's own crop, OpenCV style: short side to the size, centre crop
            blob = self.cv2.dnn.blobFromImage(bgr, 1 / 255.0, (self.model.width, self.model.height),
                                              swapRB=True, crop=True)
        return blob[0], (im.shape[2], im.shape[1])

    def forward(self, x: np.ndarray):
        self.net.setInput(np.ascontiguousarray(x[None]))
        outs = self.net.forward(self.out_layers)
        if self.kind != "detector":
            return {0: np.asarray(outs[-1]).reshape(-1)}
        return {"rows": np.concatenate([np.asarray(o).reshape(-1, o.shape[-1]) for o in outs])}

    def post(self, outs, size) -> List[dict]:
        if self.kind != "detector":
            return super().post(outs, size)
        rows = outs["rows"]
        # rows are already relative to the image: OpenCV stretched it, nothing to undo
        dets = _from_decoded(self.det, rows[:, :4], rows[:, 4], rows[:, 5:], size, correct=False)
        return _objects(self.det.suppress(dets), self.names)
