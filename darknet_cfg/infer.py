"""Darknet's ``detector test`` pipeline on a DarknetModel: the same boxes Darknet gives.

Darknet (``test_detector``): ``load_image`` -> ``letterbox_image`` if ``[net] letter_box=1`` else
``resize_image`` -> ``network_predict`` -> ``get_network_boxes(thresh, relative=1)`` ->
``do_nms_sort`` / ``diounms_sort`` with the LAST detection layer's ``nms_kind`` and ``beta_nms``.
``Detector`` runs the same steps (batched forward) and keeps them separate so each can be timed.

Also here: Darknet's text output (``draw_detections_v3`` with ``-ext_output``), its ``-out``
JSON frames (``detection_to_json``) and COCO result records (``print_cocos``).
"""
from __future__ import annotations

import ctypes
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import lowp
from .errors import DarknetError
from .postprocess import (NMS_KINDS, Detections, HeadParams, _diou_matrix, box_iou_matrix,
                          darknet_order, do_nms, get_network_boxes, nms_orders)
from .prefilter import Candidates, head_candidates
from .preprocess import detector_input, load_image
from .runtime import exact_float32, keep_freed_memory
from .tta import tta_detections

__all__ = ["Detector", "forward_micro_batches", "nms_matrix", "COCO_NAMES", "COCO_IDS", "darknet_lines", "json_frame",
           "coco_records", "coco_image_id", "selected"]

COCO_NAMES = tuple((  # darknet's data/coco.names
    "person,bicycle,car,motorbike,aeroplane,bus,train,truck,boat,traffic light,fire hydrant,"
    "stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,"
    "backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,"
    "baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,"
    "banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,sofa,pottedplant,"
    "bed,diningtable,toilet,tvmonitor,laptop,mouse,remote,keyboard,cell phone,microwave,oven,"
    "toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush"
).split(","))
# darknet's coco_ids (validate_detector): class index -> COCO category id
COCO_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
            27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
            52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
            78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)

Image = Union[str, os.PathLike, np.ndarray]


def _head_params(specs) -> Dict[int, HeadParams]:
    """HeadParams per detection layer; unsupported heads become a user error."""
    try:
        return {s.index: HeadParams.from_spec(s) for s in specs}
    except NotImplementedError as e:
        raise DarknetError(str(e)) from None


# images per forward on CPU. Measured (bench/infer.py models, batch 4, ms per image), whole
# batch vs image by image: yolov4-tiny 41.0 vs 43.4, yolov4 359-360 vs 368-376, yolov4-csp
# 555 vs 554 (with runtime.keep_freed_memory; before it, image by image was 1.1-1.4x faster)
CPU_MICRO_BATCH = 4


# Detector(prefilter=None) on CPU: on from this threshold. bench/decode.py (CPU, copy + decode
# without NMS, prefilter / full time): thresh 0.25 (3% of the slots pass): yolov4-tiny 1.27 at
# batch 1 (+0.07 ms) and 0.45 at batch 8, yolov4 0.89 and 0.25; thresh 0.1: 0.69-1.48;
# thresh 0.005 (99% pass): 1.1-2.0
CPU_PREFILTER_THRESH = 0.2


