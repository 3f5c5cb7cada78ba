"""Click command ``darknet-cfg verify``: our results against the user's Darknet, image by image."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from .errors import DarknetError


def _names(path, classes: int, kind: str):
    """Class names; Darknet needs exactly ``classes`` of them (get_labels_custom counts lines)."""
    from .cli_infer import _read_names
    if path is None:
        return _read_names(None, classes) if kind == "detector" else [str(i) for i in range(classes)]
    names = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines()]
    while names and not names[-1]:
        names.pop()
    if len(names) != classes:
        raise DarknetError(f"{path}: {len(names)} names but the model has {classes} classes "
                           "(Darknet needs the same number)")
    return names


def _images(sources):
    from .cli_infer import _expand_sources
    items, missing = _expand_sources(sources)
    if missing:
        raise DarknetError(missing[0])
    videos = [p for kind, p in items if kind != "image"]
    if videos:
        raise DarknetError(f"{videos[0]}: verify compares still images (no videos)")
    if not items:
        raise DarknetError("no images to verify")
    return [p for _, p in items]


def register(group: click.Group) -> None:
    """Add ``verify`` to the darknet-cfg group."""
    from .cliutil import friendly, size_options

    @group.command()
    @click.argument("cfg", type=click.Path(exists=True, dir_okay=False))
    @click.argument("weights", type=click.Path(exists=True, dir_okay=False))
    @click.argument("sources", nargs=-1, required=True)
    @click.option("--darknet", "darknet_path", metavar="PATH",
                  help="the Darknet executable (default: $DARKNET, else `darknet` on PATH)")
    @click.option("--names", type=click.Path(exists=True, dir_okay=False),
                  help="class names, one per line (as many as the model has classes)")
    @click.option("--thresh", type=click.FloatRange(0, 1), default=0.25, show_default=True)
    @click.option("--nms", type=click.FloatRange(0, 1), default=0.45, show_default=True,
                  help="must be 0.45: Darknet's `detector test` has it built in")
    @size_options
    @click.option("--letter-box/--no-letter-box", default=None,
                  help="override [net] letter_box (for Darknet too)")
    @click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
                  help="largest box / probability difference that still agrees")
    @click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False),
                  help="also run this `darknet-cfg export` model in onnxruntime")
    @click.option("--opencv", is_flag=True, help="also run OpenCV DNN 4.x (readNetFromDarknet)")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False),
                  help="write the full report (every detection, every comparison)")
    @click.option("--timeout", type=click.FloatRange(min=1), default=None,
                  help="seconds Darknet may run (default: no limit)")
    @friendly
    def verify(cfg, weights, sources, darknet_path, names, thresh, nms, width, height,
               letter_box, atol, onnx_path, opencv, json_path, timeout):
        """Run Darknet and darknet_cfg on the same images and compare, image by image.

        Darknet (`detector test`, or `classifier predict` for classifier cfgs) runs once over all
        images; our PyTorch model (and with --onnx / --opencv, onnxruntime and OpenCV DNN) run on
        the same images. Prints a table and a verdict; exit status 0 when PyTorch (and ONNX)
        agree with Darknet on every image within --atol, 1 otherwise."""
        import warnings

        from . import load
        from .converters.weights import atomic_write
        from .crosscheck import OnnxEngine, OpenCVEngine, TorchEngine, opencv_differences
        from .darknet_exe import DARKNET_NMS, find_darknet, run_darknet
        from .options import CfgWarning
        from .reader import read_cfg, with_net_overrides, write_cfg
        from .verify import Report, compare_all

        exe = find_darknet(darknet_path)
        if abs(nms - DARKNET_NMS) > 1e-9:
            raise DarknetError(f"--nms {nms:g}: Darknet's `detector test` always uses "
                               f"{DARKNET_NMS} (it has no option for it)")
        images = _images(sources)
        if json_path:
            from .cli_infer import _check_writable_dir
            _check_writable_dir(Path(json_path).resolve().parent, "--json folder")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CfgWarning)  # `detect` would show them; not our topic
            model = load(cfg, weights, width=width, height=height).fuse()
        kind = "detector" if model.heads else "classifier"
        if kind == "detector":
            classes = model.heads[-1].classes
            lb = bool(model.graph.net.letter_box) if letter_box is None else letter_box
        else:
            spec = model.graph.layers[model.output_indices[-1]]
            classes, lb = int(spec.outputs), False
        label_names = _names(names, classes, kind)
        overrides = {"width": model.width, "height": model.height}
        if letter_box is not None:
            overrides["letter_box"] = int(letter_box)
        cfg_text = write_cfg(with_net_overrides(read_cfg(cfg), **overrides))

        click.echo(f"running {exe} ({kind}, {len(images)} images)...", err=True)
        dk = run_darknet(exe, cfg_text, weights, images, kind, label_names, thresh=thresh,
                         timeout=timeout)
        darknet_info = {"executable": exe, "command": dk.command,
                        "opencv": dk.flavour.opencv, "gpu": dk.flavour.gpu,
                        "decoder": dk.flavour.decoder, "build": dk.flavour.describe()}
        report = Report(kind, images, thresh, atol, darknet_info, unreadable=dict(dk.unreadable),
                        jpeg_noise_possible=not dk.flavour.opencv)
        report.results["darknet"] = dk.results
        report.notes.append(f"Darknet: {dk.flavour.describe()}")
        if dk.flavour.gpu:
            report.notes.append("Darknet ran on a GPU: cuDNN rounds differently from a CPU build; "
                                "use a CPU build for exact checks")
        kw = dict(thresh=thresh, nms=nms, letter_box=lb)
        engines = [TorchEngine(model, kind, label_names, **kw)]
        if onnx_path:
            engines.append(OnnxEngine(onnx_path, model, kind, label_names, **kw))
        with tempfile.TemporaryDirectory(prefix="darknet-cfg-verify.") as tmp:
            if opencv:
                cv_cfg = Path(tmp) / "opencv.cfg"  # OpenCV has no size override
                cv_cfg.write_text(cfg_text)
                engines.append(OpenCVEngine(str(cv_cfg), weights, model, kind, label_names, **kw))
                report.engine_notes["opencv"] = opencv_differences(model, lb, thresh) \
                    if kind == "detector" else ["blobFromImage's cv2 resize and crop, not "
                                                "Darknet's resize_min + crop_image"]
            for eng in engines:
                compare_all(report, eng.name, dk.results, eng.run(images))

        click.echo(report.table())
        for line in report.details():
            click.echo(line)
        for i, why in sorted(report.unreadable.items()):
            click.echo(f"error: {images[i]}: {why}", err=True)
        click.echo(report.verdict())
        if json_path:
            atomic_write(Path(json_path), [json.dumps(report.to_json(), indent=1).encode()])
        sys.exit(0 if report.ok else 1)
