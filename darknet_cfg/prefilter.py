"""Device-side candidate prefilter for ``get_network_boxes``.

Darknet's ``get_yolo_detections`` / ``get_gaussian_yolo_detections`` emit a box only for an
anchor slot whose objectness passes ``objectness > thresh`` (strict, float32; ``[yolo]`` reads
entry 4, ``[Gaussian_yolo]`` entry 8); everything else of the layer's output is never read.
``head_candidates`` applies exactly that test where the head outputs live (the GPU), gathers
the raw entries of the passing slots, and brings them to the host with ONE ``nonzero`` and ONE
packed device->host copy, instead of copying every head output in full.

``[region]`` layers are not filtered: ``custom_get_region_detections`` emits every
(cell, anchor) with objectness 1, so their full output travels in the same packed copy.

The result feeds ``get_network_boxes`` unchanged (a ``HeadCandidates`` per layer and image in
place of the (C, H, W) array): the same float32 values in the same (row, col, anchor) order,
so boxes, probabilities, NMS and Darknet's array order are bit for bit those of the full path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .postprocess import HeadParams

__all__ = ["HeadCandidates", "Candidates", "head_candidates", "objectness_entry"]


def objectness_entry(kind: str) -> int:
    """Index of objectness within an anchor slot's entries (yolo 4, Gaussian_yolo 8)."""
    if kind == "yolo":
        return 4
    if kind == "Gaussian_yolo":
        return 8
    raise ValueError(f"no objectness prefilter for [{kind}] layers (every box is emitted)")


@dataclass
class HeadCandidates:
    """The anchor slots of one ``[yolo]``/``[Gaussian_yolo]`` layer and image whose objectness
    passed: ``values`` (k, >= entries) float32 raw outputs (after the layer's activations),
    ``row, col, slot`` (k,) int64 in Darknet's visiting order (row-major cells, slots inner);
    ``channels, height, width`` the layer's full output shape; ``thresh`` (float32) the
    objectness threshold they passed (decoding at a higher one filters them further)."""
    values: np.ndarray
    row: np.ndarray
    col: np.ndarray
    slot: np.ndarray
    channels: int
    height: int
    width: int
    thresh: np.float32

    def __len__(self) -> int:
        return int(self.values.shape[0])


class Candidates(list):
    """Per image ``{layer: HeadCandidates or (C, H, W) float32 array ([region])}``, as
    ``Detector.forward`` returns full outputs. ``nbytes``: bytes copied device -> host."""
    nbytes: int = 0


def head_candidates(outputs: Sequence[torch.Tensor], indices: Sequence[int],
                    heads: Mapping[int, "HeadParams"], thresh: float,
                    packed: Optional[bool] = None) -> Candidates:
    """Prefilter the batched head outputs ``outputs[j]`` (N, C, H, W) of layers ``indices[j]``.

    On the outputs' device: objectness ``> float32(thresh)`` for every yolo / Gaussian_yolo slot,
    one ``nonzero`` over all layers together (order: layer, image, row, col, slot), a gather
    of the passing slots' entries (as float32), and one packed int32 buffer (entries' bits,
    then the flat index's bits, then every [region] output in full) copied to the host.
    Lower-precision outputs are widened to float32 first, as the full path does.
    ``packed=None``: the packed transfer off the CPU; on the CPU (nothing to transfer) one
    nonzero and gather per layer, no packing (``True`` forces the packed path anywhere).
    """
    if len(outputs) != len(indices):
        raise ValueError(f"head_candidates: {len(outputs)} outputs for {len(indices)} layers")
    order = sorted(range(len(indices)), key=lambda j: indices[j])
    dev = outputs[0].device
    N = int(outputs[0].shape[0])
    th = torch.tensor(np.float32(thresh), device=dev)  # float32 compare, as darknet's float
    filt, region = [], []
    for j in order:
        li, o = int(indices[j]), outputs[j]
        head = heads[li]
        _, C, H, W = o.shape
        K = head.entries
        if C != head.n * K:
            raise ValueError(f"detection layer {li}: output has {C} channels, expected "
                             f"{head.n}*{K} = {head.n * K} for a [{head.kind}] layer")
        if head.kind == "region":
            region.append((li, o))
        else:
            filt.append((li, o, head.n, K, objectness_entry(head.kind)))
    masks, offsets, off = [], [], 0
    for li, o, n, K, e in filt:
        obj = o[:, e::K].float()                                    # (N, n, H, W), a view
        masks.append((obj > th).permute(0, 2, 3, 1).reshape(-1))   # (N, H, W, n): darknet's order
        offsets.append(off)
        off += masks[-1].numel()
    result = Candidates({} for _ in range(N))
    if not (dev.type != "cpu" if packed is None else packed):  # CPU: per layer, no packing
        segments = []
        for (li, o, n, K, e), m in zip(filt, masks):
            local = m.nonzero().squeeze(1)
            segments.append((_gather(o, local, n, K).numpy(), local.numpy()))
        regions = [o.float().contiguous().numpy() for _, o in region]
        result.nbytes = sum(v.nbytes + i.nbytes for v, i in segments) + \
            sum(r.nbytes for r in regions)  # what a device would copy
    else:
        segments, regions, nbytes = _packed_transfer(filt, masks, offsets, off, region, dev)
        result.nbytes = nbytes
    for (li, o, n, K, e), (vals, local) in zip(filt, segments):
        _, C, H, W = o.shape
        b, r = local // (H * W * n), local % (H * W * n)
        row, col, slot = r // (W * n), (r // n) % W, r % n
        cut = np.searchsorted(b, np.arange(N + 1))                  # images are contiguous
        for i in range(N):
            t = slice(cut[i], cut[i + 1])
            result[i][li] = HeadCandidates(vals[t, :K], row[t], col[t], slot[t],
                                           int(C), int(H), int(W), np.float32(thresh))
    for (li, _), arr in zip(region, regions):
        for i in range(N):
            result[i][li] = arr[i]
    return result


