"""The trainer end to end on a tiny synthetic dataset (CPU, a few iterations each)."""
import math
import os
import re

import numpy as np
import pytest
import torch

import darknet_cfg
from conftest import mini_cfg
from darknet_cfg.data import DataError
from darknet_cfg.synth import make_synthetic
from darknet_cfg.train import Trainer, TrainOptions, get_current_rate

MINI = os.path.join(os.path.dirname(darknet_cfg.__file__), "cfg", "yolov4-tiny-mini.cfg")
if not os.path.isfile(MINI):
    MINI = os.path.join(os.path.dirname(__file__), "..", "cfg", "yolov4-tiny-mini.cfg")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return make_synthetic(d, images=12, classes=3, size=64, valid=4, seed=3)


def _cfg(tmp_path, **over):
    """The shipped mini cfg at 64x64 with a small batch (the trainer reads size from the cfg)."""
    return mini_cfg(tmp_path, **{"width": 64, "height": 64, "batch": 4, "subdivisions": 2,
                                 "burn_in": 3, "max_batches": 6, **over})


def _opts(dataset, cfg, tmp_path, **kw):
    kw.setdefault("workers", 0)
    return TrainOptions(data=dataset["data"], cfg=cfg, backup=str(tmp_path / "backup"), progress=False,
                        log=lambda m: None, **kw)


