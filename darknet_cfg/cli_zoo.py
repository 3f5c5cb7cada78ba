"""Click commands for the generated family (registered on the darknet-cfg group by cli.py):
``darknet-cfg scale`` and ``darknet-cfg zoo``."""
import click

from .cliutil import friendly as _friendly


def register(group: click.Group) -> None:
    """Add this module's commands to group."""
    group.add_command(scale_cmd)
    group.add_command(zoo)


@click.command("scale", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("preset", default="yolov4-csp")
@click.option("--depth", type=float, default=1.0, show_default=True,
              help="repeat multiplier: each repeat count n becomes ceil(n * depth)")
@click.option("--width", type=float, default=1.0, show_default=True,
              help="width multiplier: each width becomes the nearest multiple of 8 of w * width")
@click.option("--stages", type=click.Choice(["5", "6", "7"]), default=None,
              help="P5/P6/P7: backbone stages (detection levels P3..P<stages>)")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="network width and height (a multiple of the largest stride)")
@click.option("--classes", type=click.IntRange(min=1), default=None,
              help="classes (head filters follow)")
@click.option("--activation", type=click.Choice(["mish", "swish", "leaky"]), default=None)
@click.option("--anchors", default=None,
              help="w,h,w,h,... split evenly over the levels, or levels separated by '/'")
@click.option("--name", default=None, help="name in the generated cfg's header comment")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="output .cfg (default: print to stdout)")
@_friendly
def scale_cmd(preset, depth, width, stages, size, classes, activation, anchors, name, output):
    """Generate a Scaled-YOLOv4 family member from PRESET (default yolov4-csp), scaled by the
    options. Everything is checked before anything is written."""
    from .converters.weights import atomic_write
    from .zoo import generate_text, get_preset, scale
    spec = scale(get_preset(preset), depth=depth, width=width,
                 stages=int(stages) if stages else None, size=size, classes=classes,
                 activation=activation, anchors=anchors, name=name)
    text = generate_text(spec)
    if output is None:
        click.echo(text, nl=False)
        return
    from .graph import build_graph
    from .reader import parse_cfg_text
    graph = build_graph(parse_cfg_text(text, output))
    atomic_write(output, [text.encode()])
    click.echo(f"wrote {output}: {spec.name} at {spec.size}, {len(graph.layers)} layers, "
               f"{_params(graph) / 1e6:.2f} M parameters, {graph.total_bflops:.2f} BFLOPs",
               err=True)


def _params(graph) -> int:
    """Learnable parameters: the .weights floats less batch-norm running statistics."""
    return sum(n for l in graph.layers for name, n in l.weight_segments()
               if name not in ("rolling_mean", "rolling_variance"))


def zoo_rows():
    """(name, size, layers, parameters, BFLOPs) of every preset at its default size."""
    from .graph import build_graph
    from .reader import parse_cfg_text
    from .zoo import PRESETS, generate_text
    import warnings
    rows = []
    for name, spec in PRESETS.items():
        with warnings.catch_warnings():  # cspx-p7-mish's published mask/num quirk warns
            warnings.simplefilter("ignore")
            g = build_graph(parse_cfg_text(generate_text(spec), name))
        rows.append((name, spec.size, len(g.layers), _params(g), g.total_bflops))
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_friendly
def zoo():
    """List the built-in presets: layers, parameters and BFLOPs at their default size.

    Every command taking a cfg accepts a preset name (e.g. `darknet2torch yolov4-csp.cfg`)
    when no file of that name exists."""
    click.echo(f"{'preset':<28s} {'size':>5s} {'layers':>6s} {'params':>9s} {'BFLOPs':>9s}")
    for name, size, layers, params, bflops in zoo_rows():
        click.echo(f"{name:<28s} {size:5d} {layers:6d} {params / 1e6:8.2f}M {bflops:9.2f}")
