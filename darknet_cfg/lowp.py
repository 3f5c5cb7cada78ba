"""Opt-in low-precision CPU inference for ``Detector``: bfloat16 and int8 (not Darknet's numbers).

``bf16``: BN folded, weights and activations in bfloat16, channels_last, convolutions through
oneDNN with prepacked bf16 weights and the activation fused (layers/onednn.py), mish compiled
(``model.compile_activations()``: float math, one rounding to bfloat16; a few seconds of
compiling on first use). The convolutions that feed the detection layers, the detection layers
themselves, decoding and NMS stay float32. Needs AVX512-BF16 or AMX: elsewhere oneDNN would
emulate bfloat16 slower than float32, so ``Detector`` warns and runs float32.

``int8``: post-training static quantization by ONNX Runtime (QDQ, per-channel int8 weights,
uint8 activations with MinMax ranges) of the model's ONNX export, calibrated on the user's
images, run by ONNX Runtime's CPU kernels (VNNI). Convolutions, max-pool, concat, upsample and
leaky are quantized (``QUANTIZED_OPS``); the first convolution, the convolutions that feed the
detection layers, mish and shortcut adds stay float32. The quantized model is saved (``calib_cache``)
with a fingerprint of the float model, so later runs load it instead of calibrating again.
Needs AVX512-VNNI, AVX-VNNI or AMX (elsewhere ONNX Runtime's uint8 x int8 kernels may saturate)
and ``onnxruntime``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .errors import DarknetError

PRECISIONS = ("fp32", "bf16", "int8")
CALIB_IMAGES = 32    # default number of calibration images (the first ones of the folder, sorted)
_FINGERPRINT_KEY = "darknet_cfg.fingerprint"


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
    if not cpu_supports(precision):
        need = "AVX512-BF16 or AMX" if precision == "bf16" else "AVX512-VNNI, AVX-VNNI or AMX"
        warnings.warn(f"precision={precision!r}: this CPU has no {need} instructions (emulation "
                      f"would be slower than float32); running float32")
        return "fp32"
    return precision


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

def fingerprint(model) -> str:
    """Hash of what the float model computes: cfg text, input size, every tensor."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.cfg_text.encode())
    h.update(f"{model.width}x{model.height}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _ort():
    try:
        import onnxruntime
        from onnxruntime import quantization  # noqa: F401
    except ImportError:
        raise DarknetError("int8 inference needs onnxruntime: pip install onnxruntime "
                           "(or pip install 'darknet_cfg[onnx]')") from None
    return onnxruntime


def _float_convs(onnx_model) -> List[str]:
    """Names of the Conv nodes kept float32: the one reading the input, and those whose output
    reaches a graph output through non-Conv nodes only (the convolutions feeding the heads)."""
    nodes = onnx_model.graph.node
    producer = {o: n for n in nodes for o in n.output}
    keep = [n.name for n in nodes if n.op_type == "Conv" and "input" in n.input]
    stack, seen = [o.name for o in onnx_model.graph.output], set()
    while stack:
        n = producer.get(stack.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type == "Conv":
            keep.append(n.name)
        else:
            stack.extend(n.input)
    return keep


CALIBRATION = "MinMax"  # onnxruntime.quantization.CalibrationMethod
# quantized operators; the rest (mish's element-wise ops, shortcut adds, the heads) run in float
QUANTIZED_OPS = ["Conv", "MaxPool", "Concat", "Resize", "LeakyRelu", "Relu"]


def _mish_exp(x: torch.Tensor) -> torch.Tensor:
    """mish as x * n / (n + 2), n = e * (e + 2), e = exp(min(x, 20)) (layers/activations.py
    ``_mish_one_exp``); for x > 20, n / (n + 2) rounds to 1 in float32, so no Where is needed."""
    e = torch.exp(torch.clamp(x, max=20.0))
    n = e * (e + 2)
    return x * (n / (n + 2))


@contextmanager
def _one_exp_mish(model):
    """Export mish as exp and arithmetic: ONNX Runtime's Softplus, which the Mish op expands
    to, is 20-40x slower than its Exp (and its Where is slow too)."""
    from .layers.activations import ACTIVATIONS, Activation
    acts = [m for m in model.modules() if isinstance(m, Activation) and m.name == "mish"]
    for m in acts:
        m.fn = _mish_exp
    try:
        yield
    finally:
        for m in acts:
            m.fn = ACTIVATIONS["mish"]


def quantize(model, batches: Sequence[np.ndarray], path, fp: str) -> None:
    """Export ``model`` (fused, float32) to ONNX and write its int8 QDQ quantization to ``path``,
    with activation ranges from ``batches`` (each (1, 3, h, w) float32)."""
    import onnx
    _ort()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from .converters.weights import atomic_write
    from .export import export_onnx

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    with tempfile.TemporaryDirectory(prefix="darknet-cfg-int8.") as tmp:
        f32, pre, q8 = (os.path.join(tmp, f) for f in ("f32.onnx", "pre.onnx", "int8.onnx"))
        with _one_exp_mish(model):
            export_onnx(model, f32, dynamic_batch=True)
        quant_pre_process(f32, pre, skip_symbolic_shape=True)
        keep = _float_convs(onnx.load(pre))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(pre, q8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, CALIBRATION),
                            nodes_to_exclude=keep,
                            op_types_to_quantize=QUANTIZED_OPS)
        m = onnx.load(q8)
        onnx.helper.set_model_props(m, {_FINGERPRINT_KEY: fp, "darknet_cfg.calibration_images":
                                        str(len(batches))})
        atomic_write(Path(path), [m.SerializeToString()])


def cached_fingerprint(path) -> Optional[str]:
    """The fingerprint stored in a saved int8 model, or None (no file, not ours)."""
    if not os.path.isfile(path):
        return None
    import onnx
    try:
        m = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (a truncated or foreign file: calibrate again)
        return None
    return {p.key: p.value for p in m.metadata_props}.get(_FINGERPRINT_KEY)


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


class Int8Runner:
    """``runner(x)`` -> head outputs as torch tensors, from ONNX Runtime's int8 session."""

    def __init__(self, path, threads: Optional[int] = None):
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(os.fspath(path), so,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = self.session.run(None, {"input": x.float().contiguous().numpy()})
        return [torch.from_numpy(o) for o in outs]


def int8_runner(model, prepare: Callable, calib=None, calib_cache=None,
                calib_count: int = CALIB_IMAGES) -> Int8Runner:
    """The int8 session for ``model`` (fused here): loaded from ``calib_cache`` when it holds this
    model's quantization, else calibrated on ``calib`` (a folder or image paths; ``prepare``
    makes the network input of one) and saved to ``calib_cache`` (when given)."""
    model.fuse()
    fp = fingerprint(model)
    if calib_cache is not None and cached_fingerprint(calib_cache) == fp:
        return Int8Runner(calib_cache)
    if calib is None:
        why = f"{calib_cache} is for another model" if calib_cache is not None and \
            os.path.exists(calib_cache) else "no saved calibration"
        raise DarknetError(f"int8 needs calibration images ({why}): pass a folder of images "
                           "(detect --calib DIR)")
    batches = [prepare(p)[0][None] for p in calibration_images(calib, calib_count)]
    if calib_cache is not None:
        quantize(model, batches, calib_cache, fp)
        return Int8Runner(calib_cache)
    with tempfile.TemporaryDirectory(prefix="darknet-cfg-int8.") as tmp:
        path = os.path.join(tmp, "int8.onnx")
        quantize(model, batches, path, fp)
        return Int8Runner(path)  # the session keeps what it needs in memory
