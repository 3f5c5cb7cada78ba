"""Process-level CPU runtime settings that make PyTorch's CPU path faster.

``keep_freed_memory()``: glibc's malloc serves every block over its (adaptive) mmap threshold
with a fresh ``mmap`` and unmaps it on free, so each forward pass page-faults its activations
in again (yolov4 at 416: ~25,000 faults, 10% of a forward pass; yolov4-csp: 44,000). Raising
the mmap threshold to glibc's maximum (32 MiB) and the trim threshold keeps freed blocks in the
heap for the next pass. Peak memory is unchanged; memory freed after a run is kept by the
process instead of being returned to the system. ``Detector`` and ``Trainer`` call it on CPU;
``DARKNET_CFG_MALLOC=0`` in the environment turns it off. Other C libraries: no effect.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # glibc's mallopt parameter numbers
_TRIM_THRESHOLD = (1 << 31) - 1                 # mallopt takes an int: its largest value
_state = {"done": None}


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process (see the module docstring); True if it applied."""
    if _state["done"] is not None:
        return _state["done"]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("DARKNET_CFG_MALLOC", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            ok = False
    _state["done"] = ok
    return ok