def test_train_writes_reloadable_checkpoints(dataset, tmp_path):
    cfg = _cfg(tmp_path)
    tr = Trainer(_opts(dataset, cfg, tmp_path, workers=1))
    res = tr.run()
    assert res["iteration"] == 6
    rates = [h["rate"] for h in tr.o.history]
    s = tr.settings
    assert rates == pytest.approx([get_current_rate(s, i) for i in range(1, 7)])
    assert all(np.isfinite(h["loss"]) for h in tr.o.history)
    final = tr.names["final"]
    assert os.path.isfile(final) and os.path.isfile(tr.names["last"])
    m2 = darknet_cfg.load(cfg, final)
    assert m2.header["seen"] == 6 * 4                 # iteration * batch * subdivisions (cfg batch)
    tr.model.eval()
    mine = tr.model.state_dict()
    for k, v in m2.state_dict().items():                # every tensor, bit for bit
        assert torch.equal(mine[k], v), k
    # same outputs, bit for bit, run in the trainer's memory format (on CPU it trains
    # channels_last; NCHW kernels would round differently, ~1e-6)
    m2.to(memory_format=tr.memory_format)
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=tr.memory_format)
    with torch.no_grad():
        for a, b in zip(tr.model(x), m2(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the weights moved
    m0 = darknet_cfg.build_model(cfg)
    assert not torch.equal(m0.layers[0].conv.weight, m2.layers[0].conv.weight)


def test_resume_continues_iteration_and_schedule(dataset, tmp_path):
    cfg = _cfg(tmp_path, max_batches=4)
    Trainer(_opts(dataset, cfg, tmp_path)).run()
    last = str(tmp_path / "backup" / "mini_last.weights")
    assert darknet_cfg.load(cfg, last).header["seen"] == 16
    tr = Trainer(_opts(dataset, cfg, tmp_path, weights=last, max_batches=7))
    assert tr.iteration == 4
    tr.run()
    assert [h["iteration"] for h in tr.o.history] == [5, 6, 7]
    assert [h["rate"] for h in tr.o.history] == pytest.approx(
        [get_current_rate(tr.settings, i) for i in (5, 6, 7)])
    assert darknet_cfg.load(cfg, tr.names["final"]).header["seen"] == 7 * 4
    # --clear restarts the count
    tr = Trainer(_opts(dataset, cfg, tmp_path, weights=last, clear=True, max_batches=1))
    assert tr.iteration == 0


def test_failed_checkpoint_write_keeps_previous_file(dataset, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_batches=2)
    tr = Trainer(_opts(dataset, cfg, tmp_path))
    tr.run()
    last = tr.names["last"]
    before = open(last, "rb").read()
    from darknet_cfg.converters import weights as W
    real = W.weights_bytes_iter

    def failing(*a, **k):
        for n, chunk in enumerate(real(*a, **k)):
            if n == 3:
                raise OSError(28, "No space left on device (simulated)")
            yield chunk
    monkeypatch.setattr(W, "weights_bytes_iter", failing)
    with torch.no_grad():
        tr.model.layers[0].conv.weight.add_(1.0)
    tr.iteration += 1
    with pytest.raises(OSError):
        tr.save(last)
    assert open(last, "rb").read() == before
    assert not [f for f in os.listdir(os.path.dirname(last))
                if f.startswith(".") and f.endswith(W.PARTIAL_SUFFIX)]
    monkeypatch.setattr(W, "weights_bytes_iter", real)
    m = darknet_cfg.load(cfg, last)                   # still loadable, the old iteration
    assert m.header["seen"] == 2 * 4


def test_periodic_checkpoint_names(dataset, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_batches=3)
    tr = Trainer(_opts(dataset, cfg, tmp_path))
    saved = []
    monkeypatch.setattr(tr, "save", lambda path: saved.append((tr.iteration, os.path.basename(path))))
    # pretend we resumed at 998: iteration 1000 writes _1000 and _last
    tr.iteration = tr.start_iteration = 998
    tr.max_batches = 1001
    tr.run()
    assert (1000, "mini_1000.weights") in saved and (1000, "mini_last.weights") in saved
    assert (1001, "mini_final.weights") in saved
    assert not any(name == "mini_last.weights" for it, name in saved if it == 999)


def test_classes_mismatch_and_empty_dataset(dataset, tmp_path):
    cfg = _cfg(tmp_path)
    bad = tmp_path / "bad.data"
    bad.write_text(open(dataset["data"]).read().replace("classes = 3", "classes = 5"))
    with pytest.raises(DataError, match=r"classes=5.*classes=3"):
        Trainer(TrainOptions(data=str(bad), cfg=cfg, progress=False, log=lambda m: None))
    empty = tmp_path / "empty.txt"
    empty.write_text(str(tmp_path / "nope.jpg") + "\n")
    d2 = tmp_path / "empty.data"
    d2.write_text(f"classes = 3\ntrain = {empty}\nbackup = {tmp_path}\n")
    with pytest.raises(DataError, match="no usable image"):
        Trainer(TrainOptions(data=str(d2), cfg=cfg, progress=False, log=lambda m: None))


def test_unsupported_training_keys_warn_with_line(dataset, tmp_path):
    cfg = _cfg(tmp_path, cutmix=1, ema_alpha=0.999, dynamic_minibatch=1)
    lines = {l.split("=")[0]: i for i, l in enumerate(open(cfg).read().splitlines(), 1)}
    with pytest.warns(UserWarning) as rec:
        Trainer(_opts(dataset, cfg, tmp_path))
    msgs = [str(w.message) for w in rec]
    # cutmix: darknet's detector ignores it too (classifier only)
    assert any(re.match(rf".*mini.cfg:{lines['cutmix']}: \[net\] cutmix=1 is not supported.*"
                        r"CutMix is for classifiers", m) for m in msgs), msgs
    assert any(f"mini.cfg:{lines['dynamic_minibatch']}: [net] dynamic_minibatch=1 is not supported"
               in m for m in msgs)
    assert not any("ema_alpha" in m for m in msgs)   # Darknet's EMA is implemented (issue 12)


def test_multiscale_sizes(dataset, tmp_path):
    cfg = _cfg(tmp_path, max_batches=400)
    text = open(cfg).read().replace("random=0", "random=1")
    open(cfg, "w").write(text)
    tr = Trainer(_opts(dataset, cfg, tmp_path))
    sizes = [tr.size_for(i) for i in range(0, 400)]
    # darknet: round(1.4 * 64 / 32 + 1) * 32 = 128 (the +1 is darknet's); the first block uses it
    assert sizes[0] == sizes[9] == (128, 128)
    assert all(sizes[i] == sizes[i - i % 10] for i in range(400))
    assert all(w % 32 == 0 and h % 32 == 0 and w >= 32 for w, h in sizes)
    assert len(set(sizes[10:300])) > 1
    assert sizes[-1] == (128, 128)                     # the last 100 iterations: the largest


def test_cli_synth_train_map(tmp_path):
    from click.testing import CliRunner
    from darknet_cfg.cli import main
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "ds"), "--images", "6", "--valid", "3",
                                  "--classes", "2", "--size", "64", "--ext", "png"])
    assert r.exit_code == 0, r.output
    data = str(tmp_path / "ds" / "obj.data")
    cfg = _cfg(tmp_path)
    text = open(cfg).read().replace("classes=3", "classes=2").replace("filters=24", "filters=21")
    open(cfg, "w").write(text)
    r = CliRunner().invoke(main, ["train", data, cfg, "--max-batches", "2", "--workers", "0",
                                  "--map", "--map-every", "1", "--no-winograd"])
    assert r.exit_code == 0, r.output
    assert "mini_final.weights" in r.output
    backup = tmp_path / "ds" / "backup"
    assert (backup / "mini_best.weights").is_file() and (backup / "chart.png").is_file()
    r = CliRunner().invoke(main, ["map", data, cfg, str(backup / "mini_final.weights"), "-points", "11"])
    assert r.exit_code == 0, r.output
    assert "mean average precision (mAP@0.50)" in r.output and "used 11 Recall-points" in r.output  # Darknet's wording
    r = CliRunner().invoke(main, ["train", data, str(tmp_path / "missing.cfg")])
    assert r.exit_code != 0


