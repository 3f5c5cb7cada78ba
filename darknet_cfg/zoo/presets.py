"""The published family as data: ``PRESETS[name]`` is the spec whose generated cfg is
layout-identical to Darknet's ``cfg/<name>.cfg`` with the same [net] and [yolo] values
(tests/test_zoo.py holds every entry against Darknet's own layout)."""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Union

from .spec import CspSpec, Detect, TinySpec, pairs

Spec = Union[CspSpec, TinySpec]

# ---- [net] ------------------------------------------------------------------------------------
_SCALED_NET = dict(batch=64, subdivisions=8, channels=3, momentum=0.949, decay=0.0005, angle=0,
                   saturation=1.5, exposure=1.5, hue=0.1, learning_rate=0.001, burn_in=1000,
                   max_batches=500500, policy="steps", steps="400000,450000", scales="0.1,0.1",
                   mosaic=1, letter_box=1, ema_alpha=0.9998)
_TINY_NET = dict(batch=64, subdivisions=1, channels=3, momentum=0.9, decay=0.0005, angle=0,
                 saturation=1.5, exposure=1.5, hue=0.1, learning_rate=0.00261, burn_in=1000,
                 max_batches=500200, policy="steps", steps="400000,450000", scales="0.1,0.1")


def _net(base: dict, **changes) -> tuple:
    """``base`` with ``changes``; a change to None drops the key."""
    d = {**base, **changes}
    return pairs({k: v for k, v in d.items() if v is not None})


# ---- anchors (w,h pairs, smallest first) -----------------------------------------------------
ANCHORS_9 = (12, 16, 19, 36, 40, 28, 36, 75, 76, 55, 72, 146, 142, 110, 192, 243, 459, 401)
ANCHORS_6 = (10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319)
ANCHORS_12 = (13, 17, 31, 25, 24, 51, 61, 45, 48, 102, 119, 96, 97, 189, 217, 184, 171, 384,
              324, 451, 616, 618, 800, 800)
ANCHORS_16 = (13, 17, 31, 25, 24, 51, 61, 45, 61, 45, 48, 102, 119, 96, 97, 189, 97, 189, 217,
              184, 171, 384, 324, 451, 324, 451, 545, 357, 616, 618, 1024, 1024)
ANCHORS_20 = (13, 17, 22, 25, 27, 66, 55, 41, 57, 88, 112, 69, 69, 177, 136, 138, 136, 138, 287,
              114, 134, 275, 268, 248, 268, 248, 232, 504, 445, 416, 640, 640, 812, 393, 477, 808,
              1070, 908, 1408, 1408)
# default anchors for a number of CSP detection levels (scale.py, when --stages changes it)
LEVEL_ANCHORS = {3: ANCHORS_9, 4: ANCHORS_16, 5: ANCHORS_20}

# ---- [yolo] -----------------------------------------------------------------------------------
_SCALED_YOLO = dict(jitter=0.1, scale_x_y=2.0, objectness_smooth=1, ignore_thresh=0.7,
                    truth_thresh=1, resize=1.5, iou_normalizer=0.05, cls_normalizer=0.5,
                    obj_normalizer=0.4, iou_loss="ciou", nms_kind="diounms", beta_nms=0.6,
                    new_coords=1, max_delta=2)
_TINY_YOLO = dict(jitter=0.3, scale_x_y=1.05, cls_normalizer=1.0, iou_normalizer=0.07,
                  iou_loss="ciou", ignore_thresh=0.7, truth_thresh=1, random=0, resize=1.5,
                  nms_kind="greedynms", beta_nms=0.6)


def _masks(levels: int, per: int) -> tuple:
    return tuple(tuple(range(j * per, (j + 1) * per)) for j in range(levels))


def _detect(anchors, masks, base: dict, *levels: dict, num=None, activation="logistic",
            **common) -> Detect:
    """Per-level [yolo] options: ``base`` updated by ``common`` and that level's dict."""
    opts = tuple(pairs({**base, **common, **lv}) for lv in levels)
    return Detect(anchors=anchors, masks=masks, options=opts, num=num, activation=activation)


# csp and yolov4x-mish weigh the objectness of the three levels 4 / 1 / 0.4
_CSP_LEVELS = (dict(objectness_smooth=0, obj_normalizer=4.0, max_delta=5),
               dict(obj_normalizer=1.0, max_delta=5), dict())
_DETECT_CSP = _detect(ANCHORS_9, _masks(3, 3), _SCALED_YOLO, *_CSP_LEVELS, iou_thresh=0.2)
_DETECT_CSP_PLAIN = _detect(ANCHORS_9, _masks(3, 3), _SCALED_YOLO, {}, {}, {})

# ---- the family ---------------------------------------------------------------------------------
_CSP = CspSpec(
    name="yolov4-csp", size=512, activation="mish", stem=32,
    widths=(64, 128, 256, 512, 1024), depths=(1, 2, 8, 8, 4), csp_first=False, plain_hidden=32,
    spp_pre=1, spp_post=1, neck=(128, 256, 512), pan_depth=2, head=(256, 512, 1024),
    head_form="conv3", heads_at_end=False, detect=_DETECT_CSP, net=_net(_SCALED_NET))

