"""The optional C helpers setup.py builds (layers/_winograd.c, layers/_quantize.c), loaded with
ctypes after torch so that their OpenMP loops run on torch's own OpenMP runtime."""
from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path
from typing import Optional

import torch


def load(stem: str) -> Optional[ctypes.CDLL]:
    """``layers/<stem>.<ext suffix>``, or None: not built (no C compiler, not x86-64 Linux) or a
    CPU without AVX2/FMA."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(stem + suffix)
        if path.is_file():
            return ctypes.CDLL(str(path))
    return None
