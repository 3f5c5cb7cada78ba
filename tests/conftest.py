"""Shared fixtures: the ground-truth folder (../shared, or $DARKNET_CFG_SHARED)."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DARKNET_CFG_SHARED", REPO.parent / "shared")).resolve()
ORACLE = SHARED / "oracle"
UPSTREAM_CFG = SHARED / "darknet-cfg"
IMAGES = SHARED / "images"

HAVE_SHARED = (ORACLE / "README.md").is_file()
needs_shared = pytest.mark.skipif(
    not HAVE_SHARED,
    reason=f"ground-truth data not found at {SHARED} (set DARKNET_CFG_SHARED to the shared/ folder)")


def oracle_io():
    """The oracle's own reader module (numpy only), imported from the shared folder."""
    if str(ORACLE) not in sys.path:
        sys.path.insert(0, str(ORACLE))
    import oracle_io as oio  # noqa: E402
    return oio


def oracle_detector(d):
    """(heads, outputs, detections.json) of one oracle detector folder: each detection layer's
    HeadParams from layout.json and its output from outputs.npz ([region] as (C, H, W))."""
    import json

    import numpy as np

    from darknet_cfg.postprocess import HeadParams
    oio = oracle_io()
    layout = json.loads((Path(d) / "layout.json").read_text())
    ref = json.loads((Path(d) / "detections.json").read_text())
    heads, outs = {}, {}
    with np.load(Path(d) / "outputs.npz") as z:
        for key in z.files:
            li = int(key)
            layer = layout["layers"][li]
            heads[li] = HeadParams.from_layout_layer(layer)
            outs[li] = oio.region_output_to_chw(z[key]) if layer["type"] == "region" else z[key]
    return heads, outs, ref


def model_names():
    d = ORACLE / "models"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def ok_layouts():
    """(cfg path relative to darknet-cfg/, layout json path) for every cfg Darknet parses."""
    if not HAVE_SHARED:
        return []
    import json
    index = json.loads((ORACLE / "layouts" / "index.json").read_text())
    return sorted((k, v["layout"]) for k, v in index["cfgs"].items() if v["ok"])


MINI_CFG = REPO / "cfg" / "yolov4-tiny-mini.cfg"


def mini_cfg(tmp_path, **over) -> str:
    """The shipped mini cfg with [net] keys replaced (or added), written to tmp_path/mini.cfg."""
    import re
    text = MINI_CFG.read_text()
    for k, v in over.items():
        text, n = re.subn(rf"(?m)^{k}\s*=.*$", f"{k}={v}", text, count=1)
        if n == 0:
            text = text.replace("[net]\n", f"[net]\n{k}={v}\n", 1)
    p = tmp_path / "mini.cfg"
    p.write_text(text)
    return str(p)
