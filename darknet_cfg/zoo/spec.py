"""One frozen dataclass per family member: every number the generator needs, nothing implied.

The published Scaled-YOLOv4 cfgs do not follow one depth/width rule and differ in structural
switches, so a member is written out explicitly: per-stage depths and widths, the stem, plain or
CSP first stage, SPP repeats, neck and head widths per level, PAN repeats, head form and placement,
activation, anchors and masks, and the [net]/[yolo] hyper-parameters. ``blocks.py`` turns a spec
into layers; ``scale.py`` turns a spec into another spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import DarknetError

Pairs = Tuple[Tuple[str, str], ...]
ACTIVATIONS = ("mish", "swish", "leaky")


class SpecError(DarknetError, ValueError):
    """A spec (or scaling options) that would not make a valid network."""


def pairs(d: Dict[str, object]) -> Pairs:
    """dict -> the immutable (key, value-text) pairs a spec stores."""
    return tuple((k, str(v)) for k, v in d.items())


@dataclass(frozen=True)
class Detect:
    """The detection part: [yolo] layers and the 1x1 convolution before each.

    ``masks`` and ``options`` hold one entry per [yolo] layer in layer order; ``options`` are that
    layer's keys other than mask/anchors/classes/num. ``num=None`` writes len(anchors)/2."""
    anchors: Tuple[int, ...]
    masks: Tuple[Tuple[int, ...], ...]
    options: Tuple[Pairs, ...]
    classes: int = 80
    num: Optional[int] = None
    activation: str = "logistic"  # of the conv before [yolo] (new_coords=1 expects logistic)

    @property
    def levels(self) -> int:
        return len(self.masks)

    def filters(self, level: int) -> int:
        """Darknet: a [yolo] layer needs (classes + 5) * len(mask) filters before it."""
        return (self.classes + 5) * len(self.masks[level])

    def check(self, name: str) -> None:
        if self.classes < 1:
            raise SpecError(f"{name}: classes must be >= 1 (got {self.classes})")
        if len(self.anchors) % 2 or not self.anchors:
            raise SpecError(f"{name}: anchors must be w,h pairs (got {len(self.anchors)} numbers)")
        if len(self.options) != self.levels:
            raise SpecError(f"{name}: {self.levels} masks but {len(self.options)} [yolo] option sets")
        n = len(self.anchors) // 2
        for m in self.masks:
            if not m or max(m) >= n or min(m) < 0:
                raise SpecError(f"{name}: mask {','.join(map(str, m))} does not index the "
                                f"{n} anchors")


@dataclass(frozen=True)
class CspSpec:
    """A Scaled-YOLOv4 member: stem, one residual stage per stride (plain or CSP), SPP-CSP on the
    deepest stage, a CSP-PAN neck (top-down, then bottom-up) and one head per level P3..P<stages>.

    Stage ``i`` (0-based) has stride 2**(i+1); ``widths[i]`` is its output width (CSP stages use
    half of it inside), ``depths[i]`` its residual blocks. ``neck[j]`` is the width of level
    P(j+3) in the neck (the deepest one is also the SPP width), ``head[j]`` the head width there."""
    name: str
    size: int
    activation: str
    stem: int
    widths: Tuple[int, ...]
    depths: Tuple[int, ...]
    csp_first: bool        # first stage CSP (P5, P6) or plain residual (csp, x, s, P7)
    plain_hidden: int      # 1x1 width inside a plain first stage's residual blocks
    spp_pre: int           # (3x3, 1x1) pairs before the max-pools
    spp_post: int          # (1x1, 3x3) pairs after them
    neck: Tuple[int, ...]
    pan_depth: int         # (1x1, 3x3) pairs in each CSP2 neck block
    head: Tuple[int, ...]
    head_form: str         # "conv3": 3x3 conv; "sam": 1x1 conv, spatial attention, 1x1 conv
    heads_at_end: bool     # heads after the whole neck (csp-x, P5-P7) or each as its level is done
    detect: Detect
    net: Pairs
    stopbackward: int = 0  # set on the last neck conv before the first head (frozen variants)

    @property
    def stages(self) -> int:
        return len(self.widths)

    @property
    def stride(self) -> int:
        return 2 ** self.stages

    def check(self) -> None:
        n = self.name
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"{n}: activation must be one of {', '.join(ACTIVATIONS)}")
        if self.stages < 3:
            raise SpecError(f"{n}: needs at least 3 stages (got {self.stages})")
        levels = self.stages - 2
        for field, value in (("depths", self.depths), ("neck", self.neck), ("head", self.head)):
            want = self.stages if field == "depths" else levels
            if len(value) != want:
                raise SpecError(f"{n}: {field} has {len(value)} entries, {self.stages} stages "
                                f"need {want}")
        if self.detect.levels != levels:
            raise SpecError(f"{n}: {self.stages} stages have {levels} detection levels "
                            f"(P3..P{self.stages}) but the anchors/masks give {self.detect.levels}")
        widths = dict(stem=(self.stem,), widths=self.widths, plain_hidden=(self.plain_hidden,),
                      neck=self.neck, head=self.head)
        for field, value in widths.items():
            if min(value) < 1:
                raise SpecError(f"{n}: {field} would have 0 filters ({list(value)}): use a larger "
                                "--width")
        if min(self.depths) < 0 or min(self.pan_depth, self.spp_pre, self.spp_post) < 0:
            raise SpecError(f"{n}: repeats must be >= 0")
        if self.head_form not in ("conv3", "sam"):
            raise SpecError(f"{n}: head_form must be conv3 or sam")
        check_size(n, self.size, self.stride)
        self.detect.check(n)


@dataclass(frozen=True)
class TinySpec:
    """A yolov4-tiny member: a two-conv stem, CSP-tiny blocks (3x3 conv, half of it through two
    3x3 convs, 1x1, concat, 2x2 max-pool), a 3x3 top conv, a 1x1 neck conv and one head per level,
    deepest first; each further level upsamples the previous one and joins an earlier block."""
    name: str
    size: int
    activation: str
    stem: Tuple[int, int]
    blocks: Tuple[int, ...]
    top: int
    neck: int
    head: Tuple[int, ...]     # 3x3 head conv width per level, deepest first
    reduce: Tuple[int, ...]   # 1x1 conv before each upsample (levels 2..)
    detect: Detect
    net: Pairs

    @property
    def stride(self) -> int:
        return 2 ** (len(self.stem) + len(self.blocks))

    def check(self) -> None:
        n = self.name
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"{n}: activation must be one of {', '.join(ACTIVATIONS)}")
        levels = self.detect.levels
        if len(self.head) != levels or len(self.reduce) != levels - 1:
            raise SpecError(f"{n}: {levels} levels need {levels} head widths and {levels - 1} "
                            "reduce widths")
        if levels > len(self.blocks):
            raise SpecError(f"{n}: {levels} levels but only {len(self.blocks)} blocks to join")
        widths = (*self.stem, *self.blocks, self.top, self.neck, *self.head, *self.reduce)
        if min(widths) < 2:
            raise SpecError(f"{n}: a layer would have {min(widths)} filters: use a larger --width")
        check_size(n, self.size, self.stride)
        self.detect.check(n)


def check_size(name: str, size: int, stride: int) -> None:
    """Darknet's routes need every level's grid to be exact: size a multiple of the largest stride."""
    if size < stride or size % stride:
        raise SpecError(f"{name}: size {size} is not a multiple of the network's largest stride "
                        f"{stride} (try {max(stride, round(size / stride) * stride)})")
