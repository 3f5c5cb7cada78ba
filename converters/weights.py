"""Darknet .weights files: read into a DarknetModel and write back, byte for byte.

Format: int32 major, minor, revision; ``seen`` as uint64 when major*10+minor >= 2, else uint32;
then float32 segments, layer by layer in index order (``LayerSpec.weight_segments``). Layers with
``dontload=1`` are skipped on load (darknet's load_weights) but written on save. A [connected]
weight matrix is stored transposed when major or minor > 1000; a conv with ``flipped=1`` too.
"""
from __future__ import annotations

import os
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DarknetWeightsError, WeightsWarning
from ..specs import LayerSpec

MAX_VERSION = 1 << 20  # no darknet ever wrote a larger major/minor/revision


@dataclass
class WeightsHeader:
    major: int = 0
    minor: int = 2
    revision: int = 5
    seen: int = 0

    @property
    def wide_seen(self) -> bool:
        return self.major * 10 + self.minor >= 2

    @property
    def size(self) -> int:
        return 20 if self.wide_seen else 16

    @property
    def transpose_connected(self) -> bool:
        return self.major > 1000 or self.minor > 1000

    def pack(self) -> bytes:
        fmt = "<iiiQ" if self.wide_seen else "<iiiI"
        limit = 1 << (64 if self.wide_seen else 32)
        return struct.pack(fmt, self.major, self.minor, self.revision, self.seen % limit)

    def as_dict(self) -> Dict[str, int]:
        return dict(major=self.major, minor=self.minor, revision=self.revision, seen=self.seen)


def read_header(f: BinaryIO, path: str, file_size: int) -> WeightsHeader:
    head = f.read(12)
    if len(head) < 12:
        raise DarknetWeightsError(f"{path}: {file_size} bytes is too short for a .weights header "
                                  "(at least 16 bytes)")
    major, minor, revision = struct.unpack("<iii", head)
    for name, v in (("major", major), ("minor", minor), ("revision", revision)):
        if not 0 <= v < MAX_VERSION:
            raise DarknetWeightsError(f"{path}: not a Darknet .weights file (header {name}="
                                      f"{v}; expected a small non-negative version number)")
    h = WeightsHeader(major, minor, revision)
    raw = f.read(8 if h.wide_seen else 4)
    if len(raw) < (8 if h.wide_seen else 4):
        raise DarknetWeightsError(f"{path}: file ends inside the header ({file_size} bytes, "
                                  f"the header alone needs {h.size})")
    h.seen = struct.unpack("<Q" if h.wide_seen else "<I", raw)[0]
    return h


def iter_layer_tensors(model) -> Iterator[Tuple[LayerSpec, List[Tuple[str, Tensor]]]]:
    """(spec, [(segment name, tensor)]) for every layer, in file order; checked against the
    spec so that the module and the layout agree."""
    for spec, layer in zip(model.graph.layers, model.layers):
        tensors = layer.darknet_tensors() if hasattr(layer, "darknet_tensors") else []
        expected = spec.weight_segments()
        got = [(n, t.numel()) for n, t in tensors]
        if got != expected:  # a programming error, never user input
            raise AssertionError(f"layer {spec.index}: module tensors {got} != spec {expected}")
        yield spec, tensors


