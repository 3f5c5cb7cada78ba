"""darknet2torch, torch2darknet and darknet-cfg summary/partial, as a user runs them."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner

import darknet_cfg
from darknet_cfg.cli import darknet2torch, main, torch2darknet

from conftest import ORACLE, UPSTREAM_CFG, needs_shared, oracle_io
from test_weights import SMALL_CFG, SMALL_SEGMENTS


@pytest.fixture()
def small(tmp_path):
    cfg = tmp_path / "small.cfg"
    cfg.write_text(SMALL_CFG)
    weights = tmp_path / "small.weights"
    darknet_cfg.save_weights(darknet_cfg.build_model(cfg), weights)
    return cfg, weights


def run(cmd, args, cwd=None):
    return CliRunner().invoke(cmd, [str(a) for a in args], catch_exceptions=False)


def test_darknet2torch_and_back(small, tmp_path, monkeypatch):
    cfg, weights = small
    monkeypatch.chdir(tmp_path)
    r = run(darknet2torch, [cfg])  # finds small.weights beside the cfg
    assert r.exit_code == 0, r.output
    assert "loaded" in r.output and (tmp_path / "small.pt").is_file()
    r = run(torch2darknet, [tmp_path / "small.pt", "-o", tmp_path / "back.weights"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "back.weights").read_bytes() == weights.read_bytes()


def test_darknet2torch_without_weights_says_random(tmp_path, monkeypatch):
    cfg = tmp_path / "noweights.cfg"
    cfg.write_text(SMALL_CFG)
    monkeypatch.chdir(tmp_path)
    r = CliRunner(mix_stderr=False).invoke(darknet2torch, [str(cfg), "-o", "x.pt", "--width", "32",
                                                           "--height", "32"]) \
        if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else \
        CliRunner().invoke(darknet2torch, [str(cfg), "-o", "x.pt", "--width", "32", "--height", "32"])
    assert r.exit_code == 0
    assert "randomly initialised" in (r.output + getattr(r, "stderr", ""))
    m = darknet_cfg.load(tmp_path / "x.pt")
    assert (m.width, m.height) == (32, 32)


def test_errors_exit_1_without_traceback(tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=x\n")
    for cmd, args in ((darknet2torch, [bad]), (main, ["summary", bad]),
                      (torch2darknet, [bad])):
        r = CliRunner().invoke(cmd, [str(a) for a in args])
        assert r.exit_code == 1, r.output
        assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["summary", str(bad)])
    assert f"{bad}:6: [convolutional] filters: bad number 'x'" in r.output


def test_truncated_weights_error_and_partial_flag(small, tmp_path):
    cfg, weights = small
    cut = tmp_path / "cut.weights"
    cut.write_bytes(weights.read_bytes()[:20 + 4 * SMALL_SEGMENTS[0]])
    r = CliRunner().invoke(darknet2torch, [str(cfg), str(cut), "-o", str(tmp_path / "o.pt")])
    assert r.exit_code == 1 and "weights end at layer 1 [convolutional]" in r.output
    assert not (tmp_path / "o.pt").exists()
    r = run(darknet2torch, [cfg, cut, "-o", tmp_path / "o.pt", "--partial"])
    assert r.exit_code == 0 and "partial" in r.output


def test_summary_text_and_json(small):
    cfg, _ = small
    r = run(main, ["summary", cfg])
    assert r.exit_code == 0 and "Total BFLOPS" in r.output
    r = run(main, ["summary", cfg, "--json", "--width", "32", "--height", "32"])
    data = json.loads(r.output)
    assert data["layers"][0]["input"] == [3, 32, 32] and data["layers"][0]["output"] == [4, 32, 32]
    assert {"index", "type", "input", "output", "weight_floats"} <= set(data["layers"][0])
    assert data["total_weight_floats"] > sum(SMALL_SEGMENTS)  # [local] grows with the size
    data = json.loads(run(main, ["summary", cfg, "--json"]).output)
    assert data["total_weight_floats"] == sum(SMALL_SEGMENTS)


def test_partial_writes_first_layers_with_seen_zero(small, tmp_path):
    cfg, weights = small
    model = darknet_cfg.load(cfg, weights)
    model.header["seen"] = 999
    darknet_cfg.save_weights(model, weights)
    out = tmp_path / "p.weights"
    r = run(main, ["partial", cfg, weights, out, 2])
    assert r.exit_code == 0, r.output
    raw, src = out.read_bytes(), weights.read_bytes()
    n = sum(SMALL_SEGMENTS[:2])
    assert raw[:20] == src[:12] + b"\0" * 8 and len(raw) == 20 + 4 * n
    assert raw[20:] == src[20:20 + 4 * n]
    report = darknet_cfg.load_weights(darknet_cfg.build_model(cfg), out, strict=False)
    assert report.layers_loaded == 2


@needs_shared
def test_summary_json_matches_darknet_layout():
    from test_layouts import compare_layout  # noqa: F401 (same figures, via the CLI)
    r = run(main, ["summary", UPSTREAM_CFG / "yolov4-csp.cfg", "--json"])
    data = json.loads(r.output)
    layout = json.loads((ORACLE / "layouts" / "yolov4-csp.json").read_text())
    assert [l["output"] for l in data["layers"]] == [l["out_chw"] for l in layout["layers"]]
    assert [l["weight_floats"] for l in data["layers"]] == \
        [l["weight_floats"] for l in layout["layers"]]
    assert data["total_weight_floats"] == layout["total_weight_floats"]
    assert data["total_bflops"] == pytest.approx(layout["total_bflops"], rel=1e-5)


def test_console_scripts_installed():
    bindir = os.path.dirname(sys.executable)  # the scripts of this environment, else PATH's
    for exe in ("darknet2torch", "torch2darknet", "darknet-cfg"):
        local = os.path.join(bindir, exe)
        out = subprocess.run([local if os.path.isfile(local) else exe, "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "Usage" in out.stdout
