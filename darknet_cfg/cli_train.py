"""Click commands for training (registered on the darknet-cfg group by cli.py):
``darknet-cfg train``, ``darknet-cfg map``, ``darknet-cfg synth``."""
import click

from .cliutil import friendly as _friendly, set_option


def register(group: click.Group) -> None:
    """Add this module's commands to group."""
    group.add_command(train)
    group.add_command(map_cmd)
    group.add_command(synth)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", type=click.Path(dir_okay=False))
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", required=False, type=click.Path(dir_okay=False))
@click.option("--map", "calc_map", is_flag=True, help="evaluate mAP@0.5 on valid= during training, "
              "keep <cfg>_best.weights and draw chart.png in the backup folder")
@click.option("--map-every", type=click.IntRange(min=1), default=None,
              help="iterations between mAP evaluations (default: darknet's max(100, 4*images/batch))")
@click.option("--clear", is_flag=True, help="start the iteration count at 0 (ignore seen in WEIGHTS)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="data-loading worker processes [default: the cores training leaves free; "
                   "0: load in this process on the training threads, between steps]")
@click.option("--max-batches", type=click.IntRange(min=1), default=None,
              help="override [net] max_batches (the number of iterations)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads")
@click.option("--backup", type=click.Path(file_okay=False), default=None,
              help="checkpoint folder (default: backup= of DATA)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--torch-bn", is_flag=True, help="train-mode batch-norm with PyTorch's biased variance "
              "instead of darknet's unbiased one")
@click.option("--sync-bn", is_flag=True, help="multi-process CUDA training (torchrun): batch-norm "
              "statistics over all processes' images (torch.nn.SyncBatchNorm; NCCL); ignored "
              "with one process")
@click.option("--winograd/--no-winograd", default=None,
              help="CPU: wide 3x3 convolutions and their gradients by Winograd [default: on; "
                   "1.1-1.2x faster; float rounding differs from oneDNN's at ~1e-5 relative]")
@click.option("--amp", is_flag=True,
              help="mixed precision: float16 with loss scaling on CUDA (as Darknet's CUDNN_HALF), "
                   "bfloat16 autocast on CPU; default: float32 (without TF32 on CUDA)")
@set_option
@click.option("--finetune-at", type=click.FloatRange(min=0, min_open=True), default=None,
              help="staged augmentation: switch to the fine-tuning settings at this fraction of "
                   "max_batches (<= 1) or at this iteration (> 1)")
@click.option("--finetune-set", "finetune_sets", multiple=True, metavar="KEY=VALUE",
              help="a setting of the fine-tuning stage (like --set), e.g. mosaic=1; repeatable")
@click.option("--finetune-cfg", type=click.Path(exists=True, dir_okay=False), default=None,
              help="take the fine-tuning stage's settings from this cfg (same layers)")
@_friendly
def train(data, cfg, weights, calc_map, map_every, clear, device, workers, max_batches, threads,
          backup, seed, torch_bn, sync_bn, winograd, amp, sets, finetune_at, finetune_sets, finetune_cfg):
    """Train CFG on the Darknet-format DATA (obj.data), like `darknet detector train`.

    WEIGHTS: start from these .weights (a `_last.weights` resumes at its iteration; a
    `darknet-cfg partial` backbone starts at 0). Checkpoints go to the backup folder:
    <cfg>_last.weights (every 100 iterations), <cfg>_<N>.weights (every 1000), <cfg>_best.weights
    (with --map), <cfg>_final.weights. With --finetune-at: <cfg>_stage1.weights (the end of the
    first stage) and <cfg>_finetune.cfg (the second stage's settings); chart.png marks the
    switch."""
    from .train import Trainer, TrainOptions
    t = Trainer(TrainOptions(data=data, cfg=cfg, weights=weights, clear=clear, device=device,
                             workers=workers, max_batches=max_batches, calc_map=calc_map,
                             map_every=map_every, backup=backup, seed=seed, threads=threads,
                             darknet_bn=not torch_bn, sync_bn=sync_bn, winograd=winograd, amp=amp,
                             sets=tuple(sets), finetune_at=finetune_at,
                             finetune_sets=tuple(finetune_sets), finetune_cfg=finetune_cfg,
                             log=lambda m: click.echo(m, err=True)))
    click.echo(f"training {cfg}: iteration {t.iteration} -> {t.max_batches}, {t.B} images per "
               f"iteration ({t.sub} x {t.mini}), backup {t.backup}", err=True)
    res = t.run()
    click.echo(f"done: iteration {res['iteration']}, avg loss {res.get('avg_loss', float('nan')):.4f}"
               + (f", best mAP {res['best_map']:.4f}" if calc_map else "")
               + f"; wrote {t.names['final']}")


@click.command("map", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", type=click.Path(dir_okay=False))
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("-points", "--points", type=click.Choice(["0", "11", "101"]), default="0", show_default=True,
              help="0: area under the PR curve (VOC2010+), 11 (VOC2007), 101 (COCO)")
@click.option("-iou_thresh", "--iou-thresh", "iou_thresh", type=float, default=0.5, show_default=True)
@click.option("-thresh", "--thresh", type=float, default=0.25, show_default=True,
              help="confidence threshold for precision/recall/F1")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-coco", is_flag=True, help="skip COCO AP@[.5:.95] (pycocotools)")
@click.option("--tta", is_flag=True, help="test-time augmentation (scales 1, 0.83 flipped, 0.67; "
              "boxes merged before NMS)")
@set_option
@_friendly
def map_cmd(data, cfg, weights, points, iou_thresh, thresh, device, no_coco, tta, sets):
    """mAP of WEIGHTS on the valid= list of DATA, like `darknet detector map`."""
    from .data import DataError, read_data_file, read_list, scan_dataset
    from .evaluate import evaluate_model, format_report
    from .overrides import load_with_sets
    d = read_data_file(data)
    model = load_with_sets(cfg, weights, sets, device=device)
    classes = {h.classes for h in model.heads}
    if classes != {d.classes}:
        raise DataError(f"classes mismatch: {data} has classes={d.classes} but the detection layers "
                        f"of {cfg} have classes={','.join(map(str, sorted(classes)))}")
    vlist = d.valid or d.train
    if not vlist:
        raise DataError(f"{data}: no valid= (or train=) list")
    scan = scan_dataset(read_list(vlist), d.classes,
                        report=lambda m: click.echo(f"warning: {m}", err=True))
    click.echo(scan.summary("valid"), err=True)
    if not scan.images:
        raise DataError(f"{vlist}: no usable image")
    res = evaluate_model(model, scan.images, scan.labels, d.classes, iou_thresh=iou_thresh,
                         points=int(points), thresh=thresh, device=device, coco=not no_coco,
                         tta=tta)
    click.echo(format_report(res, d.class_names()))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--images", type=click.IntRange(min=1), default=400, show_default=True,
              help="training images")
@click.option("--valid", type=click.IntRange(min=1), default=None,
              help="validation images (default: images/5)")
@click.option("--classes", type=click.IntRange(min=1, max=8), default=3, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=224, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ext", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True)
@_friendly
def synth(outdir, images, valid, classes, size, seed, ext):
    """Write a synthetic Darknet-format dataset (shapes) to OUTDIR with obj.data/obj.names/lists."""
    from .synth import make_synthetic
    paths = make_synthetic(outdir, images=images, classes=classes, size=size, valid=valid, seed=seed,
                           ext=ext)
    click.echo(f"wrote {paths['data']} ({images} train, {valid or max(1, images // 5)} valid images, "
               f"{classes} classes, {size}x{size})")
