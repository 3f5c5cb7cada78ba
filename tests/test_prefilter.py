"""Device-side candidate prefilter (prefilter.py): the same Detections, bit for bit, as
decoding the full head outputs (get_network_boxes), before and after NMS, in Darknet's order."""
import warnings

import numpy as np
import pytest
import torch

from conftest import IMAGES, needs_shared, oracle_detector
from test_postprocess import _detector_dirs

from darknet_cfg.infer import Detector, nms_matrix, prefilter_default
from darknet_cfg.postprocess import HeadParams, darknet_order, do_nms, get_network_boxes
from darknet_cfg.prefilter import Candidates, HeadCandidates, head_candidates

FIELDS = ("boxes", "objectness", "probs", "layer", "anchor", "anchor_id", "row", "col")
HAVE_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")]


def assert_identical(a, b):
    assert len(a) == len(b)
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert np.array_equal(x, y), f"{f} differs"
    assert (a.uc is None) == (b.uc is None)
    if a.uc is not None:
        assert np.array_equal(a.uc, b.uc)


def both_paths(outs, heads, geo, thresh, letter_box, batch_layout="channels_last", device="cpu"):
    """outs: per image {layer: (C, H, W)}; returns (full, prefiltered) Detections per image."""
    idx = sorted(heads)
    mf = torch.channels_last if batch_layout == "channels_last" else torch.contiguous_format
    tensors = [torch.from_numpy(np.stack([o[li] for o in outs])).to(device)
               .contiguous(memory_format=mf) for li in idx]
    cands = head_candidates(tensors, idx, heads, thresh)
    packed = head_candidates(tensors, idx, heads, thresh, packed=True)  # the GPU path, on CPU
    assert isinstance(cands, Candidates) and len(cands) == len(outs) == len(packed)
    full = [get_network_boxes(o, heads, *geo, thresh=thresh, letter_box=letter_box) for o in outs]
    pre = [get_network_boxes(c, heads, *geo, thresh=thresh, letter_box=letter_box) for c in cands]
    for c, want in zip(packed, pre):
        assert_identical(get_network_boxes(c, heads, *geo, thresh=thresh, letter_box=letter_box),
                         want)
    return full, pre, cands


def check_all(full, pre, kind="default", beta=0.6):
    for a, b in zip(full, pre):
        assert_identical(a, b)
        assert_identical(nms_matrix(a, 0.45, kind, beta), nms_matrix(b, 0.45, kind, beta))
        assert np.array_equal(darknet_order(a), darknet_order(b))


def _oracle(d):
    heads, outs, ref = oracle_detector(d)
    return heads, {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in outs.items()}, ref


