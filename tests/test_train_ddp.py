"""Distributed training (torchrun, gloo on CPU): 2 processes x 4 images per iteration give the
same weights as 1 process with the same 8-image iteration split into 2 subdivisions of 4."""
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import darknet_cfg
from darknet_cfg.synth import make_synthetic

SCRIPT = r'''
import sys, torch
torch.set_num_threads(1)
from darknet_cfg.train import Trainer, TrainOptions
data, cfg, backup = sys.argv[1:4]
Trainer(TrainOptions(data=data, cfg=cfg, backup=backup, workers=0, progress=False, seed=5,
                     log=lambda m: None)).run()
'''


def _cfg(tmp_path, name, batch, subdivisions):
    from test_train import MINI
    text = open(MINI).read()
    for k, v in dict(width=64, height=64, batch=batch, subdivisions=subdivisions, burn_in=0,
                     max_batches=2, learning_rate=0.01).items():
        text, n = re.subn(rf"(?m)^{k}\s*=.*$", f"{k}={v}", text, count=1)
        assert n == 1
    p = tmp_path / f"{name}.cfg"
    p.write_text(text)
    return str(p)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    ds = make_synthetic(tmp_path / "ds", images=16, classes=3, size=64, valid=1, seed=2)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = _cfg(tmp_path, "one", batch=8, subdivisions=2)
    r = subprocess.run([sys.executable, str(script), ds["data"], one, str(tmp_path / "b1")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = _cfg(tmp_path, "two", batch=4, subdivisions=1)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script),
                        ds["data"], two, str(tmp_path / "b2")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m1 = darknet_cfg.load(one, str(tmp_path / "b1" / "one_final.weights"))
    m2 = darknet_cfg.load(two, str(tmp_path / "b2" / "two_final.weights"))
    assert m1.header["seen"] == m2.header["seen"] == 2 * 8
    start = darknet_cfg.build_model(one)
    moved = 0
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        np.testing.assert_allclose(p1.detach().numpy(), p2.detach().numpy(), rtol=0, atol=1e-5, err_msg=n)
        moved += 1
    assert moved > 0
    # rolling statistics are not compared: 1 process updates them once per subdivision (4
    # updates here), 2 processes once per iteration with the average over the processes (2)
