"""The block grammar of the Scaled-YOLOv4 and yolov4-tiny cfgs, as functions appending sections.

Every function returns the absolute index of the layer(s) later blocks read, so no route index
is ever typed by hand; ``Layers`` writes a route relative (``-3``) when it points inside the block
being written and absolute (``79``) when it reaches back to an earlier block, as the published
cfgs do. Each block's first section carries a one-line comment saying what the block is.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

from ..reader import Cfg, Option, Section, parse_cfg_text, write_cfg
from .spec import CspSpec, Detect, TinySpec


class Layers:
    """An append-only list of cfg sections with Darknet's layer indices (``[net]`` excluded)."""

    def __init__(self, net: Sequence):
        self.sections: List[Section] = [Section("net", 0, [Option(k, str(v), 0) for k, v in net])]
        self.block_start = 0
        self._comment = ""

    @property
    def last(self) -> int:
        return len(self.sections) - 2

    def block(self, comment: str) -> None:
        """Start a block: its first section gets ``comment``; routes inside it are relative."""
        self.block_start = self.last + 1
        self._comment = comment

    def add(self, name: str, **options) -> int:
        sec = Section(name, 0, [Option(k, str(v), 0) for k, v in options.items()],
                      comment=self._comment)
        self._comment = ""
        self.sections.append(sec)
        return self.last

    def set(self, index: int, key: str, value) -> None:
        self.sections[index + 1].options.append(Option(key, str(value), 0))

    def ref(self, target: int) -> str:
        here = self.last + 1
        return str(target - here) if target >= self.block_start else str(target)

    # one method per section kind the grammar uses
    def conv(self, filters: int, size: int, act: str, stride: int = 1, bn: bool = True) -> int:
        opts: Dict[str, object] = {"batch_normalize": 1} if bn else {}
        opts.update(filters=filters, size=size, stride=stride, pad=1, activation=act)
        return self.add("convolutional", **opts)

    def route(self, *sources: int, **extra) -> int:
        return self.add("route", layers=",".join(self.ref(s) for s in sources), **extra)

    def source(self, src: int) -> None:
        """Make ``src`` the input of the next layer (a one-source route unless it already is)."""
        if src != self.last:
            self.route(src)

    def shortcut(self, src: int) -> int:
        return self.add("shortcut", **{"from": self.ref(src), "activation": "linear"})

    def maxpool(self, size: int, stride: int) -> int:
        return self.add("maxpool", stride=stride, size=size)

    def upsample(self) -> int:
        return self.add("upsample", stride=2)

    def cfg(self, path: str) -> Cfg:
        """The sections as a Cfg, re-read from the project's writer so line numbers are real."""
        text = write_cfg(Cfg(self.sections, path))
        return parse_cfg_text(text, path)

    def text(self) -> str:
        return write_cfg(Cfg(self.sections))


# ---- Scaled-YOLOv4 (CSP) blocks -------------------------------------------------------------

def stem(L: Layers, width: int, act: str) -> int:
    L.block(f"stem: 3x3 conv, {width} filters")
    return L.conv(width, 3, act)


def residuals(L: Layers, hidden: int, width: int, depth: int, act: str) -> int:
    """``depth`` x (1x1 conv, 3x3 conv, shortcut to the block input)."""
    for _ in range(depth):
        x = L.last
        L.conv(hidden, 1, act)
        L.conv(width, 3, act)
        L.shortcut(x)
    return L.last


def plain_stage(L: Layers, width: int, hidden: int, depth: int, act: str, stride: int) -> int:
    L.block(f"stage stride {stride}: 3x3/2 conv, {depth} residual blocks ({width} filters)")
    L.conv(width, 3, act, stride=2)
    return residuals(L, hidden, width, depth, act)


def csp_stage(L: Layers, width: int, depth: int, act: str, stride: int) -> int:
    """3x3/2 conv; half the width bypasses ``depth`` residual blocks; concat; 1x1 conv."""
    L.block(f"CSP stage stride {stride}: 3x3/2 conv, {depth} residual blocks ({width} filters)")
    h = width // 2
    down = L.conv(width, 3, act, stride=2)
    bypass = L.conv(h, 1, act)
    L.route(down)
    L.conv(h, 1, act)
    residuals(L, h, h, depth, act)
    L.conv(h, 1, act)
    L.route(L.last, bypass)
    return L.conv(width, 1, act)


