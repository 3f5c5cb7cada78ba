"""Every cfg Darknet parses: our shapes, weight segments and BFLOPs equal Darknet's layout."""
import json
import warnings

import pytest
import torch

from darknet_cfg import build_graph
from darknet_cfg.converters.weights import iter_layer_tensors
from darknet_cfg.model import DarknetModel
from darknet_cfg.summary import summary_dict

from conftest import ORACLE, UPSTREAM_CFG, needs_shared, ok_layouts

LAYOUTS = ok_layouts()


def _graph(cfg_rel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_graph(UPSTREAM_CFG / cfg_rel)


def compare_layout(graph, layout):
    """List of differences between our graph and a Darknet layout.json (empty = equal)."""
    diffs = []
    if len(graph.layers) != len(layout["layers"]):
        return [("n_layers", len(graph.layers), len(layout["layers"]))]
    n = graph.net
    if [n.width, n.height, n.channels] != [layout["net_w"], layout["net_h"], layout["net_c"]]:
        diffs.append(("net", [n.width, n.height, n.channels]))
    for ours, ref in zip(graph.layers, layout["layers"]):
        i = ours.index
        if ours.type != ref["type"]:
            diffs.append((i, "type", ours.type, ref["type"]))
            continue
        out = ref.get("effective_out_chw", ref["out_chw"])
        if 0 in out:  # darknet leaves c/h/w at 0 for flat outputs: compare the count
            if ours.outputs != ref["outputs"]:
                diffs.append((i, "outputs", ours.outputs, ref["outputs"]))
        elif ours.out_shape.as_list() != out:
            diffs.append((i, "out_chw", ours.out_shape.as_list(), out))
        if ours.outputs != ref["outputs"]:
            diffs.append((i, "outputs", ours.outputs, ref["outputs"]))
        segs = [] if ours.dontload else ours.weight_segments()
        if segs != [(s["name"], s["count"]) for s in ref["segments"]]:
            diffs.append((i, "segments", segs, ref["segments"]))
        if abs(ours.bflops - ref["bflops"]) > 1e-5 * max(1.0, ref["bflops"]):
            diffs.append((i, "bflops", ours.bflops, ref["bflops"]))
        if ours.type in ("yolo", "Gaussian_yolo"):
            p = ref["params"]
            if (ours.classes, ours.num, list(ours.mask)) != (p["classes"], p["num"], p["mask"]):
                diffs.append((i, "yolo params"))
            if list(ours.all_anchors) != pytest.approx(p["anchors"], rel=1e-6):
                diffs.append((i, "anchors", ours.all_anchors, p["anchors"]))
            for k in ("scale_x_y", "new_coords", "nms_kind", "beta_nms", "ignore_thresh",
                      "iou_normalizer", "iou_loss", "iou_thresh"):
                mine = getattr(ours, k) if hasattr(ours, k) else ours.train[k]
                same = mine == p[k] if isinstance(p[k], str) else mine == pytest.approx(p[k], rel=1e-6)
                if not same:
                    diffs.append((i, k, mine, p[k]))
    total = sum(l.weight_floats for l in graph.layers if not l.dontload)
    if total != layout["total_weight_floats"]:
        diffs.append(("total_weight_floats", total, layout["total_weight_floats"]))
    if abs(graph.total_bflops - layout["total_bflops"]) > 1e-4 * layout["total_bflops"]:
        diffs.append(("total_bflops", graph.total_bflops, layout["total_bflops"]))
    return diffs


@needs_shared
def test_layout_count():
    assert len(LAYOUTS) == 86


@needs_shared
@pytest.mark.parametrize("cfg_rel,layout", LAYOUTS, ids=[c for c, _ in LAYOUTS])
def test_shapes_and_weights_match_darknet(cfg_rel, layout):
    ref = json.loads((ORACLE / "layouts" / layout).read_text())
    graph = _graph(cfg_rel)
    assert compare_layout(graph, ref) == []
    # the modules (built without memory on the meta device) hold exactly those segments
    model = DarknetModel(graph, device="meta")
    assert sum(t.numel() for _, ts in iter_layer_tensors(model) for _, t in ts) == \
        graph.total_weight_floats
    # summary --json carries the same figures
    records = summary_dict(graph)["layers"]
    assert [r["weight_floats"] for r in records] == [l.weight_floats for l in graph.layers]


@needs_shared
def test_oracle_model_layouts_at_run_size():
    """The oracle models run at sizes other than the cfg's: width/height overrides."""
    for d in sorted((ORACLE / "models").iterdir()):
        meta = json.loads((d / "meta.json").read_text())
        ref = json.loads((d / "layout.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = build_graph(d / "model.cfg", meta["width"], meta["height"])
        assert compare_layout(graph, ref) == [], d.name


@needs_shared
def test_every_cfg_runs_forward_with_the_specs_shapes():
    """Forward on the meta device (no memory, no arithmetic): every module produces exactly the
    shape its spec promises, for all the cfgs Darknet parses, with a batch of 2."""
    for cfg_rel, _ in LAYOUTS:
        graph = _graph(cfg_rel)
        model = DarknetModel(graph, device="meta").eval()
        n = graph.net
        with torch.no_grad():
            outs = model.forward_all(torch.empty(2, n.channels, n.height, n.width, device="meta"))
        for spec, out in zip(graph.layers, outs):
            if spec.flat:
                assert out[0].numel() == spec.outputs, (cfg_rel, spec.index)
            else:
                assert tuple(out.shape) == (2, *spec.out_shape.as_list()), (cfg_rel, spec.index)