def prefilter_default(device: torch.device, thresh: float = 0.25) -> bool:
    """``Detector(prefilter=None)``: on for CUDA (only the candidates cross to the host); on
    CPU only at ``thresh >= CPU_PREFILTER_THRESH`` (few slots pass; below, nearly all do and the
    gather costs more than the plain copy)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and float(thresh) >= CPU_PREFILTER_THRESH


def forward_micro_batches(model, x: torch.Tensor, micro_batch: int) -> List[torch.Tensor]:
    """``model(x)`` run ``micro_batch`` images at a time (0: all at once), outputs concatenated."""
    if not 0 < micro_batch < len(x):
        return model(x)
    return [torch.cat(o) for o in zip(*[model(c) for c in x.split(micro_batch)])]


class CudaGraphForward:
    """``model(x)`` replayed from a CUDA graph captured once per input shape and dtype.

    A batch-1 forward of a small model is bound by kernel launches, not arithmetic; a replayed
    graph launches them all at once. The returned tensors are the graph's static outputs:
    consume (copy) them before the next call. Shapes are fixed per graph, so each new batch
    size captures (and keeps) one more graph."""

    def __init__(self, model, exact: bool = True, warmup: int = 3):
        self.model, self.exact, self.warmup = model, exact, warmup
        self.graphs: Dict[Tuple, Tuple] = {}

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), exact_float32(self.exact):
            for _ in range(self.warmup):  # cuDNN picks its algorithms outside the capture
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), exact_float32(self.exact):
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        key = (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out


class Detector:
    """Darknet's detector: ``detect(images)`` -> one post-NMS ``Detections`` per image.

    ``letter_box=None`` takes ``[net] letter_box`` from the cfg. ``thresh`` applies to
    objectness and to ``obj*cls`` (strict ``>``), ``nms`` to IoU/DIoU (strict ``>``), both as
    in Darknet. Images are paths or float32 (3, H, W) RGB arrays in [0, 1] (``load_image``).
    Speed options, all keeping Darknet's numbers (within 1e-6) unless ``dtype`` is lowered:
    ``channels_last`` (default on CPU: oneDNN's NHWC convolutions are 1.2-1.7x faster here),
    ``prepack`` (default on CPU: ``model.prepack()``, weights packed once, activation fused),
    ``dtype`` (float32 default), ``micro_batch`` (images per forward; default on CPU
    ``CPU_MICRO_BATCH`` = 4, which bounds the activations' memory for large batches; GPU: the
    whole batch).
    ``winograd`` (opt-in, CPU, with ``prepack``): 3x3 stride-1 convolutions by Winograd where
    that is faster (layers/winograd.py). ``True`` (or 4): F(4x4) and F(2x2) tiles, yolov4-tiny
    1.5x faster, yolov4-class models 1.25x; ``2``: F(2x2) tiles only (1.15-1.3x). Outputs stay
    within the oracle tolerance (1e-4), but the float rounding differs from Darknet's direct
    convolutions: a class probability within ~1e-5 of ``thresh`` can fall on the other side, and
    box centres near an image edge differ by a few 1e-6 (F(2x2) is closer to exact arithmetic
    than Darknet's float32 but farther from Darknet's own rounding), so the default keeps direct
    convolutions.
    ``tta``: test-time augmentation (tta.py): the Scaled-YOLOv4 passes (scale 1, 0.83 flipped,
    0.67) merged before NMS; about 2x the forward cost.
    ``precision`` (opt-in, CPU; not Darknet's numbers, darknet_cfg/lowp.py): ``"bf16"`` bfloat16
    convolutions (float32 heads, decode and NMS), ``"int8"`` static quantization (oneDNN VNNI
    convolutions, the rest as bf16) calibrated on ``calib`` (a folder of images, the first
    ``calib_count``) and saved to ``calib_cache`` (reused while the model is unchanged). Where
    the CPU lacks the instructions it warns and runs float32; ``self.precision`` says what runs.
    ``prefilter`` (None: auto, ``prefilter_default``): decode from the slots whose objectness
    passes ``thresh``, selected and gathered on the outputs' device with one nonzero and one
    packed copy (prefilter.py) instead of copying every head output to the host; the same boxes
    bit for bit. Auto: on for CUDA, on CPU for ``thresh >= 0.2``. ``tta`` decodes in full.
    On CPU it also calls ``runtime.keep_freed_memory()`` (glibc malloc keeps freed activation
    memory for the next forward: 5-10% faster; ``DARKNET_CFG_MALLOC=0`` turns it off).
    """

    def __init__(self, model, thresh: float = 0.25, nms: float = 0.45,
                 letter_box: Optional[bool] = None, device=None, channels_last: Optional[bool] = None,
                 dtype: Optional[torch.dtype] = None, prepack: Optional[bool] = None,
                 micro_batch: Optional[int] = None,
                 winograd: Union[bool, int] = False, cuda_graph: bool = False,
                 tta: bool = False, precision: str = "fp32", calib=None, calib_cache=None,
                 calib_count: Optional[int] = None, darknet_array_order: bool = False,
                 prefilter: Optional[bool] = None):
        specs = model.heads
        if not specs:
            raise DarknetError(f"{os.path.basename(model.graph.path)}: no [yolo], "
                               "[Gaussian_yolo] or [region] layer; not a detector")
        self.heads: Dict[int, HeadParams] = _head_params(specs)
        last = self.heads[max(self.heads)]
        self.nms_kind, self.beta_nms, self.classes = last.nms_kind, last.beta_nms, last.classes
        self.model = model.eval()
        self.thresh, self.nms_thresh = float(thresh), float(nms)
        self.letter_box = bool(model.graph.net.letter_box) if letter_box is None else bool(letter_box)
        self.net_w, self.net_h = model.width, model.height
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.precision = lowp.resolve(precision, self.device)
        self._run = self.model
        if self.precision == "bf16":
            lowp.to_bf16(self.model)
            dtype = torch.bfloat16
        elif self.precision == "int8":
            dtype = lowp.to_int8(self.model, lowp.int8_ranges(
                self.model, self.prepare, calib, calib_cache, calib_count or lowp.CALIB_IMAGES))
        self.dtype = dtype or torch.float32
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if dtype is not None and self.precision == "fp32":
            self.model.to(dtype)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if prepack is None:
            prepack = self.device.type == "cpu" and (self.dtype == torch.float32
                                                     or self.precision != "fp32")
        if prepack:
            self.model.prepack(winograd=winograd)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults for activations on every forward (runtime.py)
        if micro_batch is None:
            micro_batch = CPU_MICRO_BATCH if self.device.type == "cpu" else 0
        self.micro_batch = int(micro_batch)  # 0: the whole batch at once
        # CUDA: float32 runs without TF32 (Darknet's numbers); lower dtypes are opt-in speed
        self.exact = self.device.type == "cuda" and self.dtype == torch.float32
        if cuda_graph and self.device.type != "cuda":
            raise DarknetError("cuda_graph=True needs a CUDA device")
        self.graphs = CudaGraphForward(self.model, self.exact) if cuda_graph else None
        self._pinned: Dict[Tuple, torch.Tensor] = {}
        from .tta import tta_sizes
        self.tta_sizes = tta_sizes(model) if tta else None  # (w, h, flip) of each pass (tta.py)
        # detect_loaded's boxes in the order Darknet's NMS leaves its array (what its -out JSON
        # lists; `detect --json` uses it); off, the boxes keep the decoding order (layer, anchor,
        # cell), the order the API's Detections always have
        self.darknet_array_order = bool(darknet_array_order)
        # device-side objectness prefilter before the host copy (prefilter.py); same boxes
        self.prefilter = prefilter_default(self.device, self.thresh) if prefilter is None \
            else bool(prefilter)

    # ---------------------------------------------------------------------------- steps
    def prepare(self, image: Image) -> Tuple[np.ndarray, Tuple[int, int]]:
        """Network input (3, net_h, net_w) and the original (width, height) of one image."""
        im = load_image(image) if not isinstance(image, np.ndarray) else image
        return detector_input(im, self.net_w, self.net_h, self.letter_box), (im.shape[2], im.shape[1])

    def forward(self, batch: np.ndarray) -> List[Dict[int, np.ndarray]]:
        """Batched forward of (N, 3, h, w) inputs; per image ``{layer: (C, H, W) float32}``."""
        with torch.inference_mode(), exact_float32(self.exact):
            outs = self._forward_tensors(batch)
            arrays = [o.float().cpu().contiguous().numpy() for o in outs]  # NCHW for decoding
        idx = self.model.output_indices
        return [{li: a[n] for li, a in zip(idx, arrays)} for n in range(len(batch))]

    def forward_candidates(self, batch: np.ndarray) -> Candidates:
        """``forward`` with the device-side prefilter (prefilter.py): per image ``{layer:
        HeadCandidates}`` (full arrays for [region]); ``decode`` gives the same boxes."""
        with torch.inference_mode(), exact_float32(self.exact):
            outs = self._forward_tensors(batch)
            return head_candidates(outs, self.model.output_indices, self.heads, self.thresh)

    def _forward_tensors(self, batch: np.ndarray) -> List[torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.type == "cuda":  # one pinned host buffer per shape: asynchronous copy
            buf = self._pinned.get(x.shape)
            if buf is None:
                buf = self._pinned[x.shape] = torch.empty(x.shape, pin_memory=True)
            x = buf.copy_(x).to(self.device, non_blocking=True)
        x = x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        if self.graphs is not None:
            return self.graphs(x)
        return forward_micro_batches(self._run, x, self.micro_batch)

    def decode(self, outputs: Dict[int, np.ndarray], size: Tuple[int, int]) -> Detections:
        """Darknet's get_network_boxes for one image of (width, height) ``size``."""
        return get_network_boxes(outputs, self.heads, self.net_w, self.net_h, size[0], size[1],
                                 thresh=self.thresh, letter_box=self.letter_box)

    def suppress(self, dets: Detections) -> Detections:
        """Darknet's NMS with the last detection layer's kind (do_nms_sort / diounms_sort)."""
        if self.nms_thresh <= 0:  # darknet skips NMS when nms == 0
            return dets
        return nms_matrix(dets, self.nms_thresh, kind=self.nms_kind, beta_nms=self.beta_nms)

    def detect(self, images: Sequence[Image], batch_size: int = 8) -> List[Detections]:
        """Boxes after NMS for each image (a single path or array is wrapped in a list), run
        through the network ``batch_size`` images at a time."""
        if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray)
                                                       and images.ndim == 3):
            images = [images]
        results: List[Detections] = []
        for start in range(0, len(images), batch_size):
            ims = [load_image(im) if not isinstance(im, np.ndarray) else im
                   for im in images[start:start + batch_size]]
            results += [d for d, _ in self.detect_loaded(ims)]
        return results

    def detect_loaded(self, ims: Sequence[np.ndarray]) -> List[Tuple[Detections, Tuple[int, int]]]:
        """(boxes after NMS, (width, height)) for each float (3, H, W) image, as one batch
        (with ``tta``: one batch per pass)."""
        sizes = [(im.shape[2], im.shape[1]) for im in ims]
        if self.tta_sizes:
            dets = tta_detections(self.forward, ims, self.heads, self.tta_sizes, self.thresh,
                                  self.letter_box)
        else:
            fwd = self.forward_candidates if self.prefilter else self.forward
            outs = fwd(np.stack([self.prepare(im)[0] for im in ims]))
            dets = [self.decode(out, size) for out, size in zip(outs, sizes)]
        out = []
        for d, size in zip(dets, sizes):
            after = self.suppress(d)
            if self.darknet_array_order and self.nms_thresh > 0:
                after = after.take(darknet_order(d))  # as Darknet's -out JSON lists them
            out.append((after, size))
        return out


