"""``--set key=value``: override cfg options from the command line, on the parsed Cfg.

The override is written into the parsed sections as if it were the first line of the section
(Darknet: the first occurrence of a key wins), so the graph builder validates and warns about
it exactly as about the cfg itself: a bad number is a ``DarknetCfgError``, a key no layer reads
is a ``CfgWarning`` ("unused key").

Where a key goes: ``net.KEY=V`` -> [net]; ``yolo.KEY=V`` -> every detection layer ([yolo],
[Gaussian_yolo], [region]) that reads KEY; a bare ``KEY=V`` -> [net] if [net] reads it, else
every detection layer that reads it, else [net] (where it then warns as unused).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

from .errors import DarknetError
from .reader import Cfg, Option, Section

__all__ = ["apply_sets", "parse_set", "load_with_sets", "NET_KEYS", "HEAD_KEYS"]


def _net_keys() -> frozenset:
    from .specs import NET_OPTIONS
    size = ["batch", "subdivisions", "width", "height", "channels", "inputs", "letter_box"]
    return frozenset([k for k, _, _ in NET_OPTIONS] + size)


def _head_keys() -> dict:
    from .specs import GAUSSIAN_TRAIN_OPTIONS, REGION_OPTIONS, YOLO_TRAIN_OPTIONS
    common = ["classes", "num", "mask", "anchors", "nms_kind", "scale_x_y", "beta_nms"]
    return {"yolo": frozenset(common + ["new_coords"] + [k for k, _, _ in YOLO_TRAIN_OPTIONS]),
            "Gaussian_yolo": frozenset(common + [k for k, _, _ in GAUSSIAN_TRAIN_OPTIONS]),
            "region": frozenset(["classes", "coords", "num", "anchors", "softmax", "tree"]
                                + [k for k, _, _ in REGION_OPTIONS])}


NET_KEYS = _net_keys()
HEAD_KEYS = _head_keys()


def parse_set(item: str) -> Tuple[Optional[str], str, str]:
    """``[net.|yolo.]key=value`` -> (scope or None, key, value); whitespace removed as the cfg
    reader removes it."""
    text = "".join(item.split())
    key, eq, value = text.partition("=")
    scope = None
    if "." in key:
        scope, key = key.split(".", 1)
        if scope not in ("net", "yolo"):
            raise DarknetError(f"--set {item!r}: the prefix must be net. or yolo.")
    if not eq or not key or not value:
        raise DarknetError(f"--set {item!r}: expected key=value (e.g. mosaic=1, yolo.jitter=0.3)")
    return scope, key, value


def apply_sets(cfg: Cfg, items: Iterable[str]) -> Cfg:
    """A copy of ``cfg`` with the ``key=value`` overrides in place (see the module docstring)."""
    items = list(items or [])
    if not items:
        return cfg
    sections = [Section(s.name, s.line, list(s.options)) for s in cfg.sections]
    out = Cfg(sections, cfg.path, cfg.text)
    heads = [s for s in sections[1:] if s.name in HEAD_KEYS]
    for item in items:
        scope, key, value = parse_set(item)
        targets: List[Section] = []
        if scope != "net":
            targets = [s for s in heads if key in HEAD_KEYS[s.name]]
            if scope == "yolo" and not targets:
                if not heads:
                    raise DarknetError(f"--set {item!r}: the cfg has no detection layer")
                targets = heads  # read by none of them: each warns "unused key"
        if scope == "net" or (scope is None and (key in NET_KEYS or not targets)):
            targets = [sections[0]]
        for s in targets:
            s.options.insert(0, Option(key, value, s.line))
    return out


def load_with_sets(cfg, weights=None, sets: Iterable[str] = (), **kw):
    """``darknet_cfg.load(cfg, weights, **kw)`` with ``--set`` overrides applied to the cfg
    first (a cfg file or preset name; a .pt checkpoint takes no overrides)."""
    from . import build_model, load, load_weights
    from .reader import read_cfg
    sets = list(sets or [])
    if not sets:
        return load(cfg, weights, **kw)
    if str(cfg).endswith((".pt", ".pth")):
        raise DarknetError(f"--set: {cfg} is a checkpoint; overrides apply to a cfg")
    model = build_model(apply_sets(read_cfg(cfg), sets), kw.pop("width", None),
                        kw.pop("height", None), device=kw.pop("device", None))
    if weights is not None:
        load_weights(model, weights, **kw)
    return model.eval()
