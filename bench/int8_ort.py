"""int8 by ONNX Runtime, for comparison in bench/infer.py (engine ``int8-ort``): static QDQ
quantization of the model's ONNX export (per-channel int8 weights, uint8 activations with MinMax
ranges, the same float convolutions as darknet_cfg's int8: the first one and the head feeders),
run by ONNX Runtime's VNNI kernels. darknet_cfg's own int8 (oneDNN through PyTorch,
darknet_cfg/lowp.py) replaced it as ``Detector(precision="int8")`` because it measured faster.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from darknet_cfg.errors import DarknetError

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
    from darknet_cfg.layers.activations import ACTIVATIONS, Activation
    acts = [m for m in model.modules() if isinstance(m, Activation) and m.name == "mish"]
    for m in acts:
        m.fn = _mish_exp
    try:
        yield
    finally:
        for m in acts:
            m.fn = ACTIVATIONS["mish"]


def quantize(model, batches: Sequence[np.ndarray], path) -> None:
    """Export ``model`` (fused, float32) to ONNX and write its int8 QDQ quantization to ``path``,
    with activation ranges from ``batches`` (each (1, 3, h, w) float32)."""
    import onnx
    _ort()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from darknet_cfg.converters.weights import atomic_write
    from darknet_cfg.export import export_onnx

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
        atomic_write(Path(path), [onnx.load(q8).SerializeToString()])


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


