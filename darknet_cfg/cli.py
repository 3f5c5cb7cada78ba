"""Command line: ``darknet2torch``, ``torch2darknet`` and the ``darknet-cfg`` group."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import click

from .cliutil import Command, Group, friendly as _friendly, set_option
from .cliutil import size_options as _size_options


def _find_weights(cfg: Path) -> Optional[Path]:
    """<stem>.weights beside the cfg, or in ./weights/."""
    for candidate in (cfg.with_suffix(".weights"), Path("weights") / (cfg.stem + ".weights")):
        if candidate.is_file():
            return candidate
    return None


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="output .pt (default: <cfg stem>.pt in the current folder)")
@_size_options
@click.option("--partial", is_flag=True, help="accept a weights file that ends early")
@click.option("--strict-finite", is_flag=True,
              help="reject weights holding NaN/Inf values (default: warn and convert)")
@_friendly
def darknet2torch(cfg, weights, output, width, height, partial, strict_finite):
    """Convert a Darknet CFG (+ WEIGHTS) into a PyTorch checkpoint (.pt).

    The .pt holds the cfg text, the network size, the Darknet header and the state_dict, so
    darknet_cfg.load("model.pt") rebuilds the model without the cfg."""
    from . import build_model, load_weights, save_checkpoint
    cfg_path = Path(cfg)
    model = build_model(cfg_path, width, height)
    wpath = Path(weights) if weights else _find_weights(cfg_path)
    if wpath is not None:
        report = load_weights(model, wpath, strict=not partial, strict_finite=strict_finite)
        note = "" if report.complete else f" (partial: {report.notes[0]})"
        click.echo(f"loaded {wpath}: {report.floats_read} floats into {report.layers_loaded} "
                   f"layers{note}")
    else:
        click.echo(f"no weights given and no {cfg_path.stem}.weights beside the cfg or in "
                   "./weights/: the model is randomly initialised", err=True)
    out = Path(output) if output else Path(cfg_path.stem + ".pt")
    save_checkpoint(model, out)
    click.echo(f"wrote {out} ({len(model.layers)} layers, input {model.channels}x{model.height}x"
               f"{model.width}, outputs {model.output_indices})")


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_pt", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="output .weights (default: <model stem>.weights)")
@_friendly
def torch2darknet(model_pt, output):
    """Write a darknet_cfg checkpoint (.pt) back as Darknet .weights."""
    from . import load, save_weights
    model = load(model_pt)
    out = Path(output) if output else Path(model_pt).with_suffix(".weights")
    save_weights(model, out)
    click.echo(f"wrote {out} ({os.path.getsize(out)} bytes)")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="darknet_cfg")
def main():
    """Darknet cfg interpreter and converter for PyTorch."""


@main.command()
@click.argument("cfg", type=click.Path(dir_okay=False))
@_size_options
@click.option("--json", "as_json", is_flag=True, help="print per-layer records as JSON")
@set_option
@_friendly
def summary(cfg, width, height, as_json, sets):
    """Print Darknet's layer table for CFG (index, type, filters, size/stride, shapes, BFLOPs)."""
    from .graph import build_graph
    from .layer_table import summary_dict, summary_text
    from .overrides import apply_sets
    from .reader import read_cfg
    graph = build_graph(apply_sets(read_cfg(cfg), sets), width, height)
    if as_json:
        click.echo(json.dumps(summary_dict(graph), indent=1))
    else:
        click.echo(summary_text(graph))


@main.command()
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.argument("layers", type=click.IntRange(min=0))
@_friendly
def partial(cfg, weights, output, layers):
    """Write the first LAYERS layers of WEIGHTS to OUTPUT (like `darknet partial`, seen = 0)."""
    from .converters.weights import load_weights, save_weights
    from .model import build_model
    model = build_model(cfg)
    report = load_weights(model, weights, strict=False, upto=layers)
    save_weights(model, output, upto=layers,
                 header={"major": 0, "minor": 2, "revision": 5, "seen": 0})
    click.echo(f"wrote {output}: layers 0..{layers - 1} ({report.floats_read} floats)")


@main.command("convert")
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False))
@_size_options
@click.option("--partial", is_flag=True, help="accept a weights file that ends early")
@click.option("--strict-finite", is_flag=True, help="reject weights holding NaN/Inf values")
@click.pass_context
def convert(ctx, cfg, weights, output, width, height, partial, strict_finite):
    """Same as `darknet2torch`."""
    ctx.invoke(darknet2torch, cfg=cfg, weights=weights, output=output, width=width,
               height=height, partial=partial, strict_finite=strict_finite)


def _register_subcommands() -> None:
    """The other commands live in their own modules (cli_infer, cli_train, cli_verify, cli_zoo,
    cli_anchors)."""
    from . import cli_anchors, cli_infer, cli_train, cli_verify, cli_zoo
    cli_infer.register(main)
    cli_train.register(main)
    cli_verify.register(main)
    cli_zoo.register(main)
    cli_anchors.register(main)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