@needs_shared
@pytest.mark.parametrize("model_dir", _detector_dirs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_oracle_outputs_same_detections(model_dir):
    """Every oracle detector case (Darknet's own head outputs): identical boxes, NMS and order;
    as image 2 of a batch whose image 1 has the objectness scrambled."""
    heads, outs, ref = _oracle(model_dir)
    rng = np.random.default_rng(0)
    other = {}
    for li, o in outs.items():  # a second, different image
        o = o.copy()
        if heads[li].kind != "region":
            e = 4 if heads[li].kind == "yolo" else 8
            K = heads[li].entries
            o[e::K] = rng.permutation(o[e::K].ravel()).reshape(o[e::K].shape)
        other[li] = o
    geo = (ref["net_w"], ref["net_h"], ref["image_w"], ref["image_h"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cspx-p7-mish's anchors past num
        full, pre, cands = both_paths([other, outs], heads, geo, ref["thresh"],
                                      bool(ref["letter_box"]))
    assert len(full[1]) == ref["nboxes"]
    last = heads[max(heads)]
    check_all(full, pre, last.nms_kind, last.beta_nms)
    assert_identical(do_nms(full[1], ref["nms"], last.nms_kind, last.beta_nms),
                     do_nms(pre[1], ref["nms"], last.nms_kind, last.beta_nms))
    if all(h.kind != "region" for h in heads.values()):
        assert cands.nbytes < sum(o.nbytes for o in outs.values())  # fewer bytes cross


# ----------------------------------------------------------------------------- synthetic

def _yolo(classes=3, mask=(0, 1, 2), new_coords=0, kind="yolo", **kw):
    anchors = (10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319)
    return HeadParams(kind=kind, classes=classes, mask=mask, anchors=anchors, num=6,
                      new_coords=new_coords, **kw)


def _output(head, H, W, rng, obj=None):
    """A plausible (C, H, W) head output: logistic x/y/obj/cls, raw w/h (new_coords: logistic)."""
    K = head.entries
    o = rng.random((head.n, K, H, W), dtype=np.float32)
    if head.kind == "yolo" and not head.new_coords:
        o[:, 2:4] = rng.normal(0, 1, (head.n, 2, H, W)).astype(np.float32)
    if head.kind == "Gaussian_yolo":
        o[:, [4, 6]] = rng.normal(0, 1, (head.n, 2, H, W)).astype(np.float32)
    if obj is not None:
        o[:, 4 if head.kind == "yolo" else 8] = obj
    return o.reshape(head.n * K, H, W)


@pytest.mark.parametrize("letter_box", [False, True])
@pytest.mark.parametrize("new_coords", [0, 1])
def test_synthetic_two_heads_batch(letter_box, new_coords):
    rng = np.random.default_rng(1)
    heads = {16: _yolo(mask=(3, 4, 5), new_coords=new_coords),
             23: _yolo(mask=(0, 1, 2), new_coords=new_coords)}
    outs = [{16: _output(heads[16], 5, 7, rng), 23: _output(heads[23], 10, 14, rng)}
            for _ in range(3)]
    full, pre, _ = both_paths(outs, heads, (224, 160, 500, 333), 0.5, letter_box)
    assert all(len(d) > 0 for d in full)
    check_all(full, pre)


def test_objectness_equal_to_thresh_is_out():
    """darknet: ``objectness > thresh`` (strict, float32): equal is out, the next float in."""
    head = _yolo()
    th = np.float32(0.3)
    obj = np.full((3, 4, 4), np.float32(0.1), np.float32)
    obj[0, 0, 0] = th
    obj[1, 2, 3] = np.nextafter(th, np.float32(1))
    obj[2, 3, 1] = np.float32(np.nan)  # NaN never passes
    obj[2, 1, 1] = np.inf
    outs = [{0: _output(head, 4, 4, np.random.default_rng(2), obj)}]
    full, pre, cands = both_paths(outs, {0: head}, (64, 64, 64, 64), float(th), False)
    check_all(full, pre)
    c = cands[0][0]
    assert isinstance(c, HeadCandidates)
    assert list(zip(c.row.tolist(), c.col.tolist(), c.slot.tolist())) == [(1, 1, 2), (2, 3, 1)]


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_no_candidates_and_all_candidates(fill):
    heads = {3: _yolo(), 5: _yolo(kind="Gaussian_yolo")}
    rng = np.random.default_rng(3)
    outs = [{li: _output(h, 6, 6, rng, obj=np.float32(fill)) for li, h in heads.items()}
            for _ in range(2)]
    full, pre, cands = both_paths(outs, heads, (96, 96, 120, 80), 0.25, True)
    check_all(full, pre)
    assert all(len(d) == (0 if fill == 0 else 2 * 3 * 36) for d in full)
    # none: only the 8-byte-per-row table (empty) crossed
    if fill == 0:
        assert cands.nbytes == 0


def test_mixed_kinds_region_gaussian_contiguous_and_half():
    """yolo + Gaussian_yolo (different entries per slot) + region (passed through in full),
    NCHW and float16 outputs (widened to float32 as the full path does)."""
    rng = np.random.default_rng(4)
    region = HeadParams(kind="region", classes=3, mask=(0, 1), anchors=(1.0, 1.5, 2.0, 3.0),
                        coords=4, num=2)
    heads = {2: _yolo(kind="Gaussian_yolo", yolo_point=2), 7: _yolo(), 9: region}
    reg = rng.random((2 * 8, 4, 4), dtype=np.float32)
    outs = [{2: _output(heads[2], 4, 4, rng), 7: _output(heads[7], 8, 8, rng), 9: reg}
            for _ in range(2)]
    outs = [{k: v.astype(np.float16).astype(np.float32) for k, v in o.items()} for o in outs]
    full, pre, cands = both_paths(outs, heads, (128, 128, 128, 96), 0.4, False, "contiguous")
    check_all(full, pre)
    assert isinstance(cands[0][9], np.ndarray) and cands[0][9].shape == (16, 4, 4)
    assert full[0].uc is not None
    # float16 device tensors give the same candidates as their float32 widening
    idx = sorted(heads)
    t16 = [torch.from_numpy(np.stack([o[li] for o in outs])).half() for li in idx]
    c16 = head_candidates(t16, idx, heads, 0.4)
    for i in range(2):
        assert_identical(get_network_boxes(c16[i], heads, 128, 128, 128, 96, thresh=0.4),
                         full[i])


def test_strided_input_and_thresholds():
    """A non-dense output (a slice) works; decoding at a higher thresh filters further; at a
    lower one it is an error (those boxes were never copied)."""
    rng = np.random.default_rng(5)
    head = _yolo()
    big = torch.from_numpy(np.stack([_output(head, 6, 9, rng) for _ in range(4)]))
    t = big[::2]  # not dense
    cands = head_candidates([t], [0], {0: head}, 0.2)
    outs = [{0: big[i].numpy()} for i in (0, 2)]
    for c, o in zip(cands, outs):
        assert_identical(get_network_boxes(c, {0: head}, 96, 96, 96, 96, thresh=0.2),
                         get_network_boxes(o, {0: head}, 96, 96, 96, 96, thresh=0.2))
        assert_identical(get_network_boxes(c, {0: head}, 96, 96, 96, 96, thresh=0.6),
                         get_network_boxes(o, {0: head}, 96, 96, 96, 96, thresh=0.6))
        with pytest.raises(ValueError, match="prefiltered"):
            get_network_boxes(c, {0: head}, 96, 96, 96, 96, thresh=0.1)
    with pytest.raises(ValueError, match="channels"):
        head_candidates([t[:, :-1]], [0], {0: head}, 0.2)


def test_prefilter_default():
    assert prefilter_default(torch.device("cuda"), 0.005) is True
    assert prefilter_default(torch.device("cpu"), 0.25) is True
    assert prefilter_default(torch.device("cpu"), 0.005) is False


# ----------------------------------------------------------------------------- Detector

def _tiny(tmp_path):
    from test_infer_parity import load_oracle_model
    model, _ = load_oracle_model("yolov4-tiny", tmp_path)
    return model


@needs_shared
@pytest.mark.parametrize("thresh", [0.25, 0.005])
def test_detector_prefilter_on_off_identical(tmp_path, thresh):
    model = _tiny(tmp_path)
    on = Detector(model, thresh=thresh, prefilter=True, darknet_array_order=True)
    off = Detector(model, thresh=thresh, prefilter=False, darknet_array_order=True)
    assert on.prefilter and not off.prefilter
    paths = [IMAGES / "dog.png", IMAGES / "person.png", IMAGES / "dog.png"]
    for a, b in zip(off.detect(paths), on.detect(paths)):
        assert_identical(a, b)
    x, size = on.prepare(IMAGES / "dog.png")
    c = on.forward_candidates(x[None])
    assert_identical(on.decode(c[0], size), off.decode(off.forward(x[None])[0], size))


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_cuda_candidates_identical():
    """On the GPU: the same candidates as the CPU full path, fp32 and fp16 outputs."""
    rng = np.random.default_rng(6)
    heads = {16: _yolo(mask=(3, 4, 5), new_coords=1), 23: _yolo(kind="Gaussian_yolo")}
    outs = [{16: _output(heads[16], 13, 13, rng), 23: _output(heads[23], 26, 26, rng)}
            for _ in range(4)]
    for layout in ("channels_last", "contiguous"):
        full, pre, _ = both_paths(outs, heads, (416, 416, 640, 480), 0.25, True, layout, "cuda")
        check_all(full, pre)


@needs_shared
@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_cuda_detector_prefilter_identical(tmp_path):
    model = _tiny(tmp_path)
    on = Detector(model, device="cuda")
    assert on.prefilter
    off = Detector(model, device="cuda", prefilter=False)
    paths = [IMAGES / "dog.png", IMAGES / "person.png"]
    for a, b in zip(off.detect(paths), on.detect(paths)):
        assert_identical(a, b)
