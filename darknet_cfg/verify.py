"""``darknet-cfg verify``: compare Darknet's detections (or top-k classes) with ours, per image.

Matching rule (detectors): per image and class, every (Darknet, ours) pair of boxes with IoU
>= 0.5 is a candidate (so is a pair whose coordinates all lie within 0.01: boxes too thin for
an IoU after ``%f`` rounding); candidates are taken greedily by IoU, highest first (then by
coordinate distance), each box used once.
Unmatched Darknet boxes are *missing*, unmatched boxes of ours *extra*. For matched pairs the
largest ``|dx|, |dy|, |dw|, |dh|`` (relative to the image, as Darknet's JSON has them) and
``|dprob|`` are reported. A missing or extra detection whose probability lies within
``BORDERLINE`` (2e-5) of the threshold is *borderline*: float rounding may put it on either side,
so it is shown but does not fail the check. Classifiers: the top-k lists are matched by class;
an unmatched class within ``BORDERLINE`` of the other list's lowest probability is borderline.

Verdicts: ``agree``; ``jpeg noise`` (a JPEG, Darknet decoding it with stb_image or an unknown
decoder, and the differences within ``JPEG_BOX_TOL``/``JPEG_PROB_TOL``: another decoder's pixels,
not a conversion error); ``explained`` (OpenCV DNN, whose documented differences are listed);
``DIFFERS``; ``unreadable``. The check passes when every PyTorch/ONNX row agrees or is JPEG
noise and Darknet read every image; OpenCV rows are information only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["Comparison", "compare_detections", "compare_topk", "Report", "BORDERLINE",
           "JPEG_BOX_TOL", "JPEG_PROB_TOL", "IOU_MATCH"]

BORDERLINE = 2e-5      # |prob - thresh| below which a detection may fall on either side
IOU_MATCH = 0.5
NEAR_MATCH = 0.01      # coordinates this close match whatever the IoU (degenerate boxes)
JPEG_BOX_TOL = 0.01    # decoder noise: boxes move by < 1% of the image...
JPEG_PROB_TOL = 0.05   # ...and probabilities by < 0.05 (detections that close to thresh may flip)
JPEG_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif"}
FAILING_ENGINES = ("pytorch", "onnx")
ENGINE_TITLES = {"pytorch": "PyTorch", "onnx": "ONNX", "opencv": "OpenCV"}


@dataclass
class Comparison:
    """One engine against Darknet on one image."""
    engine: str
    darknet: int = 0
    ours: int = 0
    matched: int = 0
    missing: List[dict] = field(default_factory=list)
    extra: List[dict] = field(default_factory=list)
    borderline: List[dict] = field(default_factory=list)
    max_box: Optional[float] = None
    max_prob: Optional[float] = None
    verdict: str = "agree"
    note: str = ""

    @property
    def failing(self) -> bool:
        return self.engine in FAILING_ENGINES and self.verdict in ("DIFFERS", "unreadable")

    def _exceeds(self, box_tol: float, prob_tol: float, thresh: Optional[float]) -> bool:
        if (self.max_box or 0) > box_tol or (self.max_prob or 0) > prob_tol:
            return True
        unmatched = self.missing + self.extra
        if thresh is None:
            return bool(unmatched)
        return any(abs(d["prob"] - thresh) > prob_tol for d in unmatched)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (n, 4) and (m, 4) centre/size boxes (float64)."""
    al, ar = a[:, 0] - a[:, 2] / 2, a[:, 0] + a[:, 2] / 2
    at, ab = a[:, 1] - a[:, 3] / 2, a[:, 1] + a[:, 3] / 2
    bl, br = b[:, 0] - b[:, 2] / 2, b[:, 0] + b[:, 2] / 2
    bt, bb = b[:, 1] - b[:, 3] / 2, b[:, 1] + b[:, 3] / 2
    w = np.clip(np.minimum(ar[:, None], br[None]) - np.maximum(al[:, None], bl[None]), 0, None)
    h = np.clip(np.minimum(ab[:, None], bb[None]) - np.maximum(at[:, None], bt[None]), 0, None)
    inter = w * h
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _finish(c: Comparison, box_diffs, prob_diffs, atol, near) -> Comparison:
    c.max_box = max(box_diffs) if box_diffs else None
    c.max_prob = max(prob_diffs) if prob_diffs else None
    for lst in (c.missing, c.extra):
        keep = []
        for d in lst:
            (c.borderline if near(d) else keep).append(d)
        lst[:] = keep
    bad = c.missing or c.extra or (c.max_box or 0) > atol or (c.max_prob or 0) > atol
    c.verdict = "DIFFERS" if bad else "agree"
    return c


