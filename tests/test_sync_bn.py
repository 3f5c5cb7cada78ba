"""train --sync-bn / TrainOptions.sync_bn: BatchNorm -> torch.nn.SyncBatchNorm for multi-process
CUDA training; warned and ignored with one process; an error for CPU (gloo) processes."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import darknet_cfg
import darknet_cfg.train as train_mod
from darknet_cfg.errors import DarknetError
from darknet_cfg.synth import make_synthetic
from darknet_cfg.train import (Trainer, TrainOptions, _darknet_bn_forward, _sync_bn_apply,
                               _sync_gradients_and_stats, convert_sync_batchnorm,
                               use_darknet_batchnorm)
from test_train import MINI, _cfg, _opts

HAVE_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=4, classes=3, size=64,
                          valid=1, seed=3)


def _bns(model, cls=nn.modules.batchnorm._BatchNorm):
    return [m for m in model.modules() if isinstance(m, cls)]


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in _bns(model):
            for t in (bn.weight, bn.bias, bn.running_mean):
                t.copy_(torch.randn(t.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)


def test_cli_passes_sync_bn(monkeypatch, tmp_path):
    from darknet_cfg.cli import main
    seen = {}

    class Fake:
        def __init__(self, opts):
            seen["opts"] = opts
            raise DarknetError("stop here")

    monkeypatch.setattr(train_mod, "Trainer", Fake)
    data, cfg = tmp_path / "a.data", tmp_path / "a.cfg"
    for p in (data, cfg):
        p.write_text("")
    r = CliRunner().invoke(main, ["train", str(data), str(cfg), "--sync-bn"])
    assert "stop here" in r.output and seen["opts"].sync_bn is True
    CliRunner().invoke(main, ["train", str(data), str(cfg)])
    assert seen["opts"].sync_bn is False
    assert "--sync-bn" in CliRunner().invoke(main, ["train", "--help"]).output
    assert TrainOptions(data="d", cfg="c").sync_bn is False


def test_one_process_warns_and_ignores(dataset, tmp_path):
    with pytest.warns(RuntimeWarning, match="--sync-bn ignored: one training process"):
        tr = Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, sync_bn=True))
    assert tr.sync_bn is False and not _bns(tr.model, nn.SyncBatchNorm)


def test_cpu_processes_are_an_error(dataset, tmp_path, monkeypatch):
    """Two CPU (gloo) processes: a DarknetError before any collective."""
    monkeypatch.setattr(train_mod, "_init_distributed", lambda device: (0, 2, False))
    with pytest.raises(DarknetError, match=r"SyncBatchNorm needs CUDA processes \(NCCL\)"):
        Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, sync_bn=True))


def test_torch_sync_bn_refuses_cpu_and_stats_skipped(tmp_path, monkeypatch):
    """Why the error: torch 2.13's SyncBatchNorm raises for CPU tensors in a process group
    (gloo). And with sync_bn the all_reduce carries no running statistics."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bn = nn.SyncBatchNorm(4).train()
        with pytest.raises(ValueError, match="GPU"):
            bn(torch.randn(2, 4, 3, 3))
        model = darknet_cfg.build_model(MINI)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        sizes = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (sizes.append(t.numel()),
                                                                 real(t, **kw))[1])
        before = [b.clone() for b in model.buffers()]
        assert _sync_gradients_and_stats(model, 2.0) == 2.0
        assert _sync_gradients_and_stats(model, 3.0, stats=False) == 3.0
        n_stats = sum(b.numel() for n, b in model.named_buffers()
                      if n.endswith(("running_mean", "running_var")))
        assert sizes[0] - sizes[1] == n_stats > 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    finally:
        dist.destroy_process_group()


