"""Bad input ends in one of our errors, naming the file: cfg numbers, huge or broken images, BOM,
NaN and truncated weights, interrupted writes, one-line CLI errors; plus a seeded fuzz run."""
import json
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import darknet_cfg
from darknet_cfg import DarknetCfgError, DarknetError, DarknetWeightsError, WeightsWarning
from darknet_cfg.cli import darknet2torch, main
from darknet_cfg.converters import weights as W
from darknet_cfg.preprocess import ImageDecodeError, load_image

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"
SMALL = NET + """
[convolutional]
batch_normalize=1
filters=4
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=21
size=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=2
num=3
"""


def _write(tmp_path, text, name="m.cfg"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _png_header(w, h, body=b""):
    """A PNG whose IHDR declares w x h (valid CRCs), followed by ``body``."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body or b"\0" * 64)) \
        + chunk(b"IEND", b"")


def _good_png(path, w=40, h=30, seed=0):
    import cv2
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


# ----------------------------------------------------------------------------- API regressions
def test_summary_function_survives_repeated_calls(tmp_path):
    cfg = _write(tmp_path, SMALL)
    first = darknet_cfg.summary(cfg)
    second = darknet_cfg.summary(cfg)          # importing the table module must not rebind it
    assert callable(darknet_cfg.summary) and first == second and len(first) == 3


def test_model_loss_is_head_loss(tmp_path):
    from darknet_cfg.train import HeadLoss
    model = darknet_cfg.build_model(_write(tmp_path, SMALL))
    x = torch.rand(2, 3, 32, 32)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.3, 0.6, 0.2, 0.2]])
    outs = model.head_inputs(x)
    total, stats = model.loss(outs, targets, seen=64)
    ref, ref_stats = HeadLoss(model)(outs, targets, 32, 32, 64)
    assert torch.equal(total, ref) and len(stats) == len(ref_stats) == 1
    total.backward()
    assert model.layers[0].conv.weight.grad is not None


# ----------------------------------------------------------------------------- cfg numbers
@pytest.mark.parametrize("body,needle", [
    ("[convolutional]\nfilters=1000000000\nsize=3\npad=1\n", "values per image"),
    ("[convolutional]\nfilters=64\nsize=100000\npad=1\n", "weights"),
    ("[connected]\noutput=1500000000\n", "weights"),
    ("[convolutional]\nfilters=9223372036854775807\nsize=1\n", "out of range"),
    ("[convolutional]\nfilters=" + "7" * 5000 + "\nsize=1\n", "out of range"),
    ("[yolo]\nmask=0," + "9" * 4400 + "\nanchors=1,2\n", "out of range"),
])
def test_absurd_numbers_are_cfg_errors(tmp_path, body, needle):
    cfg = _write(tmp_path, NET + body)
    with pytest.raises(DarknetCfgError) as e:
        darknet_cfg.summary(cfg)
    assert str(e.value).startswith(f"{cfg}:") and needle in str(e.value)
    assert len(str(e.value)) < 400


def test_huge_input_channels(tmp_path):
    cfg = _write(tmp_path, "[net]\nwidth=416\nheight=416\nchannels=1000000000\n"
                 "[convolutional]\nfilters=1\nsize=1\n")
    with pytest.raises(DarknetCfgError, match=r"m\.cfg:1: \[net\] input 1000000000x416x416"):
        darknet_cfg.summary(cfg)


def test_model_too_large_for_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    from darknet_cfg import model as M
    monkeypatch.setattr(M, "available_memory", lambda device=None: 100)
    with pytest.raises(DarknetCfgError, match=r"parameters need .* GiB .* only 0\.0 GiB is free"):
        darknet_cfg.load(_write(tmp_path, SMALL))


def test_byte_order_mark_is_accepted(tmp_path):
    plain = darknet_cfg.summary(_write(tmp_path, SMALL, "a.cfg"))
    p = tmp_path / "bom.cfg"
    p.write_bytes(b"\xef\xbb\xbf" + SMALL.encode())
    assert darknet_cfg.summary(p) == plain


# ----------------------------------------------------------------------------- weights
@pytest.fixture()
def small_weights(tmp_path):
    cfg = _write(tmp_path, SMALL)
    torch.manual_seed(0)
    model = darknet_cfg.build_model(cfg)
    w = tmp_path / "m.weights"
    darknet_cfg.save_weights(model, w)
    return cfg, w


def test_nonfinite_weights_warn_and_strict_finite_rejects(small_weights, tmp_path):
    cfg, w = small_weights
    data = bytearray(w.read_bytes())
    data[20 + 4 * 7: 20 + 4 * 8] = struct.pack("<f", float("-inf"))  # layer 0
    data[-4:] = struct.pack("<f", float("nan"))                        # layer 1
    bad = tmp_path / "bad.weights"
    bad.write_bytes(bytes(data))
    with pytest.warns(WeightsWarning, match=r"2 NaN/Inf floats in 2 layers \(layer 0 .*: 1, "
                                            r"layer 1 .*: 1\)"):
        m = darknet_cfg.load(cfg, bad)
    assert not torch.isfinite(m(torch.rand(1, 3, 32, 32))[0]).all()   # as the warning says
    with pytest.raises(DarknetWeightsError, match="NaN/Inf"):
        darknet_cfg.load(cfg, bad, strict_finite=True)
    r = CliRunner().invoke(darknet2torch, [str(cfg), str(bad), "-o", str(tmp_path / "x.pt"),
                                           "--strict-finite"])
    assert r.exit_code == 1 and "NaN/Inf" in r.output and not (tmp_path / "x.pt").exists()
    r = CliRunner().invoke(darknet2torch, [str(cfg), str(bad), "-o", str(tmp_path / "y.pt")])
    assert r.exit_code == 0 and "warning:" in r.output and "NaN/Inf" in r.output


def test_truncated_download_says_where_the_data_ends(small_weights, tmp_path):
    cfg, w = small_weights
    cut = tmp_path / "cut.weights"
    data = w.read_bytes()
    cut.write_bytes(data[:20 + 4 * 30 + 2])     # mid-float, inside layer 0's weights
    with pytest.raises(DarknetWeightsError) as e:
        darknet_cfg.load(cfg, cut)
    msg = str(e.value)
    assert "looks truncated" in msg and "layer 0 [convolutional] (cfg line 6)" in msg
    assert f"{len(data) - len(cut.read_bytes())} bytes short" in msg and "'weights'" in msg
    long = tmp_path / "long.weights"
    long.write_bytes(data + b"\0\0")
    with pytest.raises(DarknetWeightsError, match="not a whole number of float32"):
        darknet_cfg.load(cfg, long)


def test_interrupted_writes_leave_no_weights_named_files(small_weights, tmp_path, monkeypatch):
    cfg, w = small_weights
    model = darknet_cfg.load(cfg, w)
    real = W.weights_bytes_iter

    def killed(*a, **k):
        for n, chunk in enumerate(real(*a, **k)):
            if n == 2:
                raise KeyboardInterrupt
            yield chunk
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(W, "weights_bytes_iter", killed)
    # a kill -9 leaves the temporary file: simulate by making unlink fail once
    monkeypatch.setattr(W.os, "unlink", lambda p: None)
    with pytest.raises(KeyboardInterrupt):
        darknet_cfg.save_weights(model, out / "m_last.weights")
    monkeypatch.undo()
    left = os.listdir(out)
    assert len(left) == 1 and not left[0].endswith(".weights") and left[0].startswith(".m_last.")
    assert W.remove_stale_partials(out) == []          # too recent: maybe a write in progress
    old = time.time() - 3600
    os.utime(out / left[0], (old, old))
    (out / "keep.weights").write_bytes(b"x")
    assert W.remove_stale_partials(out) == left and os.listdir(out) == ["keep.weights"]


# ----------------------------------------------------------------------------- images
def test_huge_declared_image_is_an_unreadable_image(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(100000, 100000))
    with pytest.raises(ImageDecodeError, match=r"(100000x100000|10000000000) pixels is more than the limit"):
        load_image(huge)
    assert isinstance(ImageDecodeError("x"), DarknetError)


def test_decoder_errors_are_unreadable_images(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKNET_CFG_MAX_PIXELS", str(10 ** 12))   # let OpenCV's own limit hit
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(100000, 100000))
    with pytest.raises(ImageDecodeError, match="huge.png: cannot decode image"):
        load_image(huge)


def test_detect_skips_a_huge_image_and_keeps_the_good_one(small_weights, tmp_path):
    cfg, w = small_weights
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a_huge.png").write_bytes(_png_header(100000, 100000))
    _good_png(src / "b_good.png")
    out_json = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["detect", str(cfg), str(w), str(src), "--json", str(out_json),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    frames = json.loads(out_json.read_text())
    assert [os.path.basename(f["filename"]) for f in frames] == ["b_good.png"]
    assert "a_huge.png" in r.output and "Traceback" not in r.output


def test_training_list_with_a_huge_image(tmp_path):
    from darknet_cfg.data import AugmentParams, DetectionDataset, scan_dataset
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(100000, 100000))
    good = _good_png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    msgs = []
    scan = scan_dataset([str(huge), str(good)], 2, report=msgs.append)
    assert scan.images == [str(good)] and scan.unreadable == [str(huge)]
    assert "pixels is more than the limit" in msgs[0]
    model = darknet_cfg.build_model(_write(tmp_path, SMALL))
    ds = DetectionDataset([str(huge), str(good)], [np.zeros((0, 5), np.float32)] * 2,
                          AugmentParams.from_model(model))
    with pytest.warns(UserWarning, match="cannot decode"):
        x, _ = ds[(0, 32, 32, 1)]      # the loader falls back to a decodable picture
    assert x.shape == (3, 32, 32)


# ----------------------------------------------------------------------------- CLI
def test_directory_where_a_file_is_expected_is_one_line(tmp_path):
    cfg = _write(tmp_path, SMALL)
    r = CliRunner().invoke(darknet2torch, [str(cfg), str(tmp_path)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is a directory" in lines[0]
    r = CliRunner().invoke(main, ["summary", str(tmp_path)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- fuzz
def _mutate_text(rng, text):
    lines = text.splitlines()
    kind = rng.integers(6)
    i = int(rng.integers(len(lines)))
    if kind == 0 and "=" in lines[i]:
        k = lines[i].split("=")[0]
        big = rng.choice(["1e9", "1000000000", str(2 ** 63), "9" * int(rng.integers(5, 6000)),
                          "-7", "0", "nan", "abc", "", "3,,", "-2147483649"])
        lines[i] = f"{k}={big}"
    elif kind == 1:
        lines.insert(i, rng.choice(["[", "[]", "=1", "x", "[maxpool]", "[route]\nlayers=-9",
                                    "[shortcut]\nfrom=-3", "[upsample]\nstride=100000"]))
    elif kind == 2:
        del lines[i]
    elif kind == 3:
        return "\ufeff" + text
    elif kind == 4:
        lines[i] = lines[i][: int(rng.integers(len(lines[i]) + 1))]
    else:
        j = int(rng.integers(len(lines)))
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines) + "\n"


def _mutate_bytes(rng, data):
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        return bytes(data[: int(rng.integers(len(data) + 1))])
    if kind == 1:
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        return bytes(data)
    if kind == 2:  # NaN/Inf floats
        for _ in range(int(rng.integers(1, 4))):
            k = 20 + 4 * int(rng.integers((len(data) - 20) // 4))
            data[k:k + 4] = struct.pack("<f", rng.choice([np.nan, np.inf, -np.inf]))
        return bytes(data)
    return bytes(data) + bytes(int(rng.integers(1, 9)))


def _named(e, *paths):
    text = str(e)
    return any(str(p) in text or os.path.basename(str(p)) in text for p in paths)


def test_fuzz_inputs_end_in_success_or_our_errors(tmp_path):
    """~300 seeded mutations of cfgs, weights, images and label files: each load/decode either
    works or raises one of our error types whose message names the file."""
    from darknet_cfg.data import read_labels
    rng = np.random.default_rng(20261204)
    base_cfg = _write(tmp_path, SMALL, "base.cfg")
    torch.manual_seed(0)
    model = darknet_cfg.build_model(base_cfg)
    wpath = tmp_path / "base.weights"
    darknet_cfg.save_weights(model, wpath)
    wdata = wpath.read_bytes()
    png = _good_png(tmp_path / "base.png").read_bytes()
    outcomes = {"ok": 0, "error": 0}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in range(300):
            family = n % 4
            if family == 0:      # cfg
                p = _write(tmp_path, _mutate_text(rng, SMALL), f"f{n}.cfg")
                try:
                    darknet_cfg.summary(p)
                    darknet_cfg.build_model(p)
                    outcomes["ok"] += 1
                except DarknetError as e:
                    assert _named(e, p), e
                    outcomes["error"] += 1
            elif family == 1:    # weights
                p = tmp_path / f"f{n}.weights"
                p.write_bytes(_mutate_bytes(rng, wdata))
                try:
                    darknet_cfg.load_weights(model, p, strict=bool(rng.integers(2)),
                                             strict_finite=bool(rng.integers(2)))
                    outcomes["ok"] += 1
                except DarknetError as e:
                    assert _named(e, p), e
                    outcomes["error"] += 1
            elif family == 2:    # images: damaged bytes, or a header declaring a huge size
                p = tmp_path / f"f{n}.png"
                if rng.integers(3) == 0:
                    p.write_bytes(_png_header(int(rng.integers(1, 2 ** 31)),
                                              int(rng.integers(1, 2 ** 31))))
                else:
                    p.write_bytes(_mutate_bytes(rng, png))
                try:
                    load_image(p)
                    outcomes["ok"] += 1
                except DarknetError as e:
                    assert _named(e, p), e
                    outcomes["error"] += 1
            else:                # label files
                p = tmp_path / f"f{n}.txt"
                good = "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.4\n"
                p.write_text(_mutate_text(rng, good + "0 0.1 0.1 0.1 0.1"))
                msgs = []
                lab = read_labels(str(p), 2, msgs.append)
                assert lab.ndim == 2 and lab.shape[1] == 5 and np.isfinite(lab).all()
                assert all(str(p) in m for m in msgs)
                outcomes["ok" if not msgs else "error"] += 1
    assert outcomes["ok"] > 30 and outcomes["error"] > 30, outcomes
    assert time.perf_counter() - t0 < 60
