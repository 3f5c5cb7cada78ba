"""`darknet-cfg map` against Darknet's own `detector map` printouts (shared/oracle/map/):
every figure line of every argument set, parsed from the oracle's text files."""
import re

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ORACLE, needs_shared

MAP = ORACLE / "map"
ARGS = re.compile(r"(iou_thresh|thresh|points)_([0-9.]+)")
FIGURES = ("detections_count", "class_id", "for conf_thresh", "IoU threshold",
           "mean average precision")

pytestmark = needs_shared


def _cases():
    """(name, {option: value}) from the file names darknet_map_<option>_<value>....txt"""
    if not MAP.is_dir():
        return []
    out = []
    for p in sorted(MAP.glob("darknet_map_*.txt")):
        name = p.stem[len("darknet_map_"):]
        kw = {k: (int(v) if k == "points" else float(v)) for k, v in ARGS.findall(name)}
        out.append(pytest.param(name, kw, id=name))
    return out


def figure_lines(text):
    """The lines a Darknet map printout and ours must share (progress \\r's removed)."""
    lines = [ln.replace("\r", "") for ln in text.splitlines()]
    return [ln for ln in lines if ln.lstrip().startswith(FIGURES)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("map")
    images = sorted(str(p) for p in (MAP / "images").glob("*.png"))
    (d / "valid.txt").write_text("\n".join(images) + "\n")
    data = d / "obj.data"
    data.write_text(f"classes = 3\nvalid = {d / 'valid.txt'}\nnames = {MAP / 'obj.names'}\n")
    return data


@pytest.fixture(scope="module")
def detections(dataset):
    """The model run once over the 100 images: what every argument set is evaluated from."""
    import darknet_cfg
    from darknet_cfg.data import read_data_file, read_list, scan_dataset
    from darknet_cfg.evaluate import predict
    d = read_data_file(dataset)
    scan = scan_dataset(read_list(d.valid), d.classes)
    model = darknet_cfg.load(MAP / "model.cfg", MAP / "model.weights")
    return predict(model, scan.images), scan.labels, d


@pytest.mark.parametrize("name,kw", _cases())
def test_every_figure_line(detections, name, kw):
    from darknet_cfg.evaluate import compute_map, format_report
    dets, labels, d = detections
    want = figure_lines((MAP / f"darknet_map_{name}.txt").read_text())
    assert all(any(ln.lstrip().startswith(f) for ln in want) for f in FIGURES)
    got = figure_lines(format_report(compute_map(dets, labels, d.classes, **kw), d.class_names()))
    assert got == want


def test_cli_prints_darknets_lines(dataset):
    """The command line, once (it runs the model itself), on the argument set that moves
    the most: thresh 0.5."""
    from darknet_cfg.cli import main
    name = "points_0_thresh_0.5"
    r = CliRunner().invoke(main, ["map", str(dataset), str(MAP / "model.cfg"),
                                  str(MAP / "model.weights"), "-thresh", "0.5", "--no-coco"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = r.stdout if hasattr(r, "stdout") else r.output
    assert figure_lines(out) == figure_lines((MAP / f"darknet_map_{name}.txt").read_text())


def test_first_detection_in_darknets_order_takes_the_truth():
    """At thresh, the detection met first in the walk takes the truth, even one below thresh:
    here the low-prob box comes first, so the high-prob duplicate is a false positive."""
    from darknet_cfg.evaluate import compute_map
    from darknet_cfg.postprocess import Detections
    boxes = np.float32([[.5, .5, .4, .4], [.51, .5, .4, .4]])
    probs = np.float32([[0.1], [0.9]])
    z = np.zeros(2, np.int64)
    dets = [Detections(boxes, np.ones(2, np.float32), probs, z, z, z, z, z)]
    truths = [np.float32([[0, .5, .5, .4, .4]])]
    r = compute_map(dets, truths, 1)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)
    assert r["ap"][0] == pytest.approx(1.0)  # the AP ranks by prob: the 0.9 box takes it there