def test_threaded_batches_equal_dataloader_batches(dataset, tmp_path):
    """workers=0 on CPU: batches loaded in-process on a thread pool are exactly the batches a
    single-process DataLoader gives (every image has its own random stream)."""
    import itertools
    import torch
    from torch.utils.data import DataLoader
    from darknet_cfg.data import ScaleBatchSampler, ThreadedBatches, collate
    tr = Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, workers=0))
    loader = tr.loader()
    assert isinstance(loader, ThreadedBatches) and tr.workers == 0

    def sampler():
        return ScaleBatchSampler(len(tr.dataset), tr.mini, tr.sub, 0, tr.max_batches, tr.size_for,
                                 seed=tr.o.seed)
    ref = DataLoader(tr.dataset, batch_sampler=sampler(), collate_fn=collate, num_workers=0)
    for (x, t), (xr, tr_) in itertools.islice(zip(ThreadedBatches(tr.dataset, sampler(), 3), ref), 4):
        assert torch.equal(x, xr) and torch.equal(t, tr_)


def test_auto_workers_leave_the_training_cores_alone(dataset, tmp_path, monkeypatch):
    import os
    import torch
    tr = Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, workers=None))
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(threads)), raising=False)
    assert tr.workers == 0                       # every core runs the step: load in-process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(threads + 3)), raising=False)
    assert tr.workers == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(threads + 9)), raising=False)
    assert tr.workers == 4


def test_winograd_training_is_the_cpu_default(dataset, tmp_path):
    """On CPU the convolutions train by Winograd unless TrainOptions(winograd=False) /
    train --no-winograd; a short run trains and its loss stays finite."""
    from darknet_cfg.layers.conv import ConvBnAct
    tr = Trainer(_opts(dataset, _cfg(tmp_path, max_batches=2), tmp_path))
    assert all(m.winograd_train for m in tr.model.modules() if isinstance(m, ConvBnAct))
    res = tr.run()
    assert res["iteration"] == 2
    assert all(math.isfinite(h["loss"]) for h in tr.o.history)
    off = Trainer(_opts(dataset, _cfg(tmp_path, max_batches=2), tmp_path, winograd=False))
    assert not any(m.winograd_train for m in off.model.modules() if isinstance(m, ConvBnAct))
