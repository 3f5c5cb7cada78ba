"""Byte formats: Darknet .weights, PyTorch checkpoints, ONNX."""
from .weights import LoadReport, WeightsHeader, load_weights, save_weights  # noqa: F401
