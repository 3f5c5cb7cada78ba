"""Click commands for inference: ``darknet-cfg detect`` and ``darknet-cfg export``."""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import click
import numpy as np

from .converters.weights import atomic_write, umask_mode
from .errors import DarknetError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
LIST_EXTS = {".txt", ".list"}


# ----------------------------------------------------------------------------- small helpers

def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename (nothing partial on failure)."""
    atomic_write(path, [data])


def _remove(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_empty_dir(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def _check_writable_dir(d: Path, what: str) -> None:
    """Create ``d`` if needed and prove a file can be written there (before any work)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".darknet-cfg-check.", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DarknetError(f"{what} {d}: cannot write there ({e.strerror or e})") from None


def _read_names(path: Optional[str], classes: int) -> List[str]:
    """Class names, one per line (darknet's get_labels); COCO's for 80-class models by default."""
    from .infer import COCO_NAMES
    if path is None:
        return list(COCO_NAMES) if classes == len(COCO_NAMES) else [str(i) for i in range(classes)]
    names = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    while names and not names[-1]:
        names.pop()
    if len(names) < classes:
        raise DarknetError(f"{path}: {len(names)} names but the model has {classes} classes")
    return names


def _expand_sources(sources: Sequence[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(kind, path) items for images and videos, and messages for sources that do not exist.

    A folder gives its images and videos (sorted, not recursive); a .txt/.list file gives the
    paths it lists, one per line (darknet's list format; relative paths are tried from the
    current folder, then from the list's folder)."""
    items, missing = [], []

    def add(p: str) -> None:
        ext = os.path.splitext(p)[1].lower()
        items.append(("video" if ext in VIDEO_EXTS else "image", p))

    for src in sources:
        path = Path(src)
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS:
                    add(str(child))
        elif path.is_file() and path.suffix.lower() in LIST_EXTS:
            for line in path.read_text(errors="replace").splitlines():
                line = line.strip()
                if not line:
                    continue
                p = Path(line)
                if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
                    p = path.parent / p
                if p.exists():
                    add(str(p))
                else:
                    missing.append(f"{line}: no such file (listed in {src})")
        elif path.exists():
            add(src)
        else:
            missing.append(f"{src}: no such file or folder")
    return items, missing


_COLORS = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]], np.float32)


def _class_color(cls: int, classes: int) -> Tuple[int, int, int]:
    """Darknet's get_color for a class (offset = cls*123457 % classes), as a BGR tuple."""
    x = (cls * 123457) % max(classes, 1)
    ratio = x / max(classes, 1) * 5
    i, j = int(np.floor(ratio)), int(np.ceil(ratio))
    rgb = (1 - (ratio - i)) * _COLORS[i] + (ratio - i) * _COLORS[j]  # channels are (b, g, r)
    return tuple(int(255 * v) for v in rgb)


