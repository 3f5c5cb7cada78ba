"""Darknet's EMA (``ema_alpha``): schedule and values against a transcription of network.c."""
import os
import warnings

import numpy as np
import pytest
import torch

import darknet_cfg
from conftest import mini_cfg
from darknet_cfg.options import CfgWarning
from darknet_cfg.synth import make_synthetic
from darknet_cfg.train import DarknetEMA, Trainer, TrainOptions

MINI = os.path.join(os.path.dirname(darknet_cfg.__file__), "cfg", "yolov4-tiny-mini.cfg")
if not os.path.isfile(MINI):
    MINI = os.path.join(os.path.dirname(__file__), "..", "cfg", "yolov4-tiny-mini.cfg")


def _cfg(tmp_path, **over):
    return mini_cfg(tmp_path, **{"width": 64, "height": 64, "batch": 4, "subdivisions": 2,
                                 "burn_in": 0, **over})


class DarknetTranscription:
    """train_network_waitkey's EMA block + ema_update/ema_apply/is_ema_initialized in float32
    (numpy float32 arrays: each elementwise product and sum is rounded to float32 as darknet's
    per-element loop does), one list of arrays per [convolutional] layer: weights, biases,
    scales (scales only with batch_normalize)."""

    def __init__(self, alpha, max_batches):
        self.alpha, self.max_batches = np.float32(alpha), max_batches
        self.ema = None

    def _update(self, layers, a):
        if self.ema is None:
            self.ema = [[np.zeros_like(t) for t in l] for l in layers]   # xcalloc
        one = np.float32(1)
        for el, l in zip(self.ema, layers):
            for e, t in zip(el, l):
                e[...] = (a * e).astype(np.float32) + ((one - a) * t).astype(np.float32)

    def step(self, cur, layers):
        """``layers``: live arrays (modified in place by ema_apply)."""
        start, apply_point = self.max_batches // 2, self.max_batches - 1000
        if not (self.alpha and cur >= start):
            return None
        did = None
        if self.ema is None or not any((el[0] != 0).any() for el in self.ema):
            self._update(layers, np.float32(0))
            did = "init"
        if cur == apply_point:
            for el, l in zip(self.ema, layers):
                for e, t in zip(el, l):
                    t[...] = e
            return "apply"
        if cur < apply_point:
            self._update(layers, self.alpha)
            return did or "update"
        return did


def _conv_arrays(model):
    """Per [convolutional] layer: weights, biases, scales as numpy copies."""
    from darknet_cfg.layers.conv import ConvBnAct
    out = []
    for m in model.layers:
        if isinstance(m, ConvBnAct):
            ts = [m.conv.weight] + ([m.bn.bias, m.bn.weight] if m.bn is not None else [m.conv.bias])
            out.append([t.detach().numpy().copy() for t in ts])
    return out


def _small_model(tmp_path):
    text = ("[net]\nwidth=16\nheight=16\nchannels=3\nbatch=1\n\n"
            "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\nstride=1\npad=1\n"
            "activation=leaky\n\n"
            "[convolutional]\nfilters=3\nsize=1\nstride=1\npad=1\nactivation=linear\n")
    p = tmp_path / "two.cfg"
    p.write_text(text)
    return darknet_cfg.build_model(str(p))


@pytest.mark.parametrize("alpha", [0.9998, 0.9])
def test_ema_matches_darknet_transcription(tmp_path, alpha):
    model = _small_model(tmp_path)
    max_batches = 2008                                  # start 1004, apply 1008
    ema, ref = DarknetEMA(model, alpha), DarknetTranscription(alpha, max_batches)
    g = torch.Generator().manual_seed(0)
    live = _conv_arrays(model)
    actions = []
    for cur in range(1002, 1011):
        with torch.no_grad():                           # "SGD": every trained tensor moves
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            for b in model.buffers():
                if b.dtype.is_floating_point:
                    b.add_(0.01)
        live = _conv_arrays(model)
        running = [b.clone() for n, b in model.named_buffers() if "running" in n]
        did = ema.step(cur, max_batches)
        assert did == ref.step(cur, live), cur
        actions.append(did)
        mine = _conv_arrays(model)
        for lm, lr in zip(mine, live):                  # live weights (ema_apply replaces them)
            for a, b in zip(lm, lr):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
        if ema.ema is not None:                         # the averages themselves
            flat = [t for l in ref.ema for t in l]
            order = [l[0] for l in ref.ema] + [t for l in ref.ema for t in l[1:]]
            assert len(flat) == len(ema.ema)
            for e, r in zip(ema.ema, order):
                np.testing.assert_allclose(e.numpy(), r, rtol=1e-6, atol=1e-12)
        # rolling statistics are never averaged nor replaced
        for b0, b1 in zip(running, [b for n, b in model.named_buffers() if "running" in n]):
            assert torch.equal(b0, b1)
    assert actions == [None, None, "init", "update", "update", "update", "apply", None, None]


def test_ema_short_run_never_applies(tmp_path):
    model = _small_model(tmp_path)
    ema = DarknetEMA(model, 0.9998)
    before = [p.detach().clone() for p in model.parameters()]
    acts = [ema.step(cur, 600) for cur in range(1, 601)]
    assert acts[299] == "init" and set(acts) == {None, "init"}   # apply point -400 < start 300
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_trainer_runs_darknet_ema(tmp_path):
    data = make_synthetic(tmp_path / "synth", images=8, classes=3, size=64, valid=2, seed=1)
    cfg = _cfg(tmp_path, ema_alpha=0.9, max_batches=2004)   # start 1002, apply 1004
    m = darknet_cfg.build_model(cfg)
    m.header = dict(major=0, minor=2, revision=5, seen=1001 * 4)
    w = str(tmp_path / "resume.weights")
    darknet_cfg.save_weights(m, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CfgWarning)       # ema_alpha no longer warns
        tr = Trainer(TrainOptions(data=data["data"], cfg=cfg, weights=w, workers=0, progress=False,
                                  backup=str(tmp_path / "backup"), log=lambda s: None))
    assert tr.iteration == 1001
    ref = DarknetTranscription(0.9, 2004)
    seen = []
    real = tr.ema.step

    def step(cur, max_batches):
        live = _conv_arrays(tr.model)
        expect = ref.step(cur, live)                    # live now holds darknet's result
        did = real(cur, max_batches)
        assert did == expect
        seen.append(did)
        for lm, lr in zip(_conv_arrays(tr.model), live):
            for a, b in zip(lm, lr):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        return did
    tr.ema.step = step
    tr.model.to(memory_format=torch.contiguous_format)  # numpy views below read NCHW
    batches = iter(tr.loader())
    for _ in range(4):
        tr.train_iteration([next(batches) for _ in range(tr.sub)])
    assert seen == ["init", "update", "apply", None]
