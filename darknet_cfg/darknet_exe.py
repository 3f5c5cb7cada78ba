"""Running the user's Darknet executable: the command lines, the files it needs, its output.

Everything ``darknet-cfg verify`` assumes about Darknet (AlexeyAB's CLI) lives here, so a real
build only has to agree with this module:

* ``darknet detector test DATA CFG WEIGHTS -dont_show -ext_output -out result.json -thresh T``
  with no image argument reads image paths from stdin, one per line (``fgets`` of 256 bytes,
  after printing ``Enter Image Path:``), until end of input, so the model is loaded once.
  NMS is fixed at 0.45 there (``test_detector`` has no option for it); ``-letter_box`` or
  ``[net] letter_box=1`` letterboxes. ``-out`` writes ``detection_to_json`` frames: per image
  ``frame_id``, ``filename`` and one object per (box, class) with prob > 0.005 after NMS,
  coordinates relative to the image, printed with ``%f``.
* ``darknet classifier predict DATA CFG WEIGHTS`` reads paths from stdin the same way and
  prints ``<path>: Predicted in ... milli-seconds.`` then ``top`` lines ``<name>: <prob>``
  (``top`` from the .data file, at most ``classes``).
* An image it cannot decode is reported on stderr (``Cannot load image ...``), appended to
  ``bad.list`` in the working folder, and replaced by a blank 10x10 image (no crash).
* Startup lines tell the build: `` GPU isn't used`` (CPU build), `` OpenCV version: 4.x`` /
  ``OpenCV v4.x`` (decodes images with OpenCV) or `` OpenCV isn't used`` (stb_image).

Images are passed as short symlinks (``img00000.png`` in a temporary folder) so that long
paths, spaces or quotes cannot break Darknet's 256-byte line reader or its unescaped JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import DarknetError

__all__ = ["DarknetFlavour", "DarknetResult", "find_darknet", "run_darknet", "parse_flavour",
           "parse_json_frames", "frame_objects", "parse_classifier_stdout", "DARKNET_NMS"]

DARKNET_NMS = 0.45  # test_detector: `float nms = .45;` (no command-line option)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class DarknetFlavour:
    """What the build revealed on startup (None: it did not say)."""
    opencv: Optional[str] = None        # OpenCV version string, "" if built without OpenCV
    gpu: Optional[bool] = None

    @property
    def decoder(self) -> str:
        if self.opencv:
            return f"OpenCV {self.opencv}"
        return "stb_image" if self.opencv == "" else "unknown"

    def describe(self) -> str:
        dev = {True: "GPU", False: "CPU", None: "CPU/GPU not reported"}[self.gpu]
        return f"{dev} build, images decoded by {self.decoder}"


@dataclass
class DarknetResult:
    """Per image (in input order): detector objects (``class_id, x, y, w, h, prob``) or
    classifier top-k (``class_id, prob``); ``None`` for an image Darknet could not read."""
    command: List[str]
    flavour: DarknetFlavour
    results: List[Optional[List[dict]]]
    unreadable: Dict[int, str] = field(default_factory=dict)  # image index -> Darknet's message
    log_tail: List[str] = field(default_factory=list)


def find_darknet(path: Optional[str]) -> str:
    """The executable: ``path`` (a file, or a folder holding ``darknet``), else ``$DARKNET``,
    else ``darknet`` on PATH; one-line errors when it is missing or not executable."""
    given = path or os.environ.get("DARKNET")
    if not given:
        found = shutil.which("darknet")
        if not found:
            raise DarknetError("no Darknet executable: pass --darknet PATH or set $DARKNET "
                               "(there is no `darknet` on PATH)")
        return found
    p = Path(given).expanduser()
    if p.is_dir():
        for name in ("darknet", "darknet.exe"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise DarknetError(f"Darknet: {given} is a folder without a darknet executable")
    if not p.exists():
        raise DarknetError(f"Darknet: {given}: no such file")
    if not os.access(p, os.X_OK):
        raise DarknetError(f"Darknet: {given} is not executable (chmod +x {given})")
    return str(p.resolve())


def parse_flavour(text: str) -> DarknetFlavour:
    """Build flavour from Darknet's startup lines (stdout and stderr together)."""
    fl = DarknetFlavour()
    m = re.search(r"OpenCV (?:version:?\s*|v)(\d+(?:\.\d+)*)", text)
    if m:
        fl.opencv = m.group(1)
    elif "OpenCV isn't used" in text:
        fl.opencv = ""
    if "GPU isn't used" in text:
        fl.gpu = False
    elif re.search(r"CUDA-version|cuDNN|CUDA status|GPU: ", text):
        fl.gpu = True
    return fl


