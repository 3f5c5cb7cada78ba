"""Time to load .weights into a built model, as a ratio to numpy.fromfile of the same file.

    python bench/load_weights.py [CFG] [--runs 7]

CFG defaults to ../shared/darknet-cfg/yolov4.cfg (64M floats). The weights are random, written by
darknet_cfg itself into a temporary folder. Both readers run interleaved on the cached file;
medians are reported, plus the peak RSS growth during one load (Linux VmHWM, reset through
/proc/self/clear_refs) relative to the file size.
"""
import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import darknet_cfg

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DARKNET_CFG_SHARED", REPO.parent / "shared"))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_growth(fn) -> int:
    """Peak RSS increase (bytes) while fn runs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return -1
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cfg", nargs="?", default=str(SHARED / "darknet-cfg" / "yolov4.cfg"))
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = darknet_cfg.build_model(a.cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.weights"
        darknet_cfg.save_weights(model, path)
        size = path.stat().st_size
        np.fromfile(path, dtype="<f4", offset=20)  # warm the page cache
        ref_t, ours_t = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            arr = np.fromfile(path, dtype="<f4", offset=20)
            ref_t.append(time.perf_counter() - t)
            del arr
            t = time.perf_counter()
            darknet_cfg.load_weights(model, path)
            ours_t.append(time.perf_counter() - t)
        growth = peak_growth(lambda: darknet_cfg.load_weights(model, path))
        ref_growth = peak_growth(lambda: np.fromfile(path, dtype="<f4", offset=20))
    ref, ours = statistics.median(ref_t), statistics.median(ours_t)
    print(f"cfg: {a.cfg}")
    print(f"file: {size / 1e6:.1f} MB ({(size - 20) // 4} floats), {a.runs} interleaved runs")
    print(f"numpy.fromfile (reference): {ref * 1e3:8.1f} ms  median")
    print(f"darknet_cfg.load_weights:   {ours * 1e3:8.1f} ms  median")
    print(f"ratio load_weights / fromfile: {ours / ref:.2f}x  (target <= 1.2x)")
    print(f"peak RSS growth during load: {growth / 1e6:.1f} MB = {growth / size:.2f}x the file "
          f"(numpy.fromfile alone: {ref_growth / size:.2f}x; target <= 1.2x)")


if __name__ == "__main__":
    main()
