"""Darknet's layer table (what ``darknet detector test`` prints while parsing), as text or JSON."""
from __future__ import annotations

from typing import Dict, List

from .graph import NetGraph


def layer_records(graph: NetGraph) -> List[Dict]:
    records = []
    for s in graph.layers:
        records.append({
            "index": s.index,
            "type": s.type,
            "section": s.section,
            "line": s.line,
            "from": [i for i in s.inputs],
            "input": s.in_shape.as_list(),
            "output": s.out_shape.as_list(),
            "outputs": s.outputs,
            "flat_output": s.flat,
            "weight_floats": s.weight_floats,
            "segments": [{"name": n, "count": c} for n, c in s.weight_segments()],
            "bflops": round(s.bflops, 9),
            "describe": s.describe(),
        })
    return records


def summary_dict(graph: NetGraph) -> Dict:
    n = graph.net
    return {
        "cfg": graph.path,
        "net": {"width": n.width, "height": n.height, "channels": n.channels,
                "batch": n.batch, "subdivisions": n.subdivisions, "letter_box": n.letter_box},
        "layers": layer_records(graph),
        "total_weight_floats": graph.total_weight_floats,
        "weights_file_bytes": 20 + 4 * graph.total_weight_floats,
        "total_bflops": round(graph.total_bflops, 6),
        "outputs": graph.output_indices,
    }


def _shape(s) -> str:
    return f"{s.w:4d} x{s.h:4d} x{s.c:4d}"


def summary_text(graph: NetGraph) -> str:
    lines = ["   layer   filters  size/strd(dil)      input                output"]
    for s in graph.layers:
        what = s.describe() or s.type
        if s.type in ("route", "shortcut", "scale_channels", "sam"):
            io = f"-> {_shape(s.out_shape)}"
            lines.append(f"{s.index:4d} {what:<36s} {io}")
            continue
        bf = f" {s.bflops:6.3f} BF" if s.bflops > 0 else ""
        lines.append(f"{s.index:4d} {what:<30s} {_shape(s.in_shape)} -> {_shape(s.out_shape)}{bf}")
    lines.append(f"Total BFLOPS {graph.total_bflops:5.3f}")
    lines.append(f"Weights: {graph.total_weight_floats} floats "
                 f"({(20 + 4 * graph.total_weight_floats) / 1e6:.1f} MB as .weights)")
    return "\n".join(lines)
