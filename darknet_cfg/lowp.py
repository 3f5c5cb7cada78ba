"""Opt-in low-precision CPU inference for ``Detector``: bfloat16 and int8 (not Darknet's numbers).

``bf16``: BN folded, weights and activations in bfloat16, channels_last, convolutions through
oneDNN with prepacked bf16 weights and the activation fused (layers/onednn.py), mish compiled
(``model.compile_activations()``: float math, one rounding to bfloat16; a few seconds of
compiling on first use). The convolutions that feed the detection layers, the detection layers
themselves, decoding and NMS stay float32. Needs AVX512-BF16 or AMX: elsewhere oneDNN would
emulate bfloat16 slower than float32, so ``Detector`` warns and runs float32.

``int8``: post-training static quantization in PyTorch, run by oneDNN's VNNI kernels
(layers/quantized.py): every convolution except the first one, those feeding the detection
layers, binary and shared ones takes a uint8 input (one range per layer, the min and max over
the user's calibration images) and int8 weights (per output channel), accumulates in int32 and
writes bfloat16; the rest runs as in ``bf16`` (float32 where the CPU has no bfloat16). The
ranges are saved as JSON (``calib_cache``) with a fingerprint of the float model, so later runs
reuse them instead of calibrating again. Needs AVX512-VNNI, AVX-VNNI or AMX: elsewhere oneDNN's
int8 kernels are slower than float32, so ``Detector`` warns and runs float32. (ONNX Runtime's
static quantization of the ONNX export measured no faster here: bench/infer.py ``int8-ort``.)
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import DarknetError

PRECISIONS = ("fp32", "bf16", "int8")
CALIB_IMAGES = 32    # default number of calibration images (the first ones of the folder, sorted)


# ------------------------------------------------------------------------- CPU capability

def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports(precision: str) -> bool:
    """Whether this CPU has native instructions for ``precision`` (``fp32``: always)."""
    if precision == "fp32":
        return True
    cpu = getattr(torch, "cpu", None)
    probe = lambda name: bool(getattr(cpu, name, lambda: False)())
    flags = _cpu_flags()
    if precision == "bf16":
        return probe("_is_avx512_bf16_supported") or probe("_is_amx_tile_supported") or \
            bool(flags & {"avx512_bf16", "amx_bf16"})
    if precision == "int8":
        return probe("_is_vnni_supported") or probe("_is_amx_tile_supported") or \
            bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


def resolve(precision: str, device: torch.device) -> str:
    """The precision to run: ``precision``, or ``fp32`` (with a warning) where this CPU lacks the
    instructions or the device is not a CPU."""
    precision = {"float32": "fp32", "bfloat16": "bf16"}.get(precision, precision)
    if precision not in PRECISIONS:
        raise DarknetError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return precision
    if device.type != "cpu":
        warnings.warn(f"precision={precision!r} is for CPUs; running float32 on {device.type}")
        return "fp32"
    if precision == "int8" and not _int8_kernels():
        warnings.warn("precision='int8': this PyTorch build has no oneDNN int8 convolution "
                      "(torch.ops.onednn.qconv2d_pointwise); running float32")
        return "fp32"
    if not cpu_supports(precision):
        need = "AVX512-BF16 or AMX" if precision == "bf16" else "AVX512-VNNI, AVX-VNNI or AMX"
        warnings.warn(f"precision={precision!r}: this CPU has no {need} instructions (emulation "
                      f"would be slower than float32); running float32")
        return "fp32"
    return precision


def _int8_kernels() -> bool:
    from .layers.quantized import available
    return available()


# ---------------------------------------------------------------------------------- bf16

def head_feeders(model) -> List[int]:
    """Indices of the layers whose outputs the detection layers read."""
    return sorted({j for s in model.heads for j in model.inputs[s.index] if j >= 0})


def to_bf16(model) -> None:
    """Fold BN, cast to bfloat16 except the detection layers and the convolutions feeding them
    (a convolution runs in its weights' dtype: ConvBnAct casts its input)."""
    model.fuse()
    model.to(torch.bfloat16)
    for i in head_feeders(model) + [s.index for s in model.heads]:
        model.layers[i].float()
    model.compile_activations()  # mish: torch's bfloat16 mish is 3.5x slower than compiled


# ---------------------------------------------------------------------------------- int8

CALIBRATION_FORMAT = 1  # version of the saved calibration (JSON)


def fingerprint(model) -> str:
    """Hash of what the float model computes: cfg text, input size, every tensor."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.cfg_text.encode())
    h.update(f"{model.width}x{model.height}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def int8_layers(model) -> List[int]:
    """The convolutions run in int8: every fused [convolutional] except the first one (it reads
    the image), those feeding the detection layers (accuracy), binary/xnor and shared ones."""
    from .layers.conv import ConvBnAct
    from .layers.quantized import QuantizedConv
    layers = [m.layer if isinstance(m, QuantizedConv) else m for m in model.layers]
    convs = [i for i, m in enumerate(layers) if isinstance(m, ConvBnAct)]
    keep = set(head_feeders(model)) | set(convs[:1])
    return [i for i in convs if i not in keep and not layers[i]._shared and not layers[i].binary]


@torch.no_grad()
def calibrate(model, batches: Sequence[np.ndarray]) -> Dict[int, Tuple[float, float]]:
    """Input (min, max) of each int8 convolution over ``batches`` (MinMax calibration), from
    float32 forwards of ``model`` (fused)."""
    ranges: Dict[int, List[float]] = {}

    def hook(i):
        def record(_module, inputs):
            t = inputs[0]
            lo, hi = float(t.min()), float(t.max())
            r = ranges.setdefault(i, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return record

    hooks = [model.layers[i].register_forward_pre_hook(hook(i)) for i in int8_layers(model)]
    was = model.training
    model.eval()
    try:
        for b in batches:
            model(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return {i: (lo, hi) for i, (lo, hi) in ranges.items()}


def to_int8(model, ranges: Dict[int, Tuple[float, float]]) -> torch.dtype:
    """The calibrated convolutions replaced by int8 ones (layers/quantized.py), the rest as
    ``to_bf16`` makes it (float32, with mish compiled, on a CPU without bfloat16). Returns the
    dtype the model's input takes."""
    from .layers.quantized import QuantizedConv
    dtype = torch.bfloat16 if cpu_supports("bf16") else torch.float32
    if dtype == torch.bfloat16:
        to_bf16(model)
    else:
        model.fuse().compile_activations()
    for i in int8_layers(model):
        if i in ranges:
            model.layers[i] = QuantizedConv(model.layers[i], *ranges[i], out_dtype=dtype)
    return dtype


def save_calibration(path, fp: str, ranges: Dict[int, Tuple[float, float]], count: int) -> None:
    """The ranges as JSON with the model's fingerprint (a temporary file, then renamed)."""
    from .converters.weights import atomic_write
    doc = {"format": CALIBRATION_FORMAT, "fingerprint": fp, "calibration_images": count,
           "ranges": {str(i): [lo, hi] for i, (lo, hi) in sorted(ranges.items())}}
    atomic_write(Path(path), [json.dumps(doc, indent=1).encode()])


def load_calibration(path, fp: str) -> Optional[Dict[int, Tuple[float, float]]]:
    """The saved ranges when ``path`` holds this model's calibration, else None."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != CALIBRATION_FORMAT or doc.get("fingerprint") != fp:
            return None
        return {int(i): (float(lo), float(hi)) for i, (lo, hi) in doc["ranges"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, truncated or foreign: calibrate again


def calibration_images(source, count: int = CALIB_IMAGES) -> list:
    """Up to ``count`` images: a folder's image paths (sorted), or a list of paths or arrays."""
    from .cli_infer import IMAGE_EXTS
    if isinstance(source, (str, os.PathLike)):
        d = Path(source)
        if not d.is_dir():
            raise DarknetError(f"{d}: calibration images must be a folder")
        paths = [str(p) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    else:
        paths = [p if isinstance(p, np.ndarray) else os.fspath(p) for p in source]
    if not paths:
        raise DarknetError(f"{source}: no calibration images")
    return paths[:count]


def int8_ranges(model, prepare: Callable, calib=None, calib_cache=None,
                calib_count: int = CALIB_IMAGES) -> Dict[int, Tuple[float, float]]:
    """The calibrated input ranges for ``model`` (fused here): read from ``calib_cache`` when it
    holds this model's calibration, else measured on ``calib`` (a folder or images; ``prepare``
    makes the network input of one) and saved to ``calib_cache`` (when given)."""
    model.fuse()
    fp = fingerprint(model)
    if calib_cache is not None:
        ranges = load_calibration(calib_cache, fp)
        if ranges is not None:
            return ranges
    if calib is None:
        why = f"{calib_cache} is for another model" if calib_cache is not None and \
            os.path.exists(calib_cache) else "no saved calibration"
        raise DarknetError(f"int8 needs calibration images ({why}): pass a folder of images "
                           "(detect --calib DIR)")
    images = calibration_images(calib, calib_count)
    ranges = calibrate(model, [prepare(p)[0][None] for p in images])
    if calib_cache is not None:
        save_calibration(calib_cache, fp, ranges, len(images))
    return ranges