def test_weights_save_and_load_after_conversion(tmp_path):
    model = darknet_cfg.build_model(MINI)
    _randomise_bn(model)
    a = tmp_path / "a.weights"
    darknet_cfg.save_weights(model, str(a))
    keys = list(model.state_dict())
    n_bn = len(_bns(model))
    use_darknet_batchnorm(model)
    model = convert_sync_batchnorm(model)
    assert len(_bns(model, nn.SyncBatchNorm)) == n_bn > 0
    assert list(model.state_dict()) == keys
    b = tmp_path / "b.weights"
    darknet_cfg.save_weights(model, str(b))
    assert a.read_bytes() == b.read_bytes()
    fresh = convert_sync_batchnorm(darknet_cfg.build_model(MINI))
    darknet_cfg.load_weights(fresh, str(a))
    for (k, x), y in zip(model.state_dict().items(), fresh.state_dict().values()):
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(x, y), k


def test_converted_forward_without_group_is_darknet_bn():
    """No process group: a converted (darknet) SyncBatchNorm is darknet's BN forward (unbiased
    variance), output and running statistics; eval mode: plain inference."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=1e-5)).train()
    _randomise_bn(ref)
    sync = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=1e-5)))
    sync.load_state_dict(ref.state_dict())
    use_darknet_batchnorm(ref)
    x = torch.randn(4, 3, 8, 8)
    y_ref, y = ref(x), sync.train()(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(sync[1].running_var, ref[1].running_var, rtol=0, atol=0)
    c = sync[0](x)  # darknet: (x - mean) / sqrt(unbiased var + eps) * scale + bias
    v, m = c.var(dim=(0, 2, 3), unbiased=True), c.mean(dim=(0, 2, 3))
    want = (c - m[None, :, None, None]) / torch.sqrt(v + 1e-5)[None, :, None, None]
    want = want * sync[1].weight[None, :, None, None] + sync[1].bias[None, :, None, None]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    sync.eval(), ref.eval()
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ CUDA

@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_cuda_sync_bn_function_is_darknet_bn(tmp_path):
    """The synchronised darknet forward (torch's SyncBatchNorm function, 1-process NCCL group)
    equals darknet's BN forward: output, gradients and running statistics."""
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = nn.BatchNorm2d(6).cuda().train()
        _randomise_bn(ref)
        ref.cuda()
        sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(6))).cuda().train()[0]
        sync.load_state_dict(ref.state_dict())
        use_darknet_batchnorm(ref)
        x = torch.randn(3, 6, 7, 9, device="cuda", requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y_ref = ref(x)
        y = _sync_bn_apply(sync, x2, dist.group.WORLD, 1)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        (y_ref * torch.arange(y.numel(), device="cuda").view_as(y)).sum().backward()
        (y * torch.arange(y.numel(), device="cuda").view_as(y)).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sync.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(sync.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sync.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


SCRIPT = r'''
import sys, torch
from darknet_cfg.train import Trainer, TrainOptions
data, cfg, backup, sync = sys.argv[1:5]
Trainer(TrainOptions(data=data, cfg=cfg, backup=backup, workers=0, progress=False, seed=5,
                     device="cuda", sync_bn=sync == "1", log=lambda m: None)).run()
'''


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpu_sync_bn_matches_one_process_whole_batch(tmp_path):
    """2 processes x 4 images with --sync-bn == 1 process with the 8 images in one mini-batch
    (batch norm over the same 8 images), weights and running statistics."""
    from test_train_ddp import _cfg as ddp_cfg, _free_port
    ds = make_synthetic(tmp_path / "ds", images=16, classes=3, size=64, valid=1, seed=2)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    one = ddp_cfg(tmp_path, "one", batch=8, subdivisions=1)
    r = subprocess.run([sys.executable, str(script), ds["data"], one, str(tmp_path / "b1"), "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = ddp_cfg(tmp_path, "two", batch=4, subdivisions=1)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script),
                        ds["data"], two, str(tmp_path / "b2"), "1"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1 = darknet_cfg.load(one, str(tmp_path / "b1" / "one_final.weights"))
        m2 = darknet_cfg.load(two, str(tmp_path / "b2" / "two_final.weights"))
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        if not n.endswith("num_batches_tracked"):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=n)