def spp_csp(L: Layers, width: int, pre: int, post: int, act: str) -> int:
    """CSP around SPP: 1x1 conv, ``pre`` (3x3, 1x1) pairs, max-pools 5/9/13 concatenated,
    ``post`` (1x1, 3x3) pairs; the bypass half joins before the final 1x1 conv."""
    L.block(f"SPP-CSP: max-pools 5, 9, 13 ({width} filters)")
    x = L.last
    bypass = L.conv(width, 1, act)
    L.route(x)
    L.conv(width, 1, act)
    for _ in range(pre):
        L.conv(width, 3, act)
        L.conv(width, 1, act)
    pooled = L.last
    p5 = L.maxpool(5, 1)
    L.route(pooled)
    p9 = L.maxpool(9, 1)
    L.route(pooled)
    p13 = L.maxpool(13, 1)
    L.route(p13, p9, p5, pooled)
    for _ in range(post):
        L.conv(width, 1, act)
        L.conv(width, 3, act)
    L.route(L.last, bypass)
    return L.conv(width, 1, act)


def csp2(L: Layers, width: int, depth: int, act: str) -> int:
    """The neck's CSP block: 1x1 conv; half bypasses ``depth`` (1x1, 3x3) pairs; concat; 1x1."""
    x = L.conv(width, 1, act)
    bypass = L.conv(width, 1, act)
    L.route(x)
    for _ in range(depth):
        L.conv(width, 1, act)
        L.conv(width, 3, act)
    L.route(L.last, bypass)
    return L.conv(width, 1, act)


def pan_up(L: Layers, src: int, lateral: int, width: int, depth: int, act: str, level: int) -> int:
    """Top-down step: 1x1 conv, upsample, join the backbone's stage output through a 1x1 conv."""
    L.block(f"neck top-down P{level}: upsample, join stage P{level}, CSP2 x{depth} "
            f"({width} filters)")
    L.source(src)
    L.conv(width, 1, act)
    up = L.upsample()
    L.route(lateral)
    L.conv(width, 1, act)
    L.route(L.last, up)
    return csp2(L, width, depth, act)


def pan_down(L: Layers, src: int, skip: int, width: int, depth: int, act: str, level: int) -> int:
    """Bottom-up step: 3x3/2 conv, join the top-down output of this level, CSP2 block."""
    L.block(f"neck bottom-up P{level}: 3x3/2 conv, join top-down P{level}, CSP2 x{depth} "
            f"({width} filters)")
    L.source(src)
    L.conv(width, 3, act, stride=2)
    L.route(L.last, skip)
    return csp2(L, width, depth, act)


def yolo(L: Layers, d: Detect, level: int) -> int:
    L.conv(d.filters(level), 1, d.activation, bn=False)
    num = d.num if d.num is not None else len(d.anchors) // 2
    return L.add("yolo", mask=",".join(map(str, d.masks[level])),
                 anchors=",".join(map(str, d.anchors)), classes=d.classes, num=num,
                 **dict(d.options[level]))


def head(L: Layers, src: int, width: int, form: str, d: Detect, level: int, act: str,
         stride: int) -> int:
    """``conv3``: 3x3 conv; ``sam``: 1x1 conv, 1x1 logistic conv, [sam], 1x1 conv. Then the
    1x1 conv to (classes+5)*anchors filters and [yolo]."""
    L.block(f"head P{level + 3} (stride {stride}): {form}, [yolo] mask "
            f"{','.join(map(str, d.masks[level]))}")
    L.source(src)
    if form == "sam":
        x = L.conv(width, 1, act)
        L.conv(width, 1, "logistic")
        L.add("sam", **{"from": L.ref(x)})
        L.conv(width, 1, act)
    else:
        L.conv(width, 3, act)
    return yolo(L, d, level)


