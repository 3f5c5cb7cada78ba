"""Darknet's multi-picture and pixel augmentations (mosaic, mixup, cutmix handling, blur, Gaussian
noise) and the adam=1 optimizer, each against what Darknet's loader/updater computes."""
import warnings

import numpy as np
import pytest
import torch

from test_train import _cfg

import darknet_cfg
from darknet_cfg.data import (MIXUP, MOSAIC, SINGLE, AugmentParams, DetectionDataset, _mosaic_truths,
                              augment, mixup_images, mosaic_images)
from darknet_cfg.synth import make_synthetic
from darknet_cfg.train import (DarknetAdam, Trainer, TrainOptions, darknet_adam_params, make_optimizer,
                               set_rate)

COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)
STILL = dict(hue=0.0, saturation=1.0, exposure=1.0)          # no colour change: exact colours


def _solid(colour, h=50, w=70):
    return np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()


def _rect_pictures(rng):
    """Four grey pictures of random sizes, each with one rectangle of its own colour; the class
    id is the picture's index."""
    out = []
    for k in range(4):
        hh, ww = rng.integers(60, 120, 2)
        img = np.full((hh, ww, 3), 128, np.uint8)
        bw, bh = rng.integers(ww // 5, ww // 2), rng.integers(hh // 5, hh // 2)
        x0, y0 = rng.integers(0, ww - bw), rng.integers(0, hh - bh)
        img[y0:y0 + bh, x0:x0 + bw] = COLOURS[k]
        box = [k, (x0 + bw / 2) / ww, (y0 + bh / 2) / hh, bw / ww, bh / hh]
        out.append((img, np.array([box], np.float32)))
    return out


def _colour_mask(x, k):
    return np.abs(x.transpose(1, 2, 0) - COLOURS[k] / np.float32(255)).max(-1) < 0.05


# ------------------------------------------------------------------------------ mix mode
def test_mix_mode_follows_darknets_parser():
    assert AugmentParams().mix_mode == SINGLE
    assert AugmentParams(mosaic=1).mix_mode == MOSAIC
    assert AugmentParams(mixup=1).mix_mode == MIXUP
    assert AugmentParams(mosaic=1, mixup=1).mix_mode == MOSAIC          # mosaic wins
    # cutmix is classifier-only in darknet's detector loader: alone -> one picture, with mosaic -> mosaic
    assert AugmentParams(cutmix=1).mix_mode == SINGLE
    assert AugmentParams(cutmix=1, mixup=1).mix_mode == SINGLE
    assert AugmentParams(cutmix=1, mosaic=1).mix_mode == MOSAIC
    assert AugmentParams(mosaic=1, mixup=1, augment=False).mix_mode == SINGLE


# ------------------------------------------------------------------------------ mosaic
def test_mosaic_shape_and_quadrant_split():
    """Solid pictures: each quadrant around (cut_x, cut_y) is exactly its picture's colour (the
    jitter padding is the picture's mean colour, i.e. the same colour)."""
    samples = [(_solid(c), np.zeros((0, 5), np.float32)) for c in COLOURS]
    p = AugmentParams(jitter=0.3, mosaic=1, **STILL)
    for seed in range(6):
        x, t = mosaic_images(samples, 64, 48, p, np.random.default_rng(seed), cut=(20, 30))
        assert x.shape == (3, 48, 64) and x.dtype == np.float32 and t.shape == (0, 5)
        for k, (ys, xs) in enumerate([(slice(0, 30), slice(0, 20)), (slice(0, 30), slice(20, 64)),
                                      (slice(30, 48), slice(0, 20)), (slice(30, 48), slice(20, 64))]):
            np.testing.assert_array_equal(x[:, ys, xs], np.broadcast_to(
                (COLOURS[k] / np.float32(255))[:, None, None], x[:, ys, xs].shape))
    # a random cut lies in [0.2, 0.8] of each side (darknet's rand_int(w*0.2, w*0.8))
    cuts = set()
    for seed in range(40):
        x, _ = mosaic_images(samples, 100, 50, p, np.random.default_rng(seed))
        cut_x = int(np.argmax(~_colour_mask(x, 0)[0]))
        cut_y = int(np.argmax(~_colour_mask(x, 0)[:, 0]))
        assert 20 <= cut_x <= 80 and 10 <= cut_y <= 40
        assert _colour_mask(x, 3)[cut_y:, cut_x:].all()
        cuts.add((cut_x, cut_y))
    assert len(cuts) > 20


@pytest.mark.parametrize("bound", [0, 1])
def test_mosaic_boxes_follow_the_content(bound):
    """Every truth lies in [0, 1], covers pixels of its picture's colour, and the visible pixels of
    each colour are covered by that class's truths (with mosaic_bound=1 a truth never leaves its
    quadrant)."""
    p = AugmentParams(jitter=0.3, flip=1, mosaic=1, mosaic_bound=bound, letter_box=bound, **STILL)
    w, h = 64, 48
    n_boxes = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        cut = (int(rng.integers(13, 52)), int(rng.integers(10, 39)))
        x, t = mosaic_images(_rect_pictures(rng), w, h, p, rng, cut=cut)
        assert x.shape == (3, h, w)
        assert ((t[:, 1:] >= 0) & (t[:, 1:] <= 1)).all()
        x0, x1 = t[:, 1] - t[:, 3] / 2, t[:, 1] + t[:, 3] / 2
        y0, y1 = t[:, 2] - t[:, 4] / 2, t[:, 2] + t[:, 4] / 2
        assert (np.minimum(x0, y0) >= -1e-6).all() and (np.maximum(x1, y1) <= 1 + 1e-6).all()
        assert ((t[:, 3] >= 1 / w - 1e-6) & (t[:, 4] >= 1 / h - 1e-6)).all()
        covered = np.zeros((4, h, w), bool)
        for (c, *_), a, b, c0, c1 in zip(t, x0, x1, y0, y1):
            k = int(c)
            X0, X1 = int(np.floor(a * w + 1e-6)), int(np.ceil(b * w - 1e-6))
            Y0, Y1 = int(np.floor(c0 * h + 1e-6)), int(np.ceil(c1 * h - 1e-6))
            region = _colour_mask(x, k)[Y0:Y1, X0:X1]
            assert region.any(), (seed, k)
            if min(X1 - X0, Y1 - Y0) >= 3:
                assert region.mean() >= 0.5, (seed, k, region.mean())
            if bound:
                qx, qy = (cut[0], w) if k % 2 else (0, cut[0]), (cut[1], h) if k >= 2 else (0, cut[1])
                assert qx[0] <= X0 and X1 <= qx[1] and qy[0] <= Y0 and Y1 <= qy[1], (seed, k)
            covered[k, max(Y0 - 1, 0):Y1 + 1, max(X0 - 1, 0):X1 + 1] = True
            n_boxes += 1
        for k in range(4):
            # what is left uncovered: slivers under one pixel, dropped as darknet drops them
            assert (_colour_mask(x, k) & ~covered[k]).sum() <= w, (seed, k)
    assert n_boxes > 120


def test_mosaic_truth_arithmetic():
    """blend_truth_mosaic by hand (exact binary fractions): w=h=128, cut=(48, 64), a top-right
    piece shifted by (+32, -64) (its left padding was 16 pixels)."""
    t = np.array([[0, 0.375, 0.75, 0.25, 0.25],     # cols 32..64 -> 64..96, rows 80..112 -> 16..48
                  [1, 0.125, 0.75, 0.25, 0.25],     # cols 0..32 -> 32..64: crosses the cut at 48
                  [2, 0.375, 0.50, 0.25, 0.25],     # rows 48..80 -> -16..16: crosses the top edge
                  [3, 0.375, 0.125, 0.25, 0.25],    # rows 0..32 -> -64..-32: outside
                  [4, 0.375, 0.75, 1 / 256, 0.25]],  # half a pixel wide: dropped
                 np.float32)
    r0 = _mosaic_truths(t, 1, 32, -64, 48, 64, 128, 128, bound=0)
    np.testing.assert_allclose(r0, [[0, 0.625, 0.25, 0.25, 0.25], [1, 0.375, 0.25, 0.25, 0.25],
                                    [2, 0.625, 0.0625, 0.25, 0.125]], atol=1e-6)
    r1 = _mosaic_truths(t, 1, 32, -64, 48, 64, 128, 128, bound=1)    # clipped to [48, 128) x [0, 64)
    np.testing.assert_allclose(r1, [[0, 0.625, 0.25, 0.25, 0.25], [1, 0.4375, 0.25, 0.125, 0.25],
                                    [2, 0.625, 0.0625, 0.25, 0.125]], atol=1e-6)
    # bottom-left quadrant [0, 48) x [64, 128): cols 48..80 -> 24..56, clipped at the cut to 24..48
    one = np.array([[5, 0.5, 0.5, 0.25, 0.25]], np.float32)
    np.testing.assert_allclose(_mosaic_truths(one, 2, -24, 32, 48, 64, 128, 128, bound=1),
                               [[5, 0.28125, 0.75, 0.1875, 0.25]], atol=1e-6)
    np.testing.assert_allclose(_mosaic_truths(one, 2, -24, 32, 48, 64, 128, 128, bound=0),
                               [[5, 0.3125, 0.75, 0.25, 0.25]], atol=1e-6)


def test_mosaic_caps_boxes():
    rng = np.random.default_rng(0)
    pics = [(_solid((90, 90, 90), 64, 64), np.array([[k, 0.5, 0.5, 0.9, 0.9]] * 5, np.float32))
            for k in range(4)]
    _, t = mosaic_images(pics, 64, 64, AugmentParams(jitter=0.0, mosaic=1, max_boxes=6), rng, cut=(32, 32))
    assert len(t) == 6 and list(t[:, 0]) == [0] * 5 + [1]


# ------------------------------------------------------------------------------ mixup
def test_mixup_blends_and_unites_truths():
    a, b = _solid((200, 40, 0), 40, 60), _solid((0, 100, 250), 40, 60)
    ta = np.array([[0, 0.3, 0.3, 0.2, 0.2], [1, 0.7, 0.6, 0.3, 0.4]], np.float32)
    tb = np.array([[2, 0.5, 0.5, 0.5, 0.5]], np.float32)
    p = AugmentParams(jitter=0.0, flip=0, mixup=1, **STILL)
    x, t = mixup_images([(a, ta), (b, tb)], 30, 20, p, np.random.default_rng(0))
    want = (np.array([200, 40, 0]) + np.array([0, 100, 250])) / 2 / 255
    np.testing.assert_allclose(x, np.broadcast_to(want[:, None, None], (3, 20, 30)), atol=1e-6)
    assert len(t) == 3 and set(t[:2, 0]) == {0, 1} and t[2, 0] == 2     # first picture's, then the second's
    np.testing.assert_allclose(t[np.argsort(t[:, 0])], np.concatenate([ta, tb]), atol=1e-6)
    p = AugmentParams(jitter=0.0, flip=0, max_boxes=2)
    _, t = mixup_images([(a, ta), (b, tb)], 30, 20, p, np.random.default_rng(0))
    assert sorted(t[:, 0]) == [0, 1]


# ------------------------------------------------------------------------------ dataset
@pytest.fixture(scope="module")
def solid_set(tmp_path_factory):
    import cv2
    d = tmp_path_factory.mktemp("solid")
    images, labels = [], []
    for k, c in enumerate(COLOURS):
        path = str(d / f"{k}.png")
        img = _solid(c, 40, 40)
        img[10:30, 10:30] = 128
        cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append(path)
        labels.append(np.array([[k, 0.5, 0.5, 0.5, 0.5]], np.float32))
    return images, labels


def test_dataset_mosaic_and_mixup_items(solid_set):
    images, labels = solid_set
    for params, parts in ((dict(mosaic=1), 4), (dict(mixup=1), 2)):
        ds = DetectionDataset(images, labels, AugmentParams(jitter=0.2, **STILL, **params))
        combined = 0
        for seed in range(40):
            x, t = ds[(seed % 4, 64, 48, seed)]
            assert x.shape == (3, 48, 64) and ((t[:, 1:] >= 0) & (t[:, 1:] <= 1)).all()
            if parts == 4:
                colours = {k for k in range(4) if _colour_mask(x, k).any()}
                combined += len(colours) > 1 or len(t) > 1
            else:
                combined += not any(_colour_mask(x, k).any() for k in range(4))   # blended colours
        assert 8 <= combined <= 32, (params, combined)          # darknet's coin flip: about half
    # validation (augment=False): one picture, resized, no blur/noise/mosaic
    ds = DetectionDataset(images, labels, AugmentParams(mosaic=1, mixup=1, blur=5, gaussian_noise=30,
                                                       augment=False))
    for seed in range(8):
        x, t = ds[(2, 40, 40, seed)]
        assert _colour_mask(x, 2)[:10].all()
        np.testing.assert_allclose(t, labels[2])


# ------------------------------------------------------------------------------ blur / noise
def _textured(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return img, np.array([[0, 0.5, 0.5, 0.625, 0.625]], np.float32)     # rows/cols 12..52


def test_blur_changes_pixels_not_truths():
    img, boxes = _textured()
    base = AugmentParams(jitter=0.0, flip=0, **STILL)
    ref, ref_t = augment(img, boxes, 64, 64, base, np.random.default_rng(0))
    kinds = set()
    for blur in (1, 9):
        p = AugmentParams(jitter=0.0, flip=0, blur=blur, **STILL)
        for seed in range(24):
            x, t = augment(img, boxes, 64, 64, p, np.random.default_rng(seed))
            np.testing.assert_allclose(t, ref_t)
            if np.array_equal(x, ref):
                kinds.add("none")
                continue
            inside = np.array_equal(x[:, 12:52, 12:52], ref[:, 12:52, 12:52])
            assert not np.array_equal(x[:, :10], ref[:, :10])           # the background is blurred
            kinds.add("background" if inside else "all")
            assert inside or blur > 1                                   # blur=1: objects stay sharp
    assert kinds == {"none", "background", "all"}


def test_gaussian_noise_is_zero_mean_and_keeps_truths():
    img = np.full((48, 48, 3), 128, np.uint8)
    boxes = np.array([[1, 0.5, 0.5, 0.3, 0.3]], np.float32)
    p = AugmentParams(jitter=0.0, flip=0, gaussian_noise=20, **STILL)
    noisy = 0
    for seed in range(12):
        x, t = augment(img, boxes, 48, 48, p, np.random.default_rng(seed))
        np.testing.assert_allclose(t, boxes)
        diff = x * 255 - 128
        if np.abs(diff).max() < 1e-3:
            continue
        noisy += 1
        assert abs(diff.mean()) < 1.5 and 17 < diff.std() < 23            # N(0, 20), both signs
        assert (diff < -10).mean() > 0.2 and (diff > 10).mean() > 0.2
    assert 2 <= noisy <= 10
    # no augmentation (validation): nothing added
    x, _ = augment(img, boxes, 48, 48, AugmentParams(gaussian_noise=20, blur=1, augment=False),
                   np.random.default_rng(0))
    np.testing.assert_allclose(x, 128 / 255, atol=1e-7)


# ------------------------------------------------------------------------------ adam
ADAM_CFG = """[net]
batch=4
subdivisions=2
width=8
height=8
channels=3
momentum=0.9
decay=0.01
adam=1
B1=0.8
B2=0.95
eps=0.001

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=2
size=1
stride=1
activation=linear

[connected]
output=3
activation=linear
"""


def _darknet_adam(w, upd, m, v, b1, b2, eps, decay, rate, batch, t):
    """adam_update_gpu, transcribed: ``upd`` is darknet's update buffer (minus the gradient summed
    over the batch); returns the new weights, m and v (the buffer is then zeroed)."""
    upd = upd - decay * batch * w
    m = b1 * m + (1 - b1) * upd
    v = b2 * v + (1 - b2) * upd * upd
    w = w + rate * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return w, m, v


def _darknet_sgd(w, upd, decay, rate, batch, momentum, use_decay):
    """update_*_layer's SGD: returns the new weights and the carried (momentum-scaled) buffer."""
    if use_decay:
        upd = upd - decay * batch * w
    return w + rate / batch * upd, momentum * upd


def test_adam_steps_match_darknets_update(tmp_path):
    cfg = tmp_path / "adam.cfg"
    cfg.write_text(ADAM_CFG)
    model = darknet_cfg.build_model(str(cfg))
    s = model.graph.net.settings
    opt = make_optimizer(model, s)
    assert isinstance(opt, DarknetAdam)
    conv0, conv1, fc = model.layers[0], model.layers[1], model.layers[2]
    adam = [conv0.conv.weight, conv0.bn.weight, conv0.bn.bias, conv1.conv.weight, conv1.conv.bias]
    assert {id(p) for p in darknet_adam_params(model)} == {id(p) for p in adam}
    sgd = {id(fc.linear.weight): True, id(fc.linear.bias): False}     # decay on connected weights only
    params = adam + [fc.linear.weight, fc.linear.bias]
    ref = {id(p): dict(w=p.detach().double().numpy().copy(), m=0.0, v=0.0, buf=0.0) for p in params}
    gen = torch.Generator().manual_seed(0)
    B, decay = 4, 0.01
    for it, rate in ((5, 0.01), (6, 0.02)):                 # resumed at iteration 4: t = 5, 6
        opt.zero_grad()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        set_rate(opt, rate, s, B, iteration=it)
        opt.step()
        for p in params:
            r = ref[id(p)]
            upd = -p.grad.double().numpy()
            if id(p) in sgd:
                r["w"], r["buf"] = _darknet_sgd(r["w"], r["buf"] + upd, decay, rate, B, 0.9, sgd[id(p)])
            else:
                r["w"], r["m"], r["v"] = _darknet_adam(r["w"], upd, r["m"], r["v"], 0.8, 0.95, 0.001,
                                                       decay, rate, B, it)
            np.testing.assert_allclose(p.detach().numpy(), r["w"], rtol=1e-5, atol=1e-7)
    # without an iteration the step counter is t (1, 2, ...)
    model2 = darknet_cfg.build_model(str(cfg))
    opt2 = make_optimizer(model2, s)
    w0 = model2.layers[1].conv.weight.detach().double().numpy().copy()
    g = torch.full_like(model2.layers[1].conv.weight, 0.5)
    model2.layers[1].conv.weight.grad = g
    set_rate(opt2, 0.01, s, B)
    opt2.step()
    want, _, _ = _darknet_adam(w0, -g.double().numpy(), 0.0, 0.0, 0.8, 0.95, 0.001, decay, 0.01, B, 1)
    np.testing.assert_allclose(model2.layers[1].conv.weight.detach().numpy(), want, rtol=1e-5, atol=1e-7)


def test_sgd_stays_torch_sgd_without_adam(tmp_path):
    cfg = tmp_path / "sgd.cfg"
    cfg.write_text(ADAM_CFG.replace("adam=1", "adam=0"))
    model = darknet_cfg.build_model(str(cfg))
    assert type(make_optimizer(model, model.graph.net.settings)) is torch.optim.SGD


# ------------------------------------------------------------------------------ trainer
def test_trainer_with_mosaic_mixup_blur_noise_adam(tmp_path):
    data = make_synthetic(tmp_path / "ds", images=8, classes=3, size=64, valid=2, seed=5)
    keys = dict(mosaic=1, mixup=1, mosaic_bound=1, blur=1, gaussian_noise=10, adam=1)
    cfg = _cfg(tmp_path, burn_in=1, max_batches=3, **keys)  # the shipped mini cfg, 64x64
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tr = Trainer(TrainOptions(data=data["data"], cfg=cfg, backup=str(tmp_path / "backup"),
                                  progress=False, log=lambda m: None, workers=0))
        before = tr.model.layers[0].conv.weight.detach().clone()
        res = tr.run()
    unsupported = [str(w.message) for w in rec if "is not supported" in str(w.message)]
    assert not [m for m in unsupported if any(f"] {k}=" in m for k in keys)], unsupported
    assert res["iteration"] == 3 and all(np.isfinite(h["loss"]) for h in tr.o.history)
    assert tr.aug.mix_mode == MOSAIC and tr.aug.blur == 1 and tr.aug.gaussian_noise == 10
    assert isinstance(tr.opt, DarknetAdam)
    assert not torch.equal(before, tr.model.layers[0].conv.weight)