def _draw(bgr: np.ndarray, dets, names: Sequence[str], thresh: float) -> np.ndarray:
    """Boxes and labels like draw_detections_v3 (best class colour, all classes in the label)."""
    import cv2
    from .infer import selected
    h, w = bgr.shape[:2]
    out = bgr.copy()
    width = max(1, int(h * 0.006))
    for i, best in selected(dets, names, thresh):
        x, y, bw, bh = (float(v) for v in dets.boxes[i])
        l, r = int(max(0, (x - bw / 2) * w)), int(min(w - 1, (x + bw / 2) * w))
        t, b = int(max(0, (y - bh / 2) * h)), int(min(h - 1, (y + bh / 2) * h))
        color = _class_color(best, dets.classes)
        label = ", ".join([names[best]] + [names[j] for j in np.flatnonzero(
            dets.probs[i] > np.float32(thresh)) if j != best])
        cv2.rectangle(out, (l, t), (r, b), color, width)
        scale = max(0.4, h * 0.0008)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(0, t - th - base)
        cv2.rectangle(out, (l, top), (l + tw, top + th + base), color, -1)
        cv2.putText(out, label, (l, top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out


def _rgb_float(bgr: np.ndarray) -> np.ndarray:
    from .preprocess import _BYTE_TO_FLOAT
    return np.ascontiguousarray(_BYTE_TO_FLOAT[bgr[:, :, ::-1].transpose(2, 0, 1)])


# ------------------------------------------------------------------------------------ detect

class _Run:
    """State of one ``detect`` run: outputs collected, counts, where files go."""

    def __init__(self, det, names, thresh, out_dir, verbose):
        self.det, self.names, self.thresh, self.out_dir = det, names, thresh, out_dir
        self.verbose = verbose
        self.frames: List[dict] = []
        self.coco: List[dict] = []
        self.images = self.video_frames = self.skipped = 0
        self.used_names = set()

    def out_path(self, src: str, ext: str) -> Path:
        stem = Path(src).stem
        name, k = f"{stem}{ext}", 1
        while name in self.used_names:  # same file name from two folders
            name, k = f"{stem}_{k}{ext}", k + 1
        self.used_names.add(name)
        return self.out_dir / name

    def record(self, dets, src: str, size) -> None:
        from .infer import coco_image_id, coco_records, json_frame
        self.frames.append(json_frame(dets, self.names, len(self.frames) + 1, src))
        self.coco.extend(coco_records(dets, coco_image_id(src), size[0], size[1]))

    def images_batch(self, paths: List[str], bar) -> None:
        import cv2
        from .preprocess import ImageDecodeError, load_image
        loaded = []
        for p in paths:
            try:
                loaded.append((p, load_image(p)))
            except (ImageDecodeError, OSError) as e:
                self.skip(f"{p}: cannot decode image" if isinstance(e, ImageDecodeError)
                          else f"{p}: {e.strerror or e}", bar)
        if not loaded:
            return
        t0 = time.perf_counter()
        for (p, im), (dets, size) in zip(loaded, self.det.detect_loaded([im for _, im in loaded])):
            if self.verbose:
                from .infer import darknet_lines
                ms = (time.perf_counter() - t0) * 1000
                click.echo(f"{p}: Predicted in {ms:f} milli-seconds.")
                for line in darknet_lines(dets, self.names, size[0], size[1], self.thresh):
                    click.echo(line)
            self.record(dets, p, size)
            if self.out_dir is not None:
                bgr = (im.transpose(1, 2, 0)[:, :, ::-1] * 255).round().astype(np.uint8)
                ext = Path(p).suffix.lower() if Path(p).suffix.lower() in (".png", ".jpg", ".bmp") else ".jpg"
                ok, buf = cv2.imencode(ext, _draw(bgr, dets, self.names, self.thresh))
                if not ok:
                    raise DarknetError(f"{p}: could not encode the output image")
                _atomic_write(self.out_path(p, ext), buf.tobytes())
            self.images += 1
        if bar is not None:
            bar.update(len(loaded))

    def video(self, path: str, batch: int, bar) -> None:
        import cv2
        from tqdm import tqdm
        cap = cv2.VideoCapture(path)
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            cap.release()
            self.skip(f"{path}: cannot decode video", bar)
            return
        writer, tmp, target = None, None, None
        if self.out_dir is not None:
            target = self.out_path(path, ".mp4")
            fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".mp4", dir=self.out_dir)
            os.close(fd)
            fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                     (frame.shape[1], frame.shape[0]))
            if not writer.isOpened():
                cap.release()
                _remove(tmp)
                raise DarknetError(f"{target}: cannot open a video writer (mp4v)")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        fbar = tqdm(total=total, desc=Path(path).name, unit="frame", file=sys.stderr, leave=False)
        try:
            pending = [frame]
            while pending:
                while len(pending) < batch:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    pending.append(frame)
                ims = [_rgb_float(f) for f in pending]
                for f, (dets, size) in zip(pending, self.det.detect_loaded(ims)):
                    self.record(dets, path, size)
                    if writer is not None:
                        writer.write(_draw(f, dets, self.names, self.thresh))
                    self.video_frames += 1
                fbar.update(len(pending))
                full = len(pending) == batch
                pending = []
                if full:
                    ok, frame = cap.read()
                    pending = [frame] if ok else []
            if writer is not None:
                writer.release()
                writer = None
                umask_mode(tmp)
                os.replace(tmp, target)
                tmp = None
        finally:
            fbar.close()
            cap.release()
            if writer is not None:
                writer.release()
            if tmp is not None:
                _remove(tmp)
        if bar is not None:
            bar.update(1)

    def skip(self, message: str, bar) -> None:
        self.skipped += 1
        from tqdm import tqdm
        tqdm.write(message, file=sys.stderr)
        if bar is not None:
            bar.update(1)