def compare_detections(engine: str, ref: List[dict], got: List[dict], thresh: float,
                       atol: float = 1e-4) -> Comparison:
    """Darknet's objects ``ref`` against ``got`` (both ``{class_id, x, y, w, h, prob}``)."""
    c = Comparison(engine, darknet=len(ref), ours=len(got))
    box_diffs, prob_diffs = [], []
    for cls in sorted({d["class_id"] for d in ref} | {d["class_id"] for d in got}):
        r = [d for d in ref if d["class_id"] == cls]
        g = [d for d in got if d["class_id"] == cls]
        used_r, used_g = set(), set()
        if r and g:
            xywh = lambda ds: np.array([[d["x"], d["y"], d["w"], d["h"]] for d in ds], np.float64)
            ra, ga = xywh(r), xywh(g)
            iou = _iou(ra, ga)
            dist = np.abs(ra[:, None] - ga[None]).max(axis=2)
            ok = (iou >= IOU_MATCH) | (dist <= NEAR_MATCH)
            cand = sorted(((-iou[i, j], dist[i, j], i, j) for i, j in zip(*np.nonzero(ok))))
            for _, _, i, j in cand:
                if i in used_r or j in used_g:
                    continue
                used_r.add(i)
                used_g.add(j)
                box_diffs.append(float(np.abs(ra[i] - ga[j]).max()))
                prob_diffs.append(abs(r[i]["prob"] - g[j]["prob"]))
        c.matched += len(used_r)
        c.missing += [d for i, d in enumerate(r) if i not in used_r]
        c.extra += [d for j, d in enumerate(g) if j not in used_g]
    return _finish(c, box_diffs, prob_diffs, atol,
                   lambda d: abs(d["prob"] - thresh) <= BORDERLINE)


def compare_topk(engine: str, ref: List[dict], got: List[dict], atol: float = 1e-4) -> Comparison:
    """Classifier top-k lists (``{class_id, prob}``) matched by class."""
    c = Comparison(engine, darknet=len(ref), ours=len(got))
    gmap = {d["class_id"]: d for d in got}
    rmap = {d["class_id"]: d for d in ref}
    prob_diffs = [abs(d["prob"] - gmap[k]["prob"]) for k, d in rmap.items() if k in gmap]
    c.matched = len(prob_diffs)
    c.missing = [d for k, d in rmap.items() if k not in gmap]
    c.extra = [d for k, d in gmap.items() if k not in rmap]
    cut = min([d["prob"] for d in ref + got], default=0.0)
    c = _finish(c, [], prob_diffs, atol, lambda d: abs(d["prob"] - cut) <= BORDERLINE)
    if c.verdict == "agree":  # same classes: the order must agree too (up to near ties)
        for a, b in zip(ref, got):
            if a["class_id"] != b["class_id"] and abs(a["prob"] - b["prob"]) > BORDERLINE:
                c.verdict, c.note = "DIFFERS", "top-k order differs"
                break
    return c


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return "0" if v == 0 else f"{v:.1e}"