def csp_network(s: CspSpec) -> Layers:
    """Stem, stages, SPP-CSP, top-down and bottom-up PAN, heads (interleaved or at the end)."""
    net = (("width", s.size), ("height", s.size)) + s.net
    L = Layers(net)
    act = s.activation
    stem(L, s.stem, act)
    outs = []
    for i, (w, n) in enumerate(zip(s.widths, s.depths)):
        stride = 2 ** (i + 1)
        if i == 0 and not s.csp_first:
            outs.append(plain_stage(L, w, s.plain_hidden, n, act, stride))
        else:
            outs.append(csp_stage(L, w, n, act, stride))
    levels = s.stages - 2
    top = [0] * levels                    # top-down outputs, P3..P<stages>
    top[-1] = spp_csp(L, s.neck[-1], s.spp_pre, s.spp_post, act)
    for j in range(levels - 2, -1, -1):
        top[j] = pan_up(L, top[j + 1], outs[j + 2], s.neck[j], s.pan_depth, act, j + 3)
    out = [top[0]] + [0] * (levels - 1)   # bottom-up outputs
    heads = []
    for j in range(levels):
        if j:
            out[j] = pan_down(L, out[j - 1], top[j], s.neck[j], s.pan_depth, act, j + 3)
        if s.heads_at_end:
            continue
        if j == 0 and s.stopbackward:
            L.set(out[0], "stopbackward", s.stopbackward)
        heads.append(head(L, out[j], s.head[j], s.head_form, s.detect, j, act, 2 ** (j + 3)))
    if s.heads_at_end:
        if s.stopbackward:
            L.set(out[-1], "stopbackward", s.stopbackward)
        for j in range(levels):
            head(L, out[j], s.head[j], s.head_form, s.detect, j, act, 2 ** (j + 3))
    return L


# ---- yolov4-tiny blocks ---------------------------------------------------------------------

def tiny_block(L: Layers, width: int, act: str, stride: int) -> int:
    """3x3 conv; its second half (route groups=2) through two 3x3 convs, concat, 1x1 conv;
    concat with the first conv; 2x2 max-pool. Returns the 1x1 conv (later levels join it)."""
    L.block(f"CSP-tiny block stride {stride}: {width} filters, 2x2 max-pool")
    x = L.conv(width, 3, act)
    L.route(x, groups=2, group_id=1)
    a = L.conv(width // 2, 3, act)
    b = L.conv(width // 2, 3, act)
    L.route(b, a)
    t = L.conv(width, 1, act)
    L.route(x, t)
    L.maxpool(2, 2)
    return t


def tiny_network(s: TinySpec) -> Layers:
    net = (("width", s.size), ("height", s.size)) + s.net
    L = Layers(net)
    act = s.activation
    L.block(f"stem: two 3x3/2 convs ({s.stem[0]}, {s.stem[1]} filters)")
    for w in s.stem:
        L.conv(w, 3, act, stride=2)
    taps = []
    stride = 2 ** len(s.stem)
    for w in s.blocks:
        taps.append(tiny_block(L, w, act, stride))
        stride *= 2
    L.block(f"top: 3x3 conv {s.top}, 1x1 conv {s.neck}")
    L.conv(s.top, 3, act)
    src = L.conv(s.neck, 1, act)
    d = s.detect
    for j in range(d.levels):
        L.block(f"head stride {stride >> j}: 3x3 conv, [yolo] mask "
                f"{','.join(map(str, d.masks[j]))}")
        if j:
            L.source(src)
            L.conv(s.reduce[j - 1], 1, act)
            L.upsample()
            L.route(L.last, taps[-j])
        conv3 = L.conv(s.head[j], 3, act)
        yolo(L, d, j)
        # the second level starts at the 1x1 neck conv, each later one at the previous 3x3
        src = conv3 if j else src
    return L


def build_layers(spec: Union[CspSpec, TinySpec]) -> Layers:
    spec.check()
    L = csp_network(spec) if isinstance(spec, CspSpec) else tiny_network(spec)
    L.sections[0].comment = (f"{spec.name}: generated by darknet_cfg.zoo (darknet-cfg scale); "
                             "one comment per block")
    return L


def generate_text(spec: Union[CspSpec, TinySpec]) -> str:
    """The cfg text of ``spec`` (validated first: nothing is produced for a bad spec)."""
    return build_layers(spec).text()
