"""The generated Scaled-YOLOv4 family (darknet_cfg.zoo): presets equal Darknet's published cfgs
layer for layer, scaling options, presets by name, and the documented new points train."""
import dataclasses
import json
import os
import re
import warnings

import pytest
import torch
from click.testing import CliRunner

import darknet_cfg
from darknet_cfg import build_graph, build_model, save_weights
from darknet_cfg.cli import darknet2torch, main
from darknet_cfg.reader import parse_cfg_text, read_cfg, with_net_overrides, write_cfg
from darknet_cfg.synth import make_synthetic
from darknet_cfg.train import Trainer, TrainOptions
from darknet_cfg.zoo import PRESETS, PresetNotice, SpecError, generate_text, get_preset, scale

from conftest import ORACLE, UPSTREAM_CFG, needs_shared
from test_layouts import compare_layout

_NUM = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _graph(source, name="gen"):
    """Graph of cfg text (a str) or of a cfg file (a Path), warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_graph(parse_cfg_text(source, name) if isinstance(source, str) else source)


def _value(v: str):
    """A cfg value as Darknet reads it: comma lists of numbers compare as numbers (.1 == 0.1)."""
    items = v.split(",")
    if all(_NUM.match(x) for x in items):
        return [float(x) for x in items]
    return v


def _values(section):
    return {k: _value(v) for k, v in section.values().items()}


def _sources_differ(ours, ref):
    """Route/shortcut/sam sources, route groups, conv activation and stopbackward vs Darknet."""
    p = ref["params"]
    if ours.type == "route":
        if list(ours.inputs) != p["layers"] or (ours.groups, ours.group_id) != (p["groups"],
                                                                               p["group_id"]):
            return (ours.index, "route", ours.inputs, p["layers"])
    elif ours.type == "shortcut" and list(ours.inputs[1:]) != p["from"]:
        return (ours.index, "shortcut from", ours.inputs, p["from"])
    elif ours.type == "sam" and ours.inputs[1] != p["from"]:
        return (ours.index, "sam from", ours.inputs, p["from"])
    elif ours.type == "convolutional" and ours.conv.activation != p["activation"]:
        return (ours.index, "activation", ours.conv.activation, p["activation"])
    if ours.stopbackward != ref["stopbackward"]:
        return (ours.index, "stopbackward", ours.stopbackward, ref["stopbackward"])
    return None


@needs_shared
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_is_darknets_cfg(name):
    """Layout-identical to the layout Darknet produced for cfg/<name>.cfg (types, shapes, sources,
    .weights segments, BFLOPs), and the same [net] and [yolo] values: every key of [net] and of
    each [yolo] section, numbers compared as Darknet reads them; nothing excluded (comments
    and blank lines are not keys)."""
    ours = _graph(generate_text(PRESETS[name]), name)
    ref = json.loads((ORACLE / "layouts" / f"{name}.json").read_text())
    assert compare_layout(ours, ref) == []
    assert [d for o, r in zip(ours.layers, ref["layers"]) if (d := _sources_differ(o, r))] == []
    # [net] and [yolo] values, raw and typed
    up_cfg = read_cfg(UPSTREAM_CFG / f"{name}.cfg")
    assert _values(ours.cfg.net) == _values(up_cfg.net)
    mine = [s for s in ours.cfg.sections if s.name == "yolo"]
    theirs = [s for s in up_cfg.sections if s.name == "yolo"]
    assert [_values(s) for s in mine] == [_values(s) for s in theirs]
    up = _graph(UPSTREAM_CFG / f"{name}.cfg")
    assert ours.net == up.net
    strip = dict(line=0, section="")
    assert [dataclasses.replace(y, **strip) for y in ours.layers if y.type == "yolo"] == \
        [dataclasses.replace(y, **strip) for y in up.layers if y.type == "yolo"]


def test_generated_cfg_has_one_comment_per_block_and_only_darknet_keys():
    text = generate_text(PRESETS["yolov4-csp"])
    comments = [line for line in text.splitlines() if line.startswith("#")]
    # header + stem + 5 stages + SPP + 2 top-down + 2 bottom-up + 3 heads
    assert len(comments) == 15
    assert any("SPP-CSP" in c for c in comments) and any("head P5" in c for c in comments)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unused (non-Darknet) key would warn
        build_graph(parse_cfg_text(text, "csp"))


def test_default_scaling_is_the_identity_and_p5_extends_to_the_published_p6():
    for name, spec in PRESETS.items():
        assert scale(spec) == spec, name
    p6 = scale(PRESETS["yolov4-p5"], stages=6, size=1280, name="yolov4-p6")
    assert p6 == PRESETS["yolov4-p6"]


def test_rounding_rules():
    s = scale(PRESETS["yolov4-csp"], depth=0.33, width=0.5)
    assert s.depths == (1, 1, 3, 3, 2) and s.pan_depth == 1
    assert s.widths == (32, 64, 128, 256, 512) and s.stem == 16 and s.neck == (64, 128, 256)
    x = scale(PRESETS["yolov4x-mish"], width=0.3)          # 80 * 0.3 = 24; 40 * 0.3 = 12 -> 16
    assert x.widths[0] == 24 and x.plain_hidden == 16


def test_classes_recompute_head_filters():
    g = _graph(generate_text(scale(PRESETS["yolov4-p5"], classes=3)))
    heads = [l for l in g.layers if l.type == "yolo"]
    assert [h.classes for h in heads] == [3, 3, 3]
    assert all(g.layers[h.index - 1].out_shape.c == (3 + 5) * 4 for h in heads)


@pytest.mark.parametrize("kw,message", [
    (dict(size=500), "size 500 is not a multiple of the network's largest stride 32"),
    (dict(stages=6, size=608), "size 608 is not a multiple of the network's largest stride 64"),
    (dict(stages=7, anchors="1,2,3,4/5,6,7,8/9,10,11,12"),
     "--anchors gives 3 levels but the network has 5 detection levels"),
    (dict(stages=7, anchors="1,2,3,4,5,6"), "3 anchors do not split evenly over 5 levels"),
    (dict(width=0.01), "would have 0 filters"),
    (dict(stages=4), "--stages must be 5, 6 or 7"),
    (dict(depth=0), "--depth and --width must be > 0"),
])
def test_contradictory_options_are_errors(kw, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        scale(PRESETS["yolov4-csp"], **kw)


def test_tiny_rejects_stages_and_depth():
    with pytest.raises(SpecError, match="fixed number of stages"):
        scale(PRESETS["yolov4-tiny"], stages=6)
    with pytest.raises(SpecError, match="no repeated blocks"):
        scale(PRESETS["yolov4-tiny"], depth=0.5)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SpecError, match="known presets: yolov4-csp, .*yolov4-tiny-3l"):
        get_preset("yolov4-nano")
    r = CliRunner().invoke(main, ["scale", "yolov4-nano"])
    assert r.exit_code == 1 and "known presets: yolov4-csp" in r.stderr


def test_scale_cli_writes_nothing_on_error_and_a_cfg_otherwise(tmp_path):
    out = tmp_path / "x.cfg"
    r = CliRunner().invoke(main, ["scale", "yolov4-csp", "--stages", "7", "--anchors",
                                  "1,2,3,4/5,6,7,8/9,10,11,12", "-o", str(out)])
    assert r.exit_code == 1 and "5 detection levels" in r.stderr and not out.exists()
    assert not list(tmp_path.iterdir())
    r = CliRunner().invoke(main, ["scale", "yolov4-csp", "--width", "0.01", "-o", str(out)])
    assert r.exit_code == 1 and "0 filters" in r.stderr and not out.exists()
    r = CliRunner().invoke(main, ["scale", "yolov4-tiny", "--width", "0.5", "--classes", "2",
                                  "--size", "256", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "38 layers" in r.stderr
    g = _graph(out)
    assert (g.net.width, g.layers[-1].classes) == (256, 2)


def test_zoo_lists_every_preset():
    r = CliRunner().invoke(main, ["zoo"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert list(rows) == list(PRESETS)
    assert rows["yolov4-csp"][1:3] == ["512", "175"] and rows["yolov4-tiny"][4] == "6.91"


def test_preset_names_resolve_where_no_file_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(PresetNotice, match="yolov4-tiny.cfg is not a file: using the built-in"):
        cfg = read_cfg("yolov4-tiny.cfg")
    assert cfg.text == generate_text(PRESETS["yolov4-tiny"]) and cfg.path == "yolov4-tiny.cfg"
    # an existing file always wins
    (tmp_path / "yolov4-tiny.cfg").write_text("[net]\nwidth=32\nheight=32\nchannels=3\n"
                                              "[convolutional]\nfilters=4\nsize=1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PresetNotice)
        assert len(build_graph("yolov4-tiny.cfg").layers) == 1
    # a path with a folder is never a preset
    with pytest.raises(darknet_cfg.DarknetCfgError, match="cannot read cfg"):
        read_cfg("sub/yolov4-csp.cfg")


def test_darknet2torch_preset_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder (click's isolated_filesystem is deprecated)
    r = CliRunner().invoke(darknet2torch, ["yolov4-csp.cfg"])
    assert r.exit_code == 0, r.output
    assert os.listdir(tmp_path) == ["yolov4-csp.pt"]
    notes = [line for line in r.stderr.splitlines() if "preset" in line]
    assert notes == ["warning: yolov4-csp.cfg is not a file: using the built-in preset "
                     "yolov4-csp (generated by darknet_cfg.zoo)"]
    assert len(darknet_cfg.load("yolov4-csp.pt").layers) == 175


# ---- documented new points (README: The Scaled-YOLOv4 family) -------------------------------------------
# name: (preset, options); each builds at its size, and at a small training size runs a
# forward, trains 5 iterations and round-trips its .weights byte for byte.
NEW_POINTS = {
    "csp-d033-w050": ("yolov4-csp", dict(depth=0.33, width=0.5, size=416)),
    "csp-p6-w050": ("yolov4-csp", dict(stages=6, width=0.5, size=1024)),
    "csp-s-leaky-w050": ("yolov4-csp-s-mish", dict(activation="leaky", width=0.5, size=320)),
    "p7-d033-w025": ("yolov4-p6", dict(stages=7, depth=0.33, width=0.25, size=1536)),
    "p7sam-p5-d033-w025": ("cspx-p7-mish", dict(stages=5, depth=0.33, width=0.25, size=512)),
    "tiny-w050": ("yolov4-tiny", dict(width=0.5, size=256)),
    "cspx-swish-c3": ("yolov4-csp-x-swish", dict(
        depth=0.33, width=0.25, classes=3, size=608,
        anchors="10,13,16,30,33,23/30,61,62,45,59,119/116,90,156,198,373,326")),
    "tiny-3l-mish-w075": ("yolov4-tiny-3l", dict(width=0.75, activation="mish", size=320)),
}
# (layers, parameters in millions, BFLOPs at the point's size), as the README table says
NEW_POINT_FIGURES = {
    "csp-d033-w050": (128, 9.98, 9.18), "csp-p6-w050": (223, 24.44, 84.43),
    "csp-s-leaky-w050": (112, 2.13, 1.40), "p7-d033-w025": (232, 7.48, 39.68),
    "p7sam-p5-d033-w025": (153, 4.10, 6.52), "tiny-w050": (38, 1.57, 0.67),
    "cspx-swish-c3": (137, 4.17, 8.08), "tiny-3l-mish-w075": (45, 3.60, 2.81),
}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("zoo"), images=4, classes=3, size=64, valid=1,
                          seed=5)


def _data_for(synth, classes, tmp_path):
    """The synthetic set (classes 0-2) declared with ``classes`` classes, as the point's heads."""
    names = tmp_path / "k.names"
    names.write_text("".join(f"c{i}\n" for i in range(classes)))
    text = open(synth["data"]).read()
    text = re.sub(r"(?m)^classes\s*=.*$", f"classes={classes}", text)
    text = re.sub(r"(?m)^names\s*=.*$", f"names={names}", text)
    data = tmp_path / "k.data"
    data.write_text(text)
    return str(data)