@dataclass
class Report:
    """All comparisons of one run, with the table, the verdict and the JSON report."""
    kind: str
    images: List[str]
    thresh: float
    atol: float
    darknet: dict
    rows: Dict[int, List[Comparison]] = field(default_factory=dict)
    unreadable: Dict[int, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    engine_notes: Dict[str, List[str]] = field(default_factory=dict)
    jpeg_noise_possible: bool = False
    results: Dict[str, list] = field(default_factory=dict)

    def add(self, idx: int, comp: Comparison) -> None:
        """Record ``comp`` for image ``idx``, turning DIFFERS into jpeg noise / explained."""
        if comp.verdict == "DIFFERS":
            thresh = self.thresh if self.kind == "detector" else None
            jpeg = Path(self.images[idx]).suffix.lower() in JPEG_EXTS
            if jpeg and self.jpeg_noise_possible and not comp._exceeds(JPEG_BOX_TOL, JPEG_PROB_TOL,
                                                                       thresh):
                comp.verdict = "jpeg noise"
            elif comp.engine == "opencv":
                comp.verdict = "explained"
        self.rows.setdefault(idx, []).append(comp)

    @property
    def ok(self) -> bool:
        return not self.unreadable and not any(c.failing for cs in self.rows.values() for c in cs)

    def table(self) -> str:
        head = ["image", "engine", "Darknet", "ours", "matched", "missing", "extra",
                "max box diff", "max prob diff", "verdict"]
        lines = [head]
        for i, img in enumerate(self.images):
            name = Path(img).name
            if i in self.unreadable:
                lines.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "unreadable"])
                continue
            for k, c in enumerate(self.rows.get(i, [])):
                verdict = c.verdict + (f" ({len(c.borderline)} borderline)" if c.borderline else "")
                if c.note:
                    verdict += f": {c.note}"
                lines.append([name if k == 0 else "", ENGINE_TITLES.get(c.engine, c.engine),
                              str(c.darknet) if k == 0 else "", str(c.ours), str(c.matched),
                              str(len(c.missing)), str(len(c.extra)), _fmt(c.max_box),
                              _fmt(c.max_prob), verdict])
        widths = [max(len(r[j]) for r in lines) for j in range(len(head))]
        left = {0, 1, 9}
        out = []
        for r in lines:
            cells = [r[j].ljust(widths[j]) if j in left else r[j].rjust(widths[j])
                     for j in range(len(head))]
            out.append("  ".join(cells).rstrip())
        return "\n".join(out)

    def details(self) -> List[str]:
        """Lines for borderline / missing / extra detections and the engines' notes."""
        out = []
        box = lambda d: (f" at ({d['x']:.4f}, {d['y']:.4f}, {d['w']:.4f}, {d['h']:.4f})"
                         if "x" in d else "")
        for i, cs in sorted(self.rows.items()):
            for c in cs:
                for what, lst in (("borderline", c.borderline), ("missing", c.missing),
                                  ("extra", c.extra)):
                    for d in lst[:5]:
                        out.append(f"  {Path(self.images[i]).name} {ENGINE_TITLES.get(c.engine)}: "
                                   f"{what} class {d['class_id']} prob {d['prob']:.6f}{box(d)}")
                    if len(lst) > 5:
                        out.append(f"  ... and {len(lst) - 5} more {what}")
        for i, why in sorted(self.unreadable.items()):
            out.append(f"  {self.images[i]}: {why}")
        for engine, notes in self.engine_notes.items():
            for n in notes:
                out.append(f"  {ENGINE_TITLES.get(engine, engine)} differs from Darknet by design: {n}")
        out += [f"  note: {n}" for n in self.notes]
        return out

    def verdict(self) -> str:
        n = len(self.images)
        all_c = [c for cs in self.rows.values() for c in cs]
        engines = [e for e in FAILING_ENGINES if any(c.engine == e for c in all_c)]
        titles = " and ".join(ENGINE_TITLES[e] for e in engines)
        border = sum(len(c.borderline) for c in all_c if c.engine in FAILING_ENGINES)
        noise = {i for i, cs in self.rows.items() for c in cs
                 if c.verdict == "jpeg noise" and c.engine in FAILING_ENGINES}
        opencv = [c for c in all_c if c.engine == "opencv"]
        tail = ""
        if opencv:
            tail = ("; OpenCV agrees too" if all(c.verdict == "agree" for c in opencv)
                    else "; OpenCV differs as documented (see notes)")
        if not self.ok:
            bad = {e: sum(c.failing for c in all_c if c.engine == e) for e in engines}
            parts = [f"{ENGINE_TITLES[e]} differs on {k} of {n} images" for e, k in bad.items() if k]
            if self.unreadable:
                parts.append(f"Darknet could not read {len(self.unreadable)} images")
            return "verdict: MISMATCH: " + "; ".join(parts) + tail
        exact = n - len(noise)
        msg = f"verdict: AGREE: {titles} give{'s' if len(engines) == 1 else ''} Darknet's " \
              f"results on {'all ' if not noise else ''}{exact}{f' of {n}' if noise else ''} " \
              f"images within {self.atol:g}"
        if border:
            msg += f" ({border} borderline detections within {BORDERLINE:g} of the threshold)"
        if noise:
            msg += (f"; the other {len(noise)} (JPEG) differ only within JPEG-decoder noise "
                    f"(Darknet decodes with {self.darknet.get('decoder', 'another decoder')}): "
                    "use PNG for exact checks")
        return msg + tail

    def to_json(self) -> dict:
        images = []
        for i, img in enumerate(self.images):
            entry = {"image": img, "darknet": self.results.get("darknet", [None] * len(self.images))[i]}
            if i in self.unreadable:
                entry["unreadable"] = self.unreadable[i]
            entry["engines"] = {}
            for c in self.rows.get(i, []):
                d = asdict(c)
                d["objects"] = self.results.get(c.engine, [None] * len(self.images))[i]
                entry["engines"][c.engine] = d
            images.append(entry)
        return {"kind": self.kind, "thresh": self.thresh, "atol": self.atol,
                "borderline": BORDERLINE, "iou_match": IOU_MATCH, "darknet": self.darknet,
                "images": images, "notes": self.notes, "engine_notes": self.engine_notes,
                "ok": self.ok, "verdict": self.verdict()}


def compare_all(report: Report, engine: str, ref: Sequence[Optional[list]],
                got: Sequence[Optional[list]]) -> None:
    """Add one engine's comparisons for every image to ``report``."""
    report.results[engine] = list(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        if i in report.unreadable:
            continue
        if g is None:
            report.unreadable[i] = "darknet_cfg could not decode it"
            continue
        comp = compare_detections(engine, r, g, report.thresh, report.atol) \
            if report.kind == "detector" else compare_topk(engine, r, g, report.atol)
        report.add(i, comp)