def nms_matrix(dets: Detections, nms_thresh: float = 0.45, kind: str = "default",
               beta_nms: float = 0.6, max_boxes: int = 4096,
               dense_limit: int = 1 << 22) -> Detections:
    """``postprocess.do_nms`` with every pair's score computed once, vectorised.

    Same result bit for bit: the pair scores are the same float32 expressions (evaluated for
    all pairs at once instead of row by row), and each class still runs Darknet's greedy pass
    (in ``nms_orders``'s order, a box suppresses later boxes with score > thresh unless already
    suppressed). Falls back to ``do_nms`` above ``max_boxes`` taking part (memory). The passes
    run in lockstep on a dense (classes, L, L) table of pair flags while that has at most
    ``dense_limit`` entries (L: the most candidates of a class), else on each step's overlapping
    pairs only (``_greedy_sparse``: low thresholds such as ``map``'s 0.005 give thousands)."""
    if kind not in NMS_KINDS:
        raise ValueError(f"do_nms: unknown nms kind {kind!r} (expected one of {', '.join(NMS_KINDS)})")
    probs = dets.probs.copy()
    active = np.flatnonzero(dets.objectness != 0)
    nz = probs[active] != 0
    classes = np.flatnonzero(nz.sum(axis=0) >= 2)  # a class with < 2 boxes has nothing to do
    rows = active[nz[:, classes].any(axis=1)]
    if len(classes) == 0:
        return dets.with_probs(probs)
    if len(rows) > max_boxes:
        return do_nms(dets, nms_thresh, kind, beta_nms)
    boxes = dets.boxes[rows]
    th = np.float32(nms_thresh)
    # DIoU = IoU - u with u >= 0 (or IoU where c == 0), so only pairs whose IoU passes can
    # pass: the float64 pow runs for those pairs only (same float32 expressions)
    exponent = None if kind in ("default", "cornersnms") else \
        0.6 if kind == "greedynms" else float(np.float32(beta_nms))
    # every (box, class) candidate, grouped by class in the order of Darknet's pass for that
    # class (nms_orders: prob descending, ties as its stable qsort leaves them), then padded to
    # a (classes, L) table: Darknet's per-class greedy passes run in lockstep, L = the most
    # candidates any class has
    _, per_class = nms_orders(dets, classes, final=False)
    lens = np.array([len(per_class[k]) for k in classes])
    row_of = np.full(len(dets), -1, np.int64)
    row_of[rows] = np.arange(len(rows))
    r = row_of[np.concatenate([per_class[k] for k in classes])]     # rows, class by class
    c = np.repeat(np.arange(len(classes)), lens)
    pos = np.arange(len(r)) - np.repeat(np.cumsum(lens) - lens, lens)  # place in its pass
    L, n = int(pos.max()) + 1, len(rows)
    if len(classes) * L * L > dense_limit:
        src, dst = _suppression_pairs(boxes, th, exponent)
        dead = _greedy_native(src, dst, n, r, c, pos, len(classes), L) if _NMS is not None \
            else _greedy_sparse(src, dst, n, r, c, pos, len(classes), L)
        probs[rows[r[dead]], classes[c[dead]]] = 0
        return dets.with_probs(probs)
    over = _over_matrix(boxes, th)  # over[i, j]: box i (higher prob) suppresses box j
    if exponent is not None:
        i, j = np.nonzero(over)
        over[i, j] = _diou_matrix(boxes[i], boxes[j], exponent, outer=False) > th
    chunk = max(1, (1 << 24) // (L * L))                       # bounds the (K, L, L) gather
    for lo in range(0, len(classes), chunk):
        sel = (c >= lo) & (c < lo + chunk)
        cs, ps, rs = c[sel] - lo, pos[sel], r[sel]
        table = np.zeros((min(chunk, len(classes) - lo), L), np.int32)
        table[cs, ps] = rs
        alive = np.zeros(table.shape, bool)
        alive[cs, ps] = True                                   # padding never suppresses
        o = over.ravel()[table[:, :, None] * n + table[:, None, :]]  # flat: 2x faster
        for i in range(L - 1):
            if alive[:, i].any():
                alive[:, i + 1:] &= ~(o[:, i, i + 1:] & alive[:, i:i + 1])
        dead = ~alive[cs, ps]
        probs[rows[rs[dead]], classes[lo + cs[dead]]] = 0
    return dets.with_probs(probs)


def _load_nms():
    from .layers._native import load
    lib = load("_nms")
    if lib is not None:
        p, lg = ctypes.c_void_p, ctypes.c_long
        lib.iou_over.argtypes = [p, lg, ctypes.c_float, p]
        lib.iou_over.restype = None
        lib.iou_pairs.argtypes = [p, lg, ctypes.c_float, p, p, lg]
        lib.iou_pairs.restype = lg
        lib.greedy.argtypes = [p, p, lg, p, lg, lg, p]
        lib.greedy.restype = ctypes.c_int
    return lib


_NMS = _load_nms()  # layers/_nms.c, or None (tests set None to check the numpy paths)
_NATIVE_MIN_BOXES = 256  # below this numpy's broadcasting is as fast


def _over_matrix(boxes: np.ndarray, th: np.float32) -> np.ndarray:
    """``box_iou_matrix(boxes, boxes) > th``; in C (same float32 expressions, same flags) for
    many finite boxes."""
    b = np.ascontiguousarray(boxes, dtype=np.float32)
    if _NMS is None or len(b) < _NATIVE_MIN_BOXES or not np.isfinite(b).all():
        return box_iou_matrix(b, b) > th
    over = np.empty((len(b), len(b)), np.uint8)
    _NMS.iou_over(b.ctypes.data, len(b), float(th), over.ctypes.data)
    return over.view(bool)


def _suppression_pairs(boxes: np.ndarray, th: np.float32, exponent: Optional[float]):
    """(src, dst): box src suppresses box dst (score > th), src != dst, sorted by src. Darknet's
    IoU and DIoU are symmetric bit for bit (min, max, + and squares commute), so each pair is
    scored once; in C (layers/_nms.c) for many finite boxes."""
    b = np.ascontiguousarray(boxes, dtype=np.float32)
    n = len(b)
    if _NMS is not None and n >= _NATIVE_MIN_BOXES and np.isfinite(b).all():
        cap = n * (n - 1) // 2
        pi, pj = np.empty(cap, np.int32), np.empty(cap, np.int32)  # pages touched as filled
        m = _NMS.iou_pairs(b.ctypes.data, n, float(th), pi.ctypes.data, pj.ctypes.data, cap)
        pi, pj = pi[:m].astype(np.int64), pj[:m].astype(np.int64)
    else:
        pi, pj = np.nonzero(np.triu(box_iou_matrix(b, b) > th, 1))
    if exponent is not None and len(pi):
        keep = _diou_matrix(b[pi], b[pj], exponent, outer=False) > th
        pi, pj = pi[keep], pj[keep]
    src, dst = np.concatenate([pi, pj]), np.concatenate([pj, pi])
    o = np.argsort(src, kind="stable")
    return src[o], dst[o]


def _greedy_native(src, dst, n: int, r: np.ndarray, c: np.ndarray, pos: np.ndarray,
                   n_classes: int, length: int) -> np.ndarray:
    """``_greedy_sparse`` in C (layers/_nms.c): the same passes, the same survivors."""
    table = np.full((n_classes, length), -1, np.int64)
    table[c, pos] = r
    alive = np.zeros((n_classes, length), np.uint8)
    alive[c, pos] = 1
    start = np.searchsorted(src, np.arange(n + 1)).astype(np.int64)
    dst32 = np.ascontiguousarray(dst, dtype=np.int32)
    if _NMS.greedy(start.ctypes.data, dst32.ctypes.data, n, table.ctypes.data, n_classes,
                   length, alive.ctypes.data) != 0:
        raise MemoryError("NMS: out of memory")
    return alive[c, pos] == 0


def _greedy_sparse(src: np.ndarray, dst: np.ndarray, n: int, r: np.ndarray, c: np.ndarray,
                   pos: np.ndarray, n_classes: int, length: int) -> np.ndarray:
    """Darknet's greedy passes of all classes in lockstep, touching overlapping pairs only.

    Candidate m is box ``r[m]`` at place ``pos[m]`` of class ``c[m]``'s pass; box ``src[k]``
    suppresses box ``dst[k]`` (sorted by src). Step t: every class's candidate at place t that
    is still alive suppresses its overlapping boxes that come later in that class's pass.
    Returns the suppressed candidates (a boolean mask over m)."""
    start = np.searchsorted(src, np.arange(n + 1))
    place = np.full((n_classes, n), -1, np.int64)               # place of box j in class k's pass
    place[c, r] = pos
    table = np.full((n_classes, length), -1, np.int64)
    table[c, pos] = np.arange(len(r))
    alive = np.zeros((n_classes, length), bool)
    alive[c, pos] = True
    degree = (start[1:] - start[:-1])[r]                        # overlapping boxes per candidate
    steps = np.unique(pos[degree > 0])
    steps = steps[steps < length - 1]
    for t in steps:
        m = table[:, t]
        m = m[(m >= 0) & alive[:, t]]                           # alive boxes at place t
        m = m[degree[m] > 0]
        if len(m) == 0:
            continue
        cnt = degree[m]
        first = np.repeat(start[r[m]] - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        k = np.repeat(c[m], cnt)
        later = place[k, dst[first]]
        hit = later > t
        alive[k[hit], later[hit]] = False
    return ~alive[c, pos]


# ------------------------------------------------------------------------------ output formats

def selected(dets: Detections, names: Sequence[str], thresh: float) -> List[Tuple[int, int]]:
    """Darknet's get_actual_detections: (box index, best class) for boxes with a class > thresh
    (names starting with ``dont_show`` are never best), in box order."""
    probs = dets.probs.copy()
    hidden = [i for i, n in enumerate(names[:probs.shape[1]]) if n.startswith("dont_show")]
    probs[:, hidden] = 0
    best = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    ok = probs[np.arange(len(probs)), best] > np.float32(thresh) if len(probs) else best > 0
    return [(int(i), int(best[i])) for i in np.flatnonzero(ok)]


def _pixels(box, w: int, h: int) -> Tuple[float, float, float, float]:
    x, y, bw, bh = (float(v) for v in box)
    r = lambda v: float(math.floor(v + 0.5)) if v >= 0 else -float(math.floor(-v + 0.5))  # C round
    return r((x - bw / 2) * w), r((y - bh / 2) * h), r(bw * w), r(bh * h)


def darknet_lines(dets: Detections, names: Sequence[str], image_w: int, image_h: int,
                  thresh: float) -> List[str]:
    """What ``detector test -ext_output`` prints: boxes sorted by left edge, best class first,
    then every other class above thresh, each ``name: 99%\\t(left_x: ... height: ...)``."""
    sel = selected(dets, names, thresh)
    left = lambda i: float(dets.boxes[i, 0] - dets.boxes[i, 2] / 2)
    sel.sort(key=lambda s: left(s[0]))
    lines = []
    for i, best in sel:
        lx, ty, bw, bh = _pixels(dets.boxes[i], image_w, image_h)
        coords = f"\t(left_x: {lx:4.0f}   top_y: {ty:4.0f}   width: {bw:4.0f}   height: {bh:4.0f})"
        others = [j for j in np.flatnonzero(dets.probs[i] > np.float32(thresh)) if j != best]
        for j in [best] + [int(j) for j in others]:
            lines.append(f"{names[j]}: {dets.probs[i, j] * 100:.0f}%{coords}")
    return lines


def json_frame(dets: Detections, names: Sequence[str], frame_id: int,
               filename: Optional[str]) -> dict:
    """Darknet's ``detection_to_json``: one object per box and class with a non-zero prob."""
    objects = []
    for i, j in zip(*np.nonzero(dets.probs > np.float32(0.005))):
        if names[j].startswith("dont_show"):
            continue
        x, y, w, h = (round(float(v), 6) for v in dets.boxes[i])
        objects.append({"class_id": int(j), "name": names[j],
                        "relative_coordinates": {"center_x": x, "center_y": y, "width": w,
                                                 "height": h},
                        "confidence": round(float(dets.probs[i, j]), 6)})
    frame = {"frame_id": int(frame_id)}
    if filename is not None:
        frame["filename"] = filename
    frame["objects"] = objects
    return frame


def coco_image_id(path: str) -> Union[int, str]:
    """Darknet's get_coco_image_id (digits after the last '_' of the name); else the stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.search(r"(\d+)$", stem.rsplit("_", 1)[-1])
    return int(m.group(1)) if m else stem


def coco_records(dets: Detections, image_id, image_w: int, image_h: int) -> List[dict]:
    """Darknet's ``print_cocos``: ``bbox = [x_min, y_min, w, h]`` in pixels, clipped to the
    image; one record per box and class with prob > 0; 80-class models use COCO category ids."""
    b = dets.boxes.astype(np.float64)
    x0 = np.clip((b[:, 0] - b[:, 2] / 2) * image_w, 0, image_w)
    x1 = np.clip((b[:, 0] + b[:, 2] / 2) * image_w, 0, image_w)
    y0 = np.clip((b[:, 1] - b[:, 3] / 2) * image_h, 0, image_h)
    y1 = np.clip((b[:, 1] + b[:, 3] / 2) * image_h, 0, image_h)
    ids = COCO_IDS if dets.classes == len(COCO_IDS) else range(dets.classes)
    out = []
    for i, j in zip(*np.nonzero(dets.probs > 0)):
        out.append({"image_id": image_id, "category_id": int(ids[j]),
                    "bbox": [round(float(v), 4) for v in (x0[i], y0[i], x1[i] - x0[i], y1[i] - y0[i])],
                    "score": round(float(dets.probs[i, j]), 6)})
    return out
