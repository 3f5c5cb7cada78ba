"""`darknet-cfg verify` against a stand-in Darknet executable (CI has no Darknet build).

The stand-in (written below into tmp_path, a Python script with a shebang) speaks Darknet's CLI as
darknet_cfg/darknet_exe.py expects it: `detector test DATA CFG WEIGHTS -dont_show -ext_output
-out FILE -thresh T` and `classifier predict DATA CFG WEIGHTS`, image paths on stdin, startup
lines that reveal the build, `Cannot load image` + bad.list for unreadable images. Its answers
are our own results (computed once per test by the test, keyed by the image's real path) with
controlled perturbations given in $STANDIN, so every verdict path and exit status is exercised.
One test replays a real Darknet run (the oracle's detections.json for yolov4-tiny on dog.png).
"""
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import darknet_cfg
from conftest import IMAGES, ORACLE, needs_shared
from darknet_cfg.cli import main
from darknet_cfg.crosscheck import TorchEngine
from darknet_cfg.darknet_exe import (parse_classifier_stdout, parse_flavour, parse_json_frames)
from darknet_cfg.verify import BORDERLINE, compare_detections, compare_topk

MINI = Path(darknet_cfg.__file__).resolve().parents[1] / "cfg" / "yolov4-tiny-mini.cfg"

STANDIN = r'''#!{python}
"""Stand-in for Darknet's CLI (darknet-cfg tests): replays precomputed results."""
import json, os, signal, sys
conf = json.loads(os.environ.get("STANDIN", "{{}}"))
args = sys.argv[1:]
def take(flag, n=0):
    if flag not in args:
        return None
    i = args.index(flag)
    val = args[i + 1] if n else True
    del args[i:i + 1 + n]
    return val
for f in ("-dont_show", "-ext_output", "-letter_box"):
    take(f)
out, thresh = take("-out", 1), float(take("-thresh", 1) or 0.25)
if conf.get("gpu"):
    print(" CUDA-version: 12040 (12040), cuDNN: 8.9.7, GPU count: 1")
else:
    print(" GPU isn't used ")
if conf.get("opencv") is not None:
    sys.stderr.write(" OpenCV version: %s\n" % conf["opencv"] if conf["opencv"]
                     else " OpenCV isn't used - data augmentation will be slow \n")
sys.stdout.flush(); sys.stderr.flush()
mode, data = args[:2], dict(l.split("=", 1) for l in open(args[2]).read().split())
names = open(data["names"]).read().splitlines()
if conf.get("names_error"):
    print(" Error: in the file %s number of names %d that isn't equal to classes=%d in the file %s "
          % (data["names"], len(names) - 1, len(names), args[3]))
results = json.load(open(conf["results"]))
js = open(out, "w") if out else None
if js:
    js.write("[\n")
for k, line in enumerate(sys.stdin):
    path = line.rstrip("\n")
    sys.stdout.write("Enter Image Path: ")
    key = os.path.basename(os.path.realpath(path))
    if k == conf.get("crash_at"):
        sys.stderr.write("free(): invalid pointer\n"); sys.stderr.flush(); js and js.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    objs = [dict(o) for o in results[os.path.realpath(path)]]
    if key in conf.get("bad", []):
        sys.stderr.write("Cannot load image \"%s\"\nSTB Reason: unknown image type\n" % path)
        open("bad.list", "a").write(path + "\n")
        objs = []
    for o in objs:
        o["x"] = o.get("x", 0) + conf.get("move", {{}}).get(key, 0)
    if key in conf.get("prob", {{}}):
        objs[0]["prob"] = conf["prob"][key]
    if key in conf.get("drop", []):
        objs = objs[1:]
    objs += conf.get("extra", {{}}).get(key, [])
    print("%s: Predicted in 12.345000 milli-seconds." % path)
    if mode == ["classifier", "predict"]:
        for o in objs:
            print("%s: %f" % (names[o["class_id"]], o["prob"]))
        continue
    if k:
        js.write(", \n")
    js.write('{{\n "frame_id":%d, \n "filename":"%s", \n "objects": [ \n' % (k + 1, path))
    js.write(", \n".join(
        '  {{"class_id":%d, "name":"%s", "relative_coordinates":{{"center_x":%f, "center_y":%f, '
        '"width":%f, "height":%f}}, "confidence":%f}}'
        % (o["class_id"], names[o["class_id"]], o["x"], o["y"], o["w"], o["h"], o["prob"])
        for o in objs))
    js.write("\n ] \n}}")
if js:
    js.write("\n]")
'''


