"""Worst difference to Darknet's outputs for every oracle model (eager and BN-folded).

    python bench/parity_report.py [NAME ...]

Weights are regenerated with the oracle's make_weights.py; inputs are the oracle's input.npy.
Prints max |ours - darknet| over all output tensors and the same relative to max(1, |darknet|).
"""
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import model_names, oracle_io  # noqa: E402
from test_parity import load_oracle_model, reference  # noqa: E402


def worst(model, m, oio):
    with torch.no_grad():
        ys = model(torch.from_numpy(m.input)[None])
    refs = reference(oio, model, m)
    abs_d = rel_d = 0.0
    for idx, y in zip(model.output_indices, ys):
        ref = refs[idx]
        d = np.abs(y[0].numpy().reshape(ref.shape) - ref)
        abs_d = max(abs_d, float(d.max()))
        rel_d = max(rel_d, float((d / np.maximum(1.0, np.abs(ref))).max()))
    return abs_d, rel_d


def main():
    torch.set_num_threads(2)
    names = sys.argv[1:] or model_names()
    print(f"{'model':32s} {'max abs':>9s} {'max rel':>9s} {'fused abs':>9s} {'fused rel':>9s}  s")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                oio, m, model = load_oracle_model(name, Path(tmp))
            a, r = worst(model, m, oio)
            fa, fr = worst(model.fuse(), m, oio)
            print(f"{name:32s} {a:9.2e} {r:9.2e} {fa:9.2e} {fr:9.2e}  {time.time() - t:.1f}")


if __name__ == "__main__":
    main()