def _gather(o: torch.Tensor, local: torch.Tensor, n: int, K: int) -> torch.Tensor:
    """(k, K) float32 entries of the slots ``local`` (flat (image, row, col, slot) indices)."""
    _, _, H, W = o.shape
    b, r = local // (H * W * n), local % (H * W * n)
    y, x, a = r // (W * n), (r // n) % W, r % n
    if not (o.is_contiguous() or o.is_contiguous(memory_format=torch.channels_last)):
        o = o.contiguous()
    sn, sc, sy, sx = o.stride()  # dense: gather from the storage by element offset
    base = b * sn + a * (K * sc) + y * sy + x * sx
    flat = o.as_strided((o.numel(),), (1,))
    return flat[base[:, None] + torch.arange(0, K * sc, sc, device=o.device)[None]].float()


def _packed_transfer(filt, masks, offsets, off, region, dev):
    """One nonzero over every layer's mask, the gathered entries of all layers in one padded
    table (a layer's rows filled by ``where``: no per-layer sizes needed on the host, so no
    other sync), its flat indices and the [region] outputs: one int32 buffer, one copy."""
    N = int(filt[0][1].shape[0] if filt else region[0][1].shape[0])
    maxk = max((f[3] for f in filt), default=0)
    pieces, total = [], 0
    if filt:
        idx = torch.cat(masks).nonzero().squeeze(1)                # the one nonzero (one sync)
        total = int(idx.numel())
        table = torch.zeros((total, maxk), dtype=torch.float32, device=dev)
        for (li, o, n, K, e), start in zip(filt, offsets):
            _, _, H, W = o.shape
            size = N * H * W * n
            vals = _gather(o, (idx - start).clamp_(0, size - 1), n, K)
            if len(filt) > 1:
                inside = ((idx >= start) & (idx < start + size))[:, None]
                table[:, :K] = torch.where(inside, vals, table[:, :K])
            else:
                table[:, :K] = vals
        pieces += [table.view(torch.int32).reshape(-1), idx.view(torch.int32)]
    pieces += [o.float().contiguous().view(torch.int32).reshape(-1) for _, o in region]
    packed = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).cpu()  # the one copy
    host = packed.numpy()
    segments, regions = [], []
    if filt:
        vals = host[:total * maxk].view(np.float32).reshape(total, maxk)
        flat = host[total * maxk: total * (maxk + 2)].view(np.int64)
        starts = np.searchsorted(flat, offsets + [off])             # each layer's segment
        for start, lo, hi in zip(offsets, starts[:-1], starts[1:]):
            segments.append((vals[lo:hi], flat[lo:hi] - start))
    pos = total * (maxk + 2)
    for _, o in region:
        size = o.numel()
        regions.append(host[pos:pos + size].view(np.float32).reshape(o.shape))
        pos += size
    return segments, regions, int(packed.numel()) * 4
