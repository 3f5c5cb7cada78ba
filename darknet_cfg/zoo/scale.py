"""New family members from a preset: depth and width multipliers, stages, size, classes,
activation and anchors -> a new, validated spec.

Rounding (chosen here; the published points follow no single rule, so presets stay explicit):
* depth: every residual/PAN repeat count ``n`` becomes ``ceil(n * depth)``, so a block that
  exists keeps at least one repeat; SPP repeats are structural and not scaled;
* width: every width ``w`` (stem, stages, plain-stage hidden, neck, heads; tiny: all convs)
  becomes the nearest multiple of 8 of ``w * width`` (halves round up); one that rounds to 0 is
  an error;
* stages (CSP members only): more stages repeat the deepest stage (width, depth), neck level,
  head width and [yolo] options (P5 -> P6 -> P7 is exactly how the published P6 extends P5);
  fewer stages drop the deepest ones. The level count is stages - 2 (P3..P<stages>); without
  --anchors a changed level count takes the published anchors for that many levels (3: csp,
  4: P6, 5: P7), split evenly with consecutive masks;
* size must be a multiple of the largest stride (2**stages; 32 for tiny).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence, Tuple, Union

from .presets import LEVEL_ANCHORS
from .spec import CspSpec, Detect, SpecError, TinySpec

Spec = Union[CspSpec, TinySpec]


def round_depth(n: int, m: float) -> int:
    return math.ceil(n * m - 1e-9)  # 1e-9: 3 * (1/3) stays 1


def round_width(w: int, m: float) -> int:
    return 8 * int(math.floor(w * m / 8 + 0.5))


def parse_anchors(text: str) -> Tuple[Tuple[int, ...], Optional[int]]:
    """``w,h,w,h,...`` (split evenly over the levels) or levels separated by ``/``.
    Returns the flat anchors and the number of levels given (None: not said)."""
    groups = [g for g in text.replace(" ", "").split("/")]
    flat = []
    for g in groups:
        try:
            vals = [int(round(float(v))) for v in g.split(",") if v != ""]
        except ValueError:
            raise SpecError(f"--anchors: cannot read {g!r} (expected w,h,w,h,...)") from None
        if not vals or len(vals) % 2:
            raise SpecError(f"--anchors: {g!r} is not a list of w,h pairs")
        flat.append(vals)
    if len(groups) > 1 and len({len(g) for g in flat}) != 1:
        raise SpecError("--anchors: every level needs the same number of anchors")
    return tuple(v for g in flat for v in g), (len(groups) if len(groups) > 1 else None)


def _resize(t: Sequence, n: int) -> tuple:
    """First ``n`` items of ``t``, repeating the last one when ``n`` is larger."""
    t = tuple(t)
    return t[:n] + (t[-1],) * max(0, n - len(t))


def _detect(d: Detect, levels: int, anchors: Optional[str], classes: Optional[int]) -> Detect:
    given, said = parse_anchors(anchors) if anchors else (None, None)
    if said is not None and said != levels:
        raise SpecError(f"--anchors gives {said} levels but the network has {levels} detection "
                        "levels")
    if given is None and levels == d.levels:
        new = d
    else:
        flat = given if given is not None else LEVEL_ANCHORS.get(levels)
        if flat is None:
            raise SpecError(f"no default anchors for {levels} levels: give --anchors")
        pairs_ = len(flat) // 2
        if pairs_ % levels:
            raise SpecError(f"{pairs_} anchors do not split evenly over {levels} levels")
        per = pairs_ // levels
        masks = tuple(tuple(range(j * per, (j + 1) * per)) for j in range(levels))
        new = replace(d, anchors=flat, masks=masks, num=None,
                      options=_resize(d.options, levels))
    return replace(new, classes=classes) if classes is not None else new


def scale(spec: Spec, *, depth: float = 1.0, width: float = 1.0, stages: Optional[int] = None,
          size: Optional[int] = None, classes: Optional[int] = None,
          activation: Optional[str] = None, anchors: Optional[str] = None,
          name: Optional[str] = None) -> Spec:
    """A new spec (validated: ``check()`` has passed) from ``spec`` and the options."""
    if depth <= 0 or width <= 0:
        raise SpecError("--depth and --width must be > 0")
    W = lambda ws: tuple(round_width(w, width) for w in ws)  # noqa: E731
    common = dict(name=name or spec.name, size=size or spec.size,
                  activation=activation or spec.activation)
    if isinstance(spec, TinySpec):
        if stages is not None:
            raise SpecError(f"{spec.name}: tiny members have a fixed number of stages "
                            "(--stages applies to the CSP members)")
        if depth != 1.0:
            raise SpecError(f"{spec.name}: tiny members have no repeated blocks: --depth does "
                            "not apply")
        new = replace(spec, **common, stem=W(spec.stem), blocks=W(spec.blocks),
                      top=round_width(spec.top, width), neck=round_width(spec.neck, width),
                      head=W(spec.head), reduce=W(spec.reduce),
                      detect=_detect(spec.detect, spec.detect.levels, anchors, classes))
    else:
        n = stages or spec.stages
        if n not in (5, 6, 7):
            raise SpecError(f"--stages must be 5, 6 or 7 (got {n})")
        levels = n - 2
        new = replace(
            spec, **common, stem=round_width(spec.stem, width),
            widths=W(_resize(spec.widths, n)),
            depths=tuple(round_depth(d, depth) for d in _resize(spec.depths, n)),
            plain_hidden=round_width(spec.plain_hidden, width),
            neck=W(_resize(spec.neck, levels)), head=W(_resize(spec.head, levels)),
            pan_depth=round_depth(spec.pan_depth, depth),
            detect=_detect(spec.detect, levels, anchors, classes))
    new.check()
    return new