_X = replace(
    _CSP, name="yolov4x-mish", size=640, stem=32, widths=(80, 160, 320, 640, 1280),
    depths=(1, 3, 10, 10, 5), plain_hidden=40, spp_post=2, neck=(160, 320, 640), pan_depth=3,
    head=(320, 640, 1280), net=_net(_SCALED_NET, ema_alpha=None), stopbackward=800)

_CSP_X = replace(_X, name="yolov4-csp-x-mish", heads_at_end=True, detect=_DETECT_CSP_PLAIN,
                 net=_net(_SCALED_NET, learning_rate=0.00261), stopbackward=0)

_P5 = CspSpec(
    name="yolov4-p5", size=896, activation="mish", stem=32,
    widths=(64, 128, 256, 512, 1024), depths=(1, 3, 15, 15, 7), csp_first=True, plain_hidden=32,
    spp_pre=1, spp_post=1, neck=(128, 256, 512), pan_depth=3, head=(256, 512, 1024),
    head_form="conv3", heads_at_end=True,
    detect=_detect(ANCHORS_12, _masks(3, 4), _SCALED_YOLO, {}, {}, {}, iou_thresh=0.2,
                   obj_normalizer=1.0),
    net=_net(_SCALED_NET))

_P6 = replace(
    _P5, name="yolov4-p6", size=1280, widths=_P5.widths + (1024,), depths=_P5.depths + (7,),
    neck=_P5.neck + (512,), head=_P5.head + (1024,),
    detect=_detect(ANCHORS_16, _masks(4, 4), _SCALED_YOLO, {}, {}, {}, {}, iou_thresh=0.2,
                   obj_normalizer=1.0))

_P7 = CspSpec(
    name="cspx-p7-mish", size=1536, activation="mish", stem=80,
    widths=(80, 160, 320, 640, 1280, 1280, 1280), depths=(1, 3, 15, 15, 7, 7, 7),
    csp_first=False, plain_hidden=40, spp_pre=1, spp_post=1, neck=(128, 320, 640, 640, 640),
    pan_depth=3, head=(320, 640, 1280, 1280, 1280), head_form="sam", heads_at_end=True,
    # Darknet's file says num=16 for 20 anchors: [yolo] then reads only the first 16 anchors
    # (masks 16-19 index past them); kept as published
    detect=_detect(ANCHORS_20, _masks(5, 4), _SCALED_YOLO,
                   *(dict(obj_normalizer=v) for v in (4.0, 1.0, 0.5, 0.4, 0.1)),
                   num=16, iou_thresh=0.2, max_delta=40),
    net=_net(_SCALED_NET, ema_alpha=None))

_S = CspSpec(
    name="yolov4-csp-s-mish", size=640, activation="mish", stem=32,
    widths=(32, 64, 128, 256, 512), depths=(1, 1, 1, 1, 1), csp_first=False, plain_hidden=32,
    spp_pre=0, spp_post=1, neck=(64, 128, 256), pan_depth=1, head=(128, 256, 512),
    head_form="conv3", heads_at_end=True, detect=_DETECT_CSP_PLAIN,
    net=_net(_SCALED_NET, learning_rate=0.00261))

_TINY = TinySpec(
    name="yolov4-tiny", size=416, activation="leaky", stem=(32, 64), blocks=(64, 128, 256),
    top=512, neck=256, head=(512, 256), reduce=(128,),
    detect=_detect(ANCHORS_6, ((3, 4, 5), (1, 2, 3)), _TINY_YOLO, {}, {}, activation="linear"),
    net=_net(_TINY_NET, max_batches=2000200, steps="1600000,1800000"))

_TINY_3L = replace(
    _TINY, name="yolov4-tiny-3l", size=608, head=(512, 256, 128), reduce=(128, 64),
    detect=_detect(ANCHORS_9, ((6, 7, 8), (3, 4, 5), (0, 1, 2)), _TINY_YOLO, {}, {}, {},
                   activation="linear"),
    net=_net(_TINY_NET))

PRESETS: Dict[str, Spec] = {s.name: s for s in (
    _CSP,
    replace(_CSP, name="yolov4-csp-swish", size=640, activation="swish", heads_at_end=True,
            detect=_DETECT_CSP_PLAIN, stopbackward=900),
    _X,
    _CSP_X,
    replace(_CSP_X, name="yolov4-csp-x-swish", activation="swish",
            net=_net(_SCALED_NET), stopbackward=900),
    _S,
    _P5,
    _P6,
    _P7,
    _TINY,
    _TINY_3L,
    # frozen variants: backpropagation stops at the last neck conv (stopbackward=1)
    replace(_CSP_X, name="yolov4-csp-x-swish-frozen", activation="swish", net=_net(_SCALED_NET),
            stopbackward=1),
    replace(_P5, name="yolov4-p5-frozen", stopbackward=1),
)}


def get_preset(name: str) -> Spec:
    """The preset called ``name`` (a trailing ``.cfg`` is ignored); unknown names list the known."""
    from .spec import SpecError
    key = name[:-4] if name.endswith(".cfg") else name
    if key not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]