def register(group: click.Group) -> None:
    """Add ``detect`` and ``export`` to the darknet-cfg group."""
    from .cliutil import _friendly, _size_options, set_option

    @group.command()
    @click.argument("cfg", type=click.Path(dir_okay=False))
    @click.argument("weights", type=click.Path(dir_okay=False))
    @click.argument("sources", nargs=-1, required=True)
    @click.option("--names", type=click.Path(exists=True, dir_okay=False),
                  help="class names, one per line (default: COCO for 80 classes, else numbers)")
    @click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True)
    @click.option("--nms", type=click.FloatRange(0, 1), default=0.45, show_default=True)
    @_size_options
    @click.option("--letter-box/--no-letter-box", default=None,
                  help="override [net] letter_box")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False),
                  help="folder for images/videos with the boxes drawn")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False),
                  help="Darknet's -out result.json format")
    @click.option("--coco-json", type=click.Path(dir_okay=False), help="COCO results file")
    @click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
    @click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
    @click.option("--compile", "compile_", is_flag=True,
                  help="compile activations such as mish (worth it for videos and folders: "
                       "a few seconds once, then yolov4-class models run ~15% faster on CPU)")
    @click.option("--winograd", is_flag=True,
                  help="CPU: 3x3 convolutions by Winograd (yolov4-tiny ~1.5x faster, yolov4-class "
                       "models ~1.25x, after a one-time weight transform of ~0.45 s for yolov4; "
                       "float rounding differs from Darknet's, so a score within ~1e-5 of "
                       "--thresh may land on the other side)")
    @click.option("--half", is_flag=True,
                  help="CUDA: float16 weights and activations (faster; not Darknet's numbers, "
                       "see README); default: exact float32 without TF32")
    @click.option("--cuda-graph", is_flag=True,
                  help="CUDA: replay the forward from a captured CUDA graph (one per batch shape)")
    @set_option
    @click.option("--tta", is_flag=True,
                  help="test-time augmentation: scales 1, 0.83 (flipped) and 0.67 of the network "
                       "size, boxes merged before NMS (about 2.7x slower)")
    @click.option("--bf16", is_flag=True,
                  help="CPU with AVX512-BF16 or AMX: bfloat16 convolutions (float32 heads, decode "
                       "and NMS); CUDA: bfloat16 model; faster, not Darknet's numbers (README)")
    @click.option("--int8", is_flag=True,
                  help="CPU with VNNI or AMX: int8 convolutions (oneDNN), calibrated on --calib "
                       "images, ranges saved to --calib-cache; not Darknet's numbers (README)")
    @click.option("--calib", type=click.Path(exists=True, file_okay=False),
                  help="--int8: folder of calibration images (the first --calib-count, sorted)")
    @click.option("--calib-count", type=click.IntRange(min=1), default=32, show_default=True,
                  help="--int8: number of calibration images")
    @click.option("--calib-cache", type=click.Path(dir_okay=False),
                  help="--int8: the calibration (JSON), reused while cfg, weights and size are "
                       "unchanged [default: beside the weights, WEIGHTS.<w>x<h>.int8.json]")
    @_friendly
    def detect(cfg, weights, sources, names, thresh, nms, width, height, letter_box, out_dir,
               json_path, coco_json, batch, device, compile_, winograd, half, cuda_graph, tta,
               sets, bf16, int8, calib, calib_count, calib_cache):
        """Detect objects in images, folders, list files or videos, as `darknet detector test`.

        Prints Darknet's lines for a single image; draws boxes into --out; writes Darknet's
        JSON (--json) and COCO results (--coco-json). Unreadable inputs are reported and
        skipped; the exit status is 1 when nothing could be processed."""
        import json

        import torch
        from tqdm import tqdm

        from .overrides import load_with_sets
        from .infer import Detector
        out = Path(out_dir) if out_dir else None
        made_out = out is not None and not out.exists()
        if out is not None:
            _check_writable_dir(out, "--out")
        for opt, p in (("--json", json_path), ("--coco-json", coco_json)):
            if p:
                _check_writable_dir(Path(p).resolve().parent, f"{opt} folder")
        if device == "cuda" and not torch.cuda.is_available():
            raise DarknetError("--device cuda: no CUDA device is available")
        items, missing = _expand_sources(sources)
        model = load_with_sets(cfg, weights, sets, width=width, height=height, device=device).fuse()
        if compile_:
            model.compile_activations()
        if (half or cuda_graph) and device != "cuda":
            raise DarknetError("--half and --cuda-graph need --device cuda")
        if sum((bf16, int8, half)) > 1:
            raise DarknetError("--half, --bf16 and --int8: choose one")
        if int8 and calib_cache is None:
            calib_cache = f"{weights}.{model.width}x{model.height}.int8.json"
        cuda_dtype = torch.float16 if half else torch.bfloat16 if bf16 and device == "cuda" else None
        cpu_precision = "bf16" if bf16 and device != "cuda" else "int8" if int8 else "fp32"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            det = Detector(model, thresh=thresh, nms=nms, letter_box=letter_box, winograd=winograd,
                           dtype=cuda_dtype, cuda_graph=cuda_graph, tta=tta,
                           precision=cpu_precision, calib=calib, calib_cache=calib_cache,
                           calib_count=calib_count, darknet_array_order=True)
        for w in caught:  # e.g. no bf16 instructions: running float32
            click.echo(f"warning: {w.message}", err=True)
        label_names = _read_names(names, det.classes)
        single = len(items) == 1 and items[0][0] == "image" and not missing
        run = _Run(det, label_names, thresh, out, verbose=single)
        for m in missing:
            run.skip(m, None)
        bar = None if single else tqdm(total=len(items), unit="file", file=sys.stderr)
        try:
            images = [p for kind, p in items if kind == "image"]
            for start in range(0, len(images), batch):
                run.images_batch(images[start:start + batch], bar)
            for kind, p in items:
                if kind == "video":
                    run.video(p, batch, bar)
        finally:
            if bar is not None:
                bar.close()
        done = f"{run.images} images, {run.video_frames} video frames"
        if run.skipped or not single:
            click.echo(f"processed {done}; skipped {run.skipped} inputs", err=True)
        if run.images + run.video_frames == 0:
            if made_out:
                _remove_empty_dir(out)
            raise DarknetError("nothing could be processed")
        if json_path:
            _atomic_write(Path(json_path), json.dumps(run.frames, indent=1).encode())
        if coco_json:
            _atomic_write(Path(coco_json), json.dumps(run.coco).encode())

    @group.command()
    @click.argument("cfg", type=click.Path(dir_okay=False))
    @click.argument("weights", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
                  help="the .onnx file to write")
    @_size_options
    @click.option("--opset", type=click.IntRange(min=7), default=18, show_default=True)
    @click.option("--dynamic-batch", is_flag=True, help="make the batch dimension dynamic")
    @click.option("--decode", is_flag=True,
                  help="output decoded boxes (x, y, w, h relative to the network input), "
                       "objectness and class scores instead of the raw head outputs")
    @_friendly
    def export(cfg, weights, output, width, height, opset, dynamic_batch, decode):
        """Export CFG + WEIGHTS (batch-norm folded) to ONNX."""
        from . import load
        from .export import export_onnx
        model = load(cfg, weights, width=width, height=height).fuse()
        names = export_onnx(model, output, opset=opset, dynamic_batch=dynamic_batch,
                            decode=decode)
        click.echo(f"wrote {output} (input 1x{model.channels}x{model.height}x{model.width}, "
                   f"outputs {', '.join(names)})")