def _json_array(text: str, what: str) -> list:
    """Darknet's -out file; a run that died mid-way leaves no closing bracket."""
    stripped = text.strip()
    if stripped.startswith("[") and not stripped.endswith("]"):
        stripped = stripped.rstrip().rstrip(",") + "\n]"
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as e:
        raise DarknetError(f"{what}: not Darknet's -out JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise DarknetError(f"{what}: not Darknet's -out JSON (expected a list of frames)")
    return data


def parse_json_frames(text: str, what: str = "result.json") -> List[dict]:
    """Frames of Darknet's ``-out`` file as ``{"filename", "objects": [{class_id, x, y, w, h,
    prob}]}`` (also reads ``darknet-cfg detect --json``, which writes the same format)."""
    return [{"filename": fr.get("filename"), "objects": frame_objects(fr)}
            for fr in _json_array(text, what)]


def frame_objects(frame: dict) -> List[dict]:
    """The objects of one ``detection_to_json`` frame as flat ``{class_id, x, y, w, h, prob}``."""
    objs = []
    for o in frame.get("objects", []):
        rc = o["relative_coordinates"]
        objs.append({"class_id": int(o["class_id"]), "x": float(rc["center_x"]),
                     "y": float(rc["center_y"]), "w": float(rc["width"]),
                     "h": float(rc["height"]), "prob": float(o["confidence"])})
    return objs


_PREDICTED = re.compile(r"^(?:Enter Image Path: )*(.*): Predicted in [-\d.e+]+ (?:milli-)?seconds\.")


def parse_classifier_stdout(text: str, top: int) -> Dict[str, List[dict]]:
    """``classifier predict`` output: path -> top-k ``[{class_id, prob}]``. The names given to
    Darknet are the class indices, so ``<index>: <prob>`` lines map back without ambiguity."""
    out: Dict[str, List[dict]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _PREDICTED.match(line)
        if not m:
            continue
        preds = []
        for row in lines[i + 1:i + 1 + top]:
            k, _, v = row.rpartition(": ")
            try:
                preds.append({"class_id": int(k.strip()), "prob": float(v)})
            except ValueError:
                break
        out[m.group(1)] = preds
    return out


def _safe_name(name: str) -> str:
    # detection_to_json prints names unescaped: keep its JSON parseable
    return re.sub(r'["\\\x00-\x1f]', "_", name) or "_"


def _link(src: str, dst: Path) -> None:
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:  # no symlinks (e.g. Windows without privileges): copy
        shutil.copyfile(src, dst)


def _tail(stdout: str, stderr: str, n: int = 3) -> List[str]:
    lines = [ln.strip() for ln in (stderr.splitlines() or stdout.splitlines()) if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Cannot load image data/labels")]
    return lines[-n:]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_darknet(exe: str, cfg_text: str, weights: str, images: Sequence[str], kind: str,
                names: Sequence[str], thresh: float = 0.25, letter_box: bool = False,
                top: int = 5, timeout: Optional[float] = None) -> DarknetResult:
    """Run Darknet once over ``images`` (``kind``: "detector" or "classifier") in a temporary
    folder; ``cfg_text`` is the cfg as Darknet should read it (size overrides applied)."""
    with tempfile.TemporaryDirectory(prefix="darknet-cfg-verify.") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "model.cfg").write_text(cfg_text)
        classifier = kind == "classifier"
        # classifier: names are the indices (parse_classifier_stdout reads them back)
        label_lines = [str(i) for i in range(len(names))] if classifier else \
            [_safe_name(n) for n in names]
        (tmp / "names.txt").write_text("\n".join(label_lines) + "\n")
        data = [f"classes={len(names)}", f"names={tmp / 'names.txt'}"]
        if classifier:
            data.append(f"top={min(top, len(names))}")
        (tmp / "model.data").write_text("\n".join(data) + "\n")
        exe_dir = Path(exe).parent
        for d in (exe_dir, exe_dir.parent):  # data/labels: the alphabet test_detector loads
            if (d / "data" / "labels").is_dir():
                os.symlink(d / "data", tmp / "data")
                break
        linked = []
        for i, img in enumerate(images):
            dst = tmp / f"img{i:05d}{Path(img).suffix.lower()}"
            _link(img, dst)
            linked.append(str(dst))
        if classifier:
            cmd = [exe, "classifier", "predict", str(tmp / "model.data"), str(tmp / "model.cfg"),
                   os.path.abspath(weights)]
        else:
            cmd = [exe, "detector", "test", str(tmp / "model.data"), str(tmp / "model.cfg"),
                   os.path.abspath(weights), "-dont_show", "-ext_output",
                   "-out", str(tmp / "result.json"), "-thresh", repr(float(thresh))]
            if letter_box:
                cmd.append("-letter_box")
        try:
            proc = subprocess.run(cmd, input="\n".join(linked) + "\n", capture_output=True,
                                  text=True, errors="replace", cwd=tmp, timeout=timeout)
        except OSError as e:
            raise DarknetError(f"Darknet: cannot run {exe}: {e.strerror or e}") from None
        except subprocess.TimeoutExpired:
            raise DarknetError(f"Darknet: {exe} did not finish within {timeout:g} s") from None
        stdout, stderr = _ANSI.sub("", proc.stdout), _ANSI.sub("", proc.stderr)
        both = stdout + "\n" + stderr
        flavour = parse_flavour(both)
        tail = _tail(stdout, stderr)
        m = re.search(r"number of names (\d+) that isn't equal to classes=(\d+)", both)
        if m:
            raise DarknetError(f"Darknet: its model has classes={m.group(2)} but {m.group(1)} "
                               "names were given (--names)")
        bad = set()
        if (tmp / "bad.list").is_file():
            bad = {ln.strip() for ln in (tmp / "bad.list").read_text(errors="replace").splitlines()}
        unreadable = {}
        log = both.splitlines()
        for i, p in enumerate(linked):
            hit = [k for k, ln in enumerate(log) if "Cannot load image" in ln and p in ln]
            if p in bad or hit:
                why = ""
                if hit and hit[0] + 1 < len(log) and log[hit[0] + 1].startswith("STB Reason:"):
                    why = f" ({log[hit[0] + 1][len('STB Reason:'):].strip()})"
                unreadable[i] = "Darknet could not read it" + why
        if classifier:
            got = parse_classifier_stdout(stdout, min(top, len(names)))
            results = [got.get(p) for p in linked]
        else:
            out = tmp / "result.json"
            frames = parse_json_frames(out.read_text(errors="replace"), "Darknet's result.json") \
                if out.is_file() else []
            by_name = {f["filename"]: f["objects"] for f in frames}
            results = [by_name.get(p) for p in linked]
        done = sum(r is not None for r in results)
        if proc.returncode != 0:
            how = _signal_name(proc.returncode) if proc.returncode < 0 else \
                f"exit status {proc.returncode}"
            raise DarknetError(f"Darknet crashed ({how}) after {done} of {len(linked)} images: "
                               + (" | ".join(tail) or "no output"))
        missing = [i for i, r in enumerate(results) if r is None and i not in unreadable]
        if missing:
            raise DarknetError(f"Darknet gave no result for {len(missing)} of {len(linked)} images "
                               f"(first: {images[missing[0]]}): " + (" | ".join(tail) or "no output"))
        for i in unreadable:
            results[i] = None
        return DarknetResult(cmd, flavour, results, unreadable, tail)
