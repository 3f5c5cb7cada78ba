"""Pre-processing parity with darknet (load_image, resize_image, letterbox_image, resize_min, crop_image)."""
import json

import numpy as np
import pytest

from conftest import IMAGES, ORACLE, model_names, needs_shared

from darknet_cfg.preprocess import (ImageDecodeError, classifier_input, crop_image, detector_input,
                                    letterbox_image, load_image, resize_image, resize_min)


def _oracle_dirs():
    dirs = [ORACLE / "models" / n for n in model_names()]
    q = ORACLE / "quirks"
    if q.is_dir():
        # quirk cases without a forward oracle (README and Darknet's output only) have no input
        dirs += sorted(p for p in q.iterdir() if (p / "meta.json").is_file())
    return dirs


def _network_input(meta, im):
    if meta["kind"] == "classifier":
        return classifier_input(im, meta["width"], meta["height"])
    return detector_input(im, meta["width"], meta["height"], bool(meta["letter_box"]))


@pytest.fixture(scope="module")
def dog():
    return load_image(IMAGES / "dog.png")


# ------------------------------------------------------------------ oracle parity

@needs_shared
@pytest.mark.parametrize("model_dir", _oracle_dirs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_network_input_matches_darknet(model_dir, dog):
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["image"].endswith("dog.png")
    ref = np.load(model_dir / "input.npy")
    x = _network_input(meta, dog)
    assert x.dtype == np.float32 and x.shape == ref.shape
    diff = float(np.abs(x - ref).max())
    assert diff <= 1e-6, f"{model_dir.name}: max abs diff {diff:g}"
    # what we actually achieve (and darknet's arithmetic allows): bit-exact
    assert np.array_equal(x, ref), (f"{model_dir.name}: not bit-exact, {int((x != ref).sum())} "
                                    f"values differ, max abs diff {diff:g}")


@needs_shared
def test_load_image_dog(dog):
    assert dog.shape == (3, 576, 768) and dog.dtype == np.float32
    assert dog.flags["C_CONTIGUOUS"]
    assert 0.0 <= dog.min() and dog.max() <= 1.0
    # float32(byte/255): every value is one of the 256 levels
    levels = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
    assert np.isin(dog[:, ::17, ::13], levels).all()


@needs_shared
def test_last_row_quirk_on_darknet_image():
    # README: darknet resizing horses (773x512) to 416x42 gives a last row of ~1.6e-5 (channel 0)
    im = load_image(IMAGES / "horses.png")
    r = resize_image(im, 416, 42)
    assert r.shape == (3, 42, 416)
    assert r[:, -1].max() < 1e-4
    assert r[0, -1].mean() == pytest.approx(1.6e-5, rel=0.05)
    assert r[:, -2].mean() > 0.1


# ------------------------------------------------------------------ resize_image

def _resize_reference(im, w, h):
    """Literal per-pixel transcription of darknet's resize_image (slow; tiny images only)."""
    f = np.float32
    C, H, W = im.shape
    if (W, H) == (w, h):
        return im.copy()
    part = np.zeros((C, H, w), np.float32)
    w_scale = f(W - 1) / f(w - 1) if w > 1 else f(0)
    h_scale = f(H - 1) / f(h - 1) if h > 1 else f(0)
    for k in range(C):
        for r in range(H):
            for c in range(w):
                if c == w - 1 or W == 1:
                    val = im[k, r, W - 1]
                else:
                    sx = f(c) * w_scale
                    ix = int(sx)
                    dx = f(sx - f(ix))
                    val = f(f(f(1) - dx) * im[k, r, ix]) + f(dx * im[k, r, ix + 1])
                part[k, r, c] = val
    out = np.zeros((C, h, w), np.float32)
    for k in range(C):
        for r in range(h):
            sy = f(r) * h_scale
            iy = int(sy)
            dy = f(sy - f(iy))
            for c in range(w):
                out[k, r, c] = f(f(1) - dy) * part[k, iy, c]
            if r == h - 1 or H == 1:
                continue
            for c in range(w):
                out[k, r, c] = f(out[k, r, c] + f(dy * part[k, iy + 1, c]))
    return out


@pytest.mark.parametrize("src,dst", [((7, 5), (11, 3)), ((9, 8), (4, 6)), ((5, 5), (5, 5)),
                                     ((1, 4), (3, 2)), ((6, 1), (2, 3)), ((13, 11), (13, 7)),
                                     ((3, 3), (1, 1)), ((4, 512), (2, 42))])
def test_resize_matches_literal_transcription(src, dst):
    rng = np.random.default_rng(0)
    (W, H), (w, h) = src, dst
    im = rng.random((2, H, W), dtype=np.float32)
    got = resize_image(im, w, h)
    ref = _resize_reference(im, w, h)
    assert got.dtype == np.float32 and got.shape == (2, h, w)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("H,h", [(512, 42), (500, 100), (424, 14), (576, 1104)])
def test_last_row_quirk(H, h):
    # float32(h-1) * float32((H-1)/(h-1)) rounds below H-1: iy = H-2, dy ~ 1, and darknet never
    # adds dy*part[iy+1] on the last row, so the whole last row is ~0.
    im = np.ones((1, H, 3), np.float32)
    r = resize_image(im, 3, h)
    assert np.all(r[0, :-1] == 1.0)
    assert np.all(r[0, -1] < 1e-3)


def test_last_row_normal_when_scale_is_exact():
    im = np.random.default_rng(1).random((3, 576, 768), dtype=np.float32)
    r = resize_image(im, 416, 416)
    # columns: the last output column is a copy of the last source column (after the row pass)
    assert np.array_equal(r[:, 0, -1], im[:, 0, -1])
    assert r[:, -1].mean() > 0.3


def test_resize_same_size_is_copy():
    im = np.random.default_rng(2).random((3, 4, 5), dtype=np.float32)
    r = resize_image(im, 5, 4)
    assert np.array_equal(r, im) and r is not im


# ------------------------------------------------------------------ letterbox / classifier path

def test_letterbox_geometry():
    im = np.full((3, 576, 768), 0.25, np.float32)  # 4:3 -> 320x240 inside 320x320
    lb = letterbox_image(im, 320, 320)
    assert lb.shape == (3, 320, 320)
    assert np.all(lb[:, :40] == 0.5) and np.all(lb[:, 280:] == 0.5)
    assert np.all(lb[:, 40:280] == 0.25)
    tall = np.full((3, 100, 50), 0.25, np.float32)  # 1:2 -> 32x64 inside 64x64, x offset 16
    lb = letterbox_image(tall, 64, 64)
    assert np.all(lb[:, :, :16] == 0.5) and np.all(lb[:, :, 48:] == 0.5)
    assert np.all(lb[:, :, 16:48] == 0.25)


def test_detector_input_switch():
    im = np.random.default_rng(3).random((3, 30, 40), dtype=np.float32)
    assert np.array_equal(detector_input(im, 20, 20, False), resize_image(im, 20, 20))
    assert np.array_equal(detector_input(im, 20, 20, True), letterbox_image(im, 20, 20))


def test_resize_min_and_crop():
    im = np.random.default_rng(4).random((3, 30, 40), dtype=np.float32)
    r = resize_min(im, 15)
    assert r.shape == (3, 15, 20)  # short side 15, long side (40*15)/30
    assert resize_min(im, 30) is im  # darknet returns the image itself when the size is unchanged
    c = crop_image(im, -2, 28, 5, 4)  # taps outside clamp to the edge
    assert c.shape == (3, 4, 5)
    assert np.array_equal(c[:, 0, 0], im[:, 28, 0])
    assert np.array_equal(c[:, -1, -1], im[:, 29, 2])
    x = classifier_input(im, 15, 15)
    assert np.array_equal(x, r[:, :, 2:17])


# ------------------------------------------------------------------ decoding errors

def test_corrupt_file_raises_with_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ImageDecodeError) as e:
        load_image(bad)
    assert str(bad) in str(e.value) and "cannot decode image" in str(e.value)
    assert isinstance(e.value, ValueError)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg"):
        load_image(str(empty))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")


def test_load_image_png_roundtrip(tmp_path):
    import cv2
    rgb = np.random.default_rng(5).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    p = tmp_path / "x.png"
    assert cv2.imwrite(str(p), rgb[:, :, ::-1])
    im = load_image(p)
    assert im.shape == (3, 6, 7) and im.dtype == np.float32
    expect = (rgb.transpose(2, 0, 1).astype(np.float64) / 255.0).astype(np.float32)
    assert np.array_equal(im, expect)
    grey = tmp_path / "g.png"
    assert cv2.imwrite(str(grey), rgb[:, :, 0])
    g = load_image(grey)
    assert g.shape == (3, 6, 7) and np.array_equal(g[0], g[2])
