"""``darknet-cfg anchors``: darknet's ``detector calc_anchors`` (anchors.py)."""

import click

from .cliutil import friendly as _friendly


def register(group: click.Group) -> None:
    """Add this module's commands to group."""
    group.add_command(anchors)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--num", "-num_of_clusters", "num", type=click.IntRange(min=1), default=9,
              show_default=True, help="number of anchors (k-means clusters)")
@click.option("--width", "-width", "width", type=click.IntRange(min=1), default=None,
              help="network width [default: the --cfg's]")
@click.option("--height", "-height", "height", type=click.IntRange(min=1), default=None,
              help="network height [default: the --cfg's]")
@click.option("--cfg", "cfg_in", type=click.Path(dir_okay=False), default=None,
              help="write the anchors into this cfg's [yolo] layers (masks kept)")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="where the cfg with the new anchors goes (required with --cfg)")
@click.option("--seed", type=int, default=0, show_default=True,
              help="picks the initial centroids (darknet seeds with the time)")
@click.option("--save/--no-save", default=True, show_default=True,
              help="write anchors.txt and counters_per_class.txt here, as darknet does")
@_friendly
def anchors(data, num, width, height, cfg_in, output, seed, save):
    """Anchors for DATA's training labels by darknet's k-means (1 - IoU distance), like
    `darknet detector calc_anchors DATA -num_of_clusters 9 -width 416 -height 416`."""
    from .anchors import (anchors_report, format_anchors, kmeans_anchors, read_boxes_wh,
                          set_cfg_anchors)
    from .converters.weights import atomic_write
    from .errors import DarknetError
    from .reader import read_cfg, write_cfg
    cfg = None
    if cfg_in:
        if not output:
            raise DarknetError("--cfg needs -o OUT.cfg (the cfg with the new anchors)")
        from .graph import build_graph
        cfg = read_cfg(cfg_in)
        net = build_graph(cfg, warn_unused=False).net
        width, height = width or net.width, height or net.height
    elif output:
        raise DarknetError("-o writes a cfg: give the cfg to start from with --cfg")
    if not width or not height:
        raise DarknetError("set --width and --height (the network size), or --cfg")
    click.echo(f"\n num_of_clusters = {num}, width = {width}, height = {height} ")
    wh, counts, n_images, _ = read_boxes_wh(data, width, height,
                                           report=lambda m: click.echo(f"warning: {m}", err=True))
    click.echo(f" read labels from {n_images} images ")
    click.echo(f" loaded \t image: {n_images} \t box: {len(wh)}\n all loaded. \n")
    click.echo(" calculating k-means++ ...")
    res = kmeans_anchors(wh, num, seed=seed)
    lines = anchors_report(res, counts, width)
    text = format_anchors(res.anchors, width)
    if save:
        atomic_write("counters_per_class.txt", [lines[2].encode()])
        atomic_write("anchors.txt", [text.encode()])
        lines.insert(6, "Saving anchors to the file: anchors.txt ")
    click.echo("\n".join(lines))
    if cfg is not None:
        out = set_cfg_anchors(cfg, text, num)
        build_graph(out, warn_unused=False)        # the new cfg must still build
        atomic_write(output, [write_cfg(out).encode()])
        click.echo(f"wrote {output} (anchors of {cfg_in} replaced, masks kept)")