def test_new_point_figures_match_the_readme():
    from darknet_cfg.cli_zoo import _params
    for name, (preset, kw) in NEW_POINTS.items():
        g = _graph(generate_text(scale(PRESETS[preset], name=name, **kw)))
        figures = (len(g.layers), round(_params(g) / 1e6, 2), round(g.total_bflops, 2))
        assert figures == NEW_POINT_FIGURES[name], name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEW_POINTS))
def test_new_point_builds_runs_trains_and_roundtrips(name, synth_data, tmp_path):
    preset, kw = NEW_POINTS[name]
    spec = scale(PRESETS[preset], name=name, **kw)
    text = generate_text(spec)
    # a small size with a 2x2 grid at the deepest level (at 1x1, with a batch of 2, the
    # 6-stage point's first step gives a NaN loss: see the README fragment)
    small = max(64, 2 * spec.stride)
    cfg = with_net_overrides(parse_cfg_text(text, name), width=small, height=small, batch=2,
                             subdivisions=1, max_batches=5, burn_in=2, mosaic=0)
    path = tmp_path / f"{name}.cfg"
    path.write_text(write_cfg(cfg))
    torch.manual_seed(0)
    model = build_model(str(path)).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, small, small))
    assert len(outs) == spec.detect.levels and all(torch.isfinite(o).all() for o in outs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Trainer(TrainOptions(data=_data_for(synth_data, spec.detect.classes, tmp_path),
                                  cfg=str(path), backup=str(tmp_path / "backup"), workers=0,
                                  progress=False, log=lambda m: None))
        res = tr.run()
    assert res["iteration"] == 5
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.o.history)
    final = tr.names["final"]
    again = tmp_path / "again.weights"
    save_weights(darknet_cfg.load(str(path), final), again)
    assert again.read_bytes() == open(final, "rb").read()