def _needs_transpose(spec: LayerSpec, name: str, header: WeightsHeader) -> Optional[Tuple[int, int]]:
    """File shape (rows, cols) of a matrix stored transposed, else None."""
    if name != "weights":
        return None
    if spec.type == "connected" and header.transpose_connected:
        return spec.in_shape.c, spec.output
    if spec.type == "convolutional" and getattr(spec, "flipped", 0):
        c = spec.conv
        return (c.c // c.groups) * c.size * c.size, c.filters
    return None


@dataclass
class LoadReport:
    header: WeightsHeader
    layers_loaded: int = 0        # weight-bearing layers filled completely
    last_layer: int = -1          # index of the last layer filled
    floats_read: int = 0
    floats_expected: int = 0
    trailing_floats: int = 0
    complete: bool = True
    notes: List[str] = field(default_factory=list)
    nonfinite: Dict[int, int] = field(default_factory=dict)  # layer -> NaN/Inf count


def _describe(spec: LayerSpec) -> str:
    return f"layer {spec.index} [{spec.section}] (cfg line {spec.line})"


@torch.no_grad()
def load_weights(model, path, strict: bool = True, upto: Optional[int] = None,
                 strict_finite: bool = False) -> LoadReport:
    """Fill ``model`` from a Darknet .weights file.

    strict=True: the file must hold exactly the floats the cfg needs. strict=False: a file that
    ends early fills the layers it covers (like ``darknet partial``); extra data is ignored.
    ``upto``: read only layers [0, upto) (darknet's load_weights_upto). NaN/Inf floats give a
    ``WeightsWarning`` naming the layers (``strict_finite=True``: a DarknetWeightsError)."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DarknetWeightsError(f"{path}: cannot open weights: {e.strerror}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        header = read_header(f, path, file_size)
        payload = file_size - header.size
        available = payload // 4
        plan = [(s, t) for s, t in iter_layer_tensors(model)
                if t and not s.dontload and (upto is None or s.index < upto)]
        expected = sum(t.numel() for _, ts in plan for _, t in ts)
        if payload % 4 and (strict or available >= expected):
            raise DarknetWeightsError(_ragged_message(path, plan, payload, expected))
        report = LoadReport(header, floats_expected=expected)
        if strict and available < expected:
            raise DarknetWeightsError(_short_message(path, plan, available, expected))
        if strict and available > expected and upto is None:
            raise DarknetWeightsError(
                f"{path}: {available - expected} trailing floats after the last layer (expected "
                f"{expected} floats for this cfg, found {available}): wrong cfg for these weights?")
        left = available
        for spec, tensors in plan:
            need = sum(t.numel() for _, t in tensors)
            if need > left:
                report.complete = False
                report.notes.append(f"{_describe(spec)} and later layers were not loaded: the "
                                    f"file ends ({left} floats left, {need} needed)")
                break
            for name, t in tensors:
                _read_into(f, t, _needs_transpose(spec, name, header))
            left -= need
            report.floats_read += need
            report.layers_loaded += 1
            report.last_layer = spec.index
        report.trailing_floats = left if report.complete else 0
    report.nonfinite = count_nonfinite(plan, report.last_layer)
    if report.nonfinite:
        _report_nonfinite(path, model, report.nonfinite, strict_finite)
    model.header = header.as_dict()
    return report


def count_nonfinite(plan, last_layer: int) -> Dict[int, int]:
    """layer index -> number of NaN/Inf floats, for the layers filled so far."""
    out: Dict[int, int] = {}
    for spec, tensors in plan:
        if spec.index > last_layer:
            break
        bad = sum(int(t.numel() - torch.isfinite(t).sum()) for _, t in tensors)
        if bad:
            out[spec.index] = bad
    return out


def _report_nonfinite(path: str, model, nonfinite: Dict[int, int], strict_finite: bool) -> None:
    specs = model.graph.layers
    shown = ", ".join(f"{_describe(specs[i])}: {n}" for i, n in list(nonfinite.items())[:8])
    more = f" and {len(nonfinite) - 8} more layers" if len(nonfinite) > 8 else ""
    message = (f"{path}: {sum(nonfinite.values())} NaN/Inf floats in {len(nonfinite)} layers "
               f"({shown}{more}); outputs that depend on them will not be finite")
    if strict_finite:
        raise DarknetWeightsError(message)
    warnings.warn(message, WeightsWarning, stacklevel=3)


def _read_into(f: BinaryIO, t: Tensor, transposed: Optional[Tuple[int, int]]) -> None:
    n = t.numel()
    if transposed is None and t.device.type == "cpu" and t.dtype == torch.float32 \
            and t.is_contiguous():
        buf = memoryview(t.numpy()).cast("B")  # read straight into the tensor's storage
        if f.readinto(buf) != 4 * n:
            raise DarknetWeightsError("unexpected end of file")  # size was checked before
        return
    arr = np.fromfile(f, dtype="<f4", count=n)
    if transposed is not None:
        arr = arr.reshape(transposed).T
    t.copy_(torch.from_numpy(np.ascontiguousarray(arr)).view(t.shape))


def _short_message(path: str, plan, available: int, expected: int) -> str:
    offset = 0
    for spec, tensors in plan:
        for name, t in tensors:
            if offset + t.numel() > available:
                return (f"{path}: weights end at {_describe(spec)}: segment '{name}' needs "
                        f"{t.numel()} floats, only {available - offset} left (expected {expected} "
                        f"floats for this cfg, found {available}). Use strict=False (--partial) "
                        "to load a partial file")
            offset += t.numel()
    return f"{path}: expected {expected} floats, found {available}"


def _ragged_message(path: str, plan, payload: int, expected: int) -> str:
    """A payload that is not whole floats: say where it ends (usually a cut-off download)."""
    if payload < 4 * expected:
        offset = 0
        for spec, tensors in plan:
            for name, t in tensors:
                end = offset + 4 * t.numel()
                if end > payload:
                    return (f"{path}: the file looks truncated (an interrupted download?): its data "
                            f"ends {payload - offset} bytes into segment '{name}' of "
                            f"{_describe(spec)}, {4 * expected - payload} bytes short of the "
                            f"{4 * expected} this cfg needs after the header")
                offset = end
    return (f"{path}: {payload} bytes after the header is not a whole number of float32 values "
            f"(this cfg needs {4 * expected}): the file is damaged")


def weights_bytes_iter(model, upto: Optional[int] = None,
                       header: Optional[Dict[str, int]] = None) -> Iterator[bytes]:
    h = WeightsHeader(**(header or model.header))
    yield h.pack()
    for spec, tensors in iter_layer_tensors(model):
        if upto is not None and spec.index >= upto:
            break
        for name, t in tensors:
            arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
            shape = _needs_transpose(spec, name, h)
            if shape is not None:
                arr = np.ascontiguousarray(arr.reshape(shape[1], shape[0]).T)
            yield memoryview(arr.astype("<f4", copy=False)).cast("B")


def umask_mode(path) -> None:
    """mkstemp creates 0600 files; give the usual 0666 & ~umask before the rename."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# Temporary files of atomic writes: ".<name>.<random>.darknet-cfg-partial", so a leftover of a
# killed write can never be taken for a .weights file (find -name '*.weights' skips it).
PARTIAL_SUFFIX = ".darknet-cfg-partial"


def partial_name_prefix(path) -> str:
    return f".{os.path.basename(os.fspath(path))}."


def remove_stale_partials(directory, older_than_s: float = 600.0) -> List[str]:
    """Delete leftovers of interrupted atomic writes in ``directory`` (older than
    ``older_than_s``, so a write in progress elsewhere is never touched); returns their names."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        if e.name.startswith(".") and e.name.endswith(PARTIAL_SUFFIX) and e.is_file():
            try:
                if now - e.stat().st_mtime >= older_than_s:
                    os.unlink(e.path)
                    removed.append(e.name)
            except OSError:
                pass
    return removed


def atomic_write(path, chunks) -> None:
    """Write to a temporary file beside ``path``, then rename: no half-written files."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=partial_name_prefix(path), suffix=PARTIAL_SUFFIX,
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_weights(model, path, upto: Optional[int] = None,
                 header: Optional[Dict[str, int]] = None) -> None:
    """Write ``model`` as Darknet .weights (layers [0, upto) if given), atomically.

    The header is the one the weights were loaded with (so load -> save is byte-identical),
    or darknet's 0.2.5 with seen=0 for a new model."""
    atomic_write(path, weights_bytes_iter(model, upto, header))