def _image(path, w, h, seed):
    import cv2
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float64)[None, :, None] * np.ones((h, 1, 3))
    img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """yolov4-tiny-mini weights (random; head convolutions scaled up and the objectness bias
    lowered so that ~15 boxes per image pass 0.25) and 2 PNGs."""
    d = tmp_path_factory.mktemp("mini")
    torch.manual_seed(0)
    model = darknet_cfg.build_model(MINI)
    with torch.no_grad():
        for spec in model.heads:
            conv = model.layers[spec.index - 1].conv
            for k in range(3):  # objectness and class logits of each anchor: random init
                conv.weight[8 * k + 4:8 * k + 8] *= 1000.0  # gives them a std of ~3e-3
            conv.bias[4::8] -= 10.0  # objectness
            conv.bias[5::8] += 1.0   # class 0
    weights = d / "mini.weights"
    darknet_cfg.save_weights(model, weights)
    images = [_image(d / "a.png", 160, 120, 1), _image(d / "b.png", 100, 130, 2)]
    return MINI, weights, images


def _ours(cfg, weights, images, kind="detector", names=None, **kw):
    model = darknet_cfg.load(cfg, weights).fuse()
    classes = model.heads[-1].classes if kind == "detector" else \
        model.graph.layers[model.output_indices[-1]].outputs
    names = names or [str(i) for i in range(classes)]
    eng = TorchEngine(model, kind, names, **kw)
    return {os.path.realpath(p): r for p, r in zip(images, eng.run([str(p) for p in images]))}


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """Write the stand-in; returns set(results, **conf) -> path of the executable."""
    exe = tmp_path / "bin" / "darknet"
    exe.parent.mkdir()
    exe.write_text(STANDIN.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv("DARKNET", raising=False)

    def configure(results, **conf):
        rpath = tmp_path / "results.json"
        rpath.write_text(json.dumps(results))
        monkeypatch.setenv("STANDIN", json.dumps(dict(conf, results=str(rpath))))
        return exe
    return configure


def _verify(*args, env=None):
    r = CliRunner().invoke(main, ["verify"] + [str(a) for a in args], catch_exceptions=False,
                           env=env)
    return r


@pytest.fixture(scope="module")
def mini_results(mini):
    cfg, weights, images = mini
    res = _ours(cfg, weights, images)
    assert all(5 <= len(v) <= 50 for v in res.values()), "the fixture should give detections"
    return res


# ------------------------------------------------------------------------------- verdict paths

def test_agree_exit_0_table_and_json(mini, mini_results, standin, tmp_path):
    cfg, weights, images = mini
    exe = standin(mini_results, opencv="4.9.0")
    report = tmp_path / "r.json"
    r = _verify(cfg, weights, *images, "--darknet", exe, "--json", report)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(ln for ln in lines if ln.startswith("image"))
    for col in ("engine", "Darknet", "ours", "matched", "max box diff", "max prob diff", "verdict"):
        assert col in header
    assert "a.png" in r.output and "b.png" in r.output
    assert "verdict: AGREE" in lines[-1]
    assert "CPU build, images decoded by OpenCV 4.9.0" in r.output
    rep = json.loads(report.read_text())
    assert rep["ok"] and rep["darknet"]["opencv"] == "4.9.0"
    img = rep["images"][0]
    assert img["engines"]["pytorch"]["verdict"] == "agree"
    assert len(img["darknet"]) == len(img["engines"]["pytorch"]["objects"])
    assert img["engines"]["pytorch"]["max_box"] <= 1e-6  # %f rounding only


def test_moved_box_differs_exit_1(mini, mini_results, standin):
    cfg, weights, images = mini
    exe = standin(mini_results, move={"a.png": 1e-3})
    r = _verify(cfg, weights, *images, "--darknet", exe)
    assert r.exit_code == 1
    row = next(ln for ln in r.output.splitlines() if ln.startswith("a.png"))
    assert "DIFFERS" in row and "1.0e-03" in row
    assert "verdict: MISMATCH: PyTorch differs on 1 of 2 images" in r.output


def test_missing_and_extra_detection(mini, mini_results, standin):
    cfg, weights, images = mini
    extra = {"class_id": 2, "x": 0.5, "y": 0.5, "w": 0.1, "h": 0.1, "prob": 0.9}
    exe = standin(mini_results, drop=["b.png"], extra={"b.png": [extra]})
    r = _verify(cfg, weights, *images, "--darknet", exe)
    assert r.exit_code == 1
    row = next(ln for ln in r.output.splitlines() if ln.startswith("b.png")).split()
    n_dk, n_ours = len(mini_results[os.path.realpath(images[1])]), int(row[3])
    assert row[2] == str(n_dk) and n_ours == n_dk  # Darknet: one dropped, one added
    assert row[5:7] == ["1", "1"] and "DIFFERS" in row
    assert "b.png PyTorch: missing class 2 prob 0.900000 at (0.5000, 0.5000" in r.output
    assert "b.png PyTorch: extra class" in r.output  # the one Darknet "dropped"


def test_borderline_is_shown_and_passes(mini, mini_results, standin):
    cfg, weights, images = mini
    near = {"class_id": 1, "x": 0.3, "y": 0.3, "w": 0.2, "h": 0.2, "prob": 0.25 + 1e-5}
    exe = standin(mini_results, extra={"a.png": [near]})
    r = _verify(cfg, weights, *images, "--darknet", exe)
    assert r.exit_code == 0, r.output
    assert "agree (1 borderline)" in r.output
    assert "a.png PyTorch: borderline class 1 prob 0.250010" in r.output
    assert "1 borderline detections" in r.output


def test_jpeg_noise_without_opencv(mini, standin, tmp_path):
    cfg, weights, _ = mini
    jpg = _image(tmp_path / "c.jpg", 150, 110, 3)
    res = _ours(cfg, weights, [jpg])
    exe = standin(res, opencv="", move={"c.jpg": 2e-3})
    r = _verify(cfg, weights, jpg, "--darknet", exe)
    assert r.exit_code == 0, r.output
    assert "jpeg noise" in r.output and "stb_image" in r.output and "use PNG" in r.output
    exe = standin(res, opencv="4.5.4", move={"c.jpg": 2e-3})  # same decoder family: a mismatch
    r = _verify(cfg, weights, jpg, "--darknet", exe)
    assert r.exit_code == 1 and "DIFFERS" in r.output
    exe = standin(res, opencv="", move={"c.jpg": 0.05})  # beyond decoder noise
    assert _verify(cfg, weights, jpg, "--darknet", exe).exit_code == 1


def test_gpu_build_is_noted(mini, mini_results, standin):
    cfg, weights, images = mini
    r = _verify(cfg, weights, *images, "--darknet", standin(mini_results, gpu=True))
    assert r.exit_code == 0 and "GPU build" in r.output and "use a CPU build" in r.output


# ------------------------------------------------------------------------------- failure modes

def test_crash_shows_last_stderr_lines(mini, mini_results, standin):
    cfg, weights, images = mini
    r = _verify(cfg, weights, *images, "--darknet", standin(mini_results, crash_at=1))
    assert r.exit_code == 1
    assert "error: Darknet crashed (SIGSEGV) after 1 of 2 images: free(): invalid pointer" \
        in r.output
    assert "Traceback" not in r.output


def test_unreadable_image(mini, mini_results, standin):
    cfg, weights, images = mini
    r = _verify(cfg, weights, *images, "--darknet", standin(mini_results, bad=["b.png"]))
    assert r.exit_code == 1
    assert "unreadable" in r.output
    assert f"error: {images[1]}: Darknet could not read it (unknown image type)" in r.output
    assert "Darknet could not read 1 images" in r.output


def test_not_found_not_executable_not_on_path(mini, tmp_path, monkeypatch):
    cfg, weights, images = mini
    r = _verify(cfg, weights, images[0], "--darknet", tmp_path / "nope")
    assert r.exit_code == 1 and f"error: Darknet: {tmp_path / 'nope'}: no such file" in r.output
    plain = tmp_path / "darknet"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    r = _verify(cfg, weights, images[0], "--darknet", plain)
    assert r.exit_code == 1 and "is not executable (chmod +x" in r.output
    monkeypatch.delenv("DARKNET", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = _verify(cfg, weights, images[0])
    assert r.exit_code == 1 and "no Darknet executable: pass --darknet PATH or set $DARKNET" \
        in r.output
    monkeypatch.setenv("DARKNET", str(plain))
    assert "is not executable" in _verify(cfg, weights, images[0]).output


def test_names_count_and_nms(mini, mini_results, standin, tmp_path):
    cfg, weights, images = mini
    exe = standin(mini_results)
    names = tmp_path / "two.names"
    names.write_text("circle\nsquare\n")
    r = _verify(cfg, weights, images[0], "--darknet", exe, "--names", names)
    assert r.exit_code == 1
    assert f"error: {names}: 2 names but the model has 3 classes (Darknet needs" in r.output
    r = _verify(cfg, weights, images[0], "--darknet", exe, "--nms", "0.5")
    assert r.exit_code == 1 and "always uses 0.45" in r.output
    r = _verify(cfg, weights, images[0], "--darknet", standin(mini_results, names_error=True))
    assert r.exit_code == 1
    assert "error: Darknet: its model has classes=3 but 2 names were given" in r.output


# --------------------------------------------------------------------------------- classifier

CLASSIFIER_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=7
size=1
stride=1
pad=1
activation=linear

[avgpool]

[softmax]
groups=1
"""


def test_classifier_top5(tmp_path, standin):
    cfg = tmp_path / "cls.cfg"
    cfg.write_text(CLASSIFIER_CFG)
    torch.manual_seed(1)
    weights = tmp_path / "cls.weights"
    darknet_cfg.save_weights(darknet_cfg.build_model(cfg), weights)
    images = [_image(tmp_path / "p.png", 50, 40, 4), _image(tmp_path / "q.png", 40, 60, 5)]
    res = _ours(cfg, weights, images, kind="classifier")
    assert all(len(v) == 5 for v in res.values())
    r = _verify(cfg, weights, *images, "--darknet", standin(res))
    assert r.exit_code == 0, r.output
    assert r.output.count("agree") == 2
    first = res[os.path.realpath(images[1])][0]["prob"]
    r = _verify(cfg, weights, *images, "--darknet", standin(res, prob={"q.png": first + 1e-3}))
    assert r.exit_code == 1 and "DIFFERS" in r.output


# ------------------------------------------------------------------------- ONNX and OpenCV

@pytest.mark.onnx
def test_onnx_column_raw_and_decoded(mini, mini_results, standin, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from darknet_cfg.export import export_onnx
    cfg, weights, images = mini
    exe = standin(mini_results)
    for decode in (False, True):
        onnx = tmp_path / f"m{int(decode)}.onnx"
        export_onnx(darknet_cfg.load(cfg, weights).fuse(), onnx, decode=decode)
        r = _verify(cfg, weights, *images, "--darknet", exe, "--onnx", onnx)
        assert r.exit_code == 0, r.output
        rows = [ln for ln in r.output.splitlines() if "ONNX" in ln.split()[:2]]
        assert len(rows) == 2 and all("agree" in ln for ln in rows), r.output
        assert "PyTorch and ONNX give Darknet's results" in r.output


def test_opencv_column_explained_not_failing(mini, mini_results, standin, tmp_path):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        pytest.skip("OpenCV without readNetFromDarknet")
    cfg, weights, images = mini
    r = _verify(cfg, weights, *images, "--darknet", standin(mini_results), "--opencv")
    assert r.exit_code == 0, r.output  # OpenCV rows never fail the check
    rows = [ln for ln in r.output.splitlines() if ln.split()[:1] == ["OpenCV"]
            and ln.split()[1] != "differs"]
    assert len(rows) == 2
    assert "OpenCV differs from Darknet by design: batch-norm eps 1e-06" in r.output
    assert "not Darknet's resize_image" in r.output
    # letter_box=1: OpenCV stretches instead, named as a documented difference
    r = _verify(cfg, weights, *images, "--darknet", standin(_ours(cfg, weights, images,
                                                                  letter_box=True)),
                "--opencv", "--letter-box")
    assert r.exit_code == 0, r.output
    assert "no letter_box: OpenCV stretches the image" in r.output


# ---------------------------------------------------------------- a real Darknet run, replayed

@needs_shared
def test_replayed_darknet_run_yolov4_tiny(standin, tmp_path):
    """The oracle's detections.json is Darknet's own output for dog.png: replayed through the
    stand-in as Darknet's -out JSON, verify must find our boxes identical."""
    from conftest import oracle_io
    oio = oracle_io()
    m = oio.load_model("yolov4-tiny")
    weights = tmp_path / "w.weights"
    weights.write_bytes(oio.weights_bytes(m.layout, m.meta))
    ref = json.loads((ORACLE / "models" / "yolov4-tiny" / "detections.json").read_text())
    objs = [{"class_id": c, "x": b["bbox"][0], "y": b["bbox"][1], "w": b["bbox"][2],
             "h": b["bbox"][3], "prob": p} for b in ref["boxes"] for c, p in b["probs"]]
    assert objs
    image = IMAGES / "dog.png"
    exe = standin({os.path.realpath(image): objs}, opencv="")
    r = _verify(ORACLE / "models" / "yolov4-tiny" / "model.cfg", weights, image, "--darknet", exe,
                "--width", m.meta["width"], "--height", m.meta["height"])
    assert r.exit_code == 0, r.output
    assert "verdict: AGREE" in r.output and f"  {len(objs)} " in r.output


# ------------------------------------------------------------------------ units of the module

def test_parsers():
    fl = parse_flavour(" GPU isn't used \n OpenCV isn't used - data augmentation will be slow \n")
    assert fl.gpu is False and fl.opencv == "" and fl.decoder == "stb_image"
    assert parse_flavour(" OpenCV version: 4.5.4\n").opencv == "4.5.4"
    assert parse_flavour("OpenCV v4.10.0\n").opencv == "4.10.0"  # hank.ai fork
    assert parse_flavour("").decoder == "unknown"
    partial = ('[\n{\n "frame_id":1, \n "filename":"x.png", \n "objects": [ \n  {"class_id":0, '
               '"name":"a", "relative_coordinates":{"center_x":0.5, "center_y":0.25, '
               '"width":0.1, "height":0.2}, "confidence":0.75}\n ] \n}')  # crashed before "]"
    fr = parse_json_frames(partial)
    assert fr == [{"filename": "x.png", "objects": [{"class_id": 0, "x": 0.5, "y": 0.25,
                                                     "w": 0.1, "h": 0.2, "prob": 0.75}]}]
    out = ("Enter Image Path: 32 32\n/t/a.png: Predicted in 1.5 milli-seconds.\n3: 0.600000\n"
           "1: 0.300000\nEnter Image Path: ")
    assert parse_classifier_stdout(out, 2) == {"/t/a.png": [{"class_id": 3, "prob": 0.6},
                                                            {"class_id": 1, "prob": 0.3}]}


def test_matching_rule_greedy_by_iou():
    box = lambda x, p, c=0: {"class_id": c, "x": x, "y": 0.5, "w": 0.2, "h": 0.2, "prob": p}
    # the closer pair is taken first even though the other pair was listed first
    c = compare_detections("pytorch", [box(0.50, 0.9), box(0.56, 0.8)], [box(0.55, 0.8)], 0.25)
    assert c.matched == 1 and len(c.missing) == 1 and c.missing[0]["x"] == 0.50
    c = compare_detections("pytorch", [box(0.5, 0.9)], [box(0.5, 0.9, c=1)], 0.25)
    assert c.matched == 0 and len(c.missing) == 1 and len(c.extra) == 1  # classes never match
    c = compare_detections("pytorch", [box(0.5, 0.9), box(0.2, 0.25 + BORDERLINE / 2)],
                           [box(0.5, 0.9 + 5e-5)], 0.25)
    assert c.verdict == "agree" and len(c.borderline) == 1 and c.max_prob == pytest.approx(5e-5)
    t = compare_topk("pytorch", [{"class_id": 1, "prob": 0.5}, {"class_id": 2, "prob": 0.3}],
                     [{"class_id": 2, "prob": 0.5}, {"class_id": 1, "prob": 0.3}])
    assert t.verdict == "DIFFERS"
