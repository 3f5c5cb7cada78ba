"""--set overrides and staged augmentation (--finetune-at) in the trainer."""
import os

import pytest
from click.testing import CliRunner

import darknet_cfg
from conftest import mini_cfg
from darknet_cfg.errors import DarknetCfgError, DarknetError
from darknet_cfg.graph import build_graph
from darknet_cfg.options import CfgWarning
from darknet_cfg.overrides import apply_sets
from darknet_cfg.reader import read_cfg
from darknet_cfg.synth import make_synthetic
from darknet_cfg.train import Trainer, TrainOptions

MINI = os.path.join(os.path.dirname(darknet_cfg.__file__), "cfg", "yolov4-tiny-mini.cfg")
if not os.path.isfile(MINI):
    MINI = os.path.join(os.path.dirname(__file__), "..", "cfg", "yolov4-tiny-mini.cfg")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=12, classes=3, size=64, valid=4,
                          seed=3)


def _cfg(tmp_path, **over):
    return mini_cfg(tmp_path, **{"width": 64, "height": 64, "batch": 4, "subdivisions": 2,
                                 "burn_in": 2, "max_batches": 6, **over})


def _opts(dataset, cfg, tmp_path, **kw):
    return TrainOptions(data=dataset["data"], cfg=cfg, backup=str(tmp_path / "backup"), workers=0,
                        progress=False, log=lambda m: None, **kw)


# ------------------------------------------------------------------------------------ --set
def test_set_net_and_head_keys(tmp_path):
    cfg = read_cfg(_cfg(tmp_path))
    g = build_graph(apply_sets(cfg, ["mosaic=1", "jitter = 0.35", "yolo.ignore_thresh=0.6",
                                     "net.hue=0.2"]))
    assert g.net.settings["mosaic"] == 1 and g.net.settings["hue"] == pytest.approx(0.2)
    heads = [l for l in g.layers if l.type == "yolo"]
    assert len(heads) == 2
    assert all(h.train["jitter"] == pytest.approx(0.35) for h in heads)
    assert all(h.train["ignore_thresh"] == pytest.approx(0.6) for h in heads)
    # the original Cfg is untouched
    assert build_graph(cfg).net.settings["mosaic"] == 0


def test_set_unknown_key_warns_like_the_cfg(tmp_path):
    cfg = read_cfg(_cfg(tmp_path))
    with pytest.warns(CfgWarning, match=r"mini\.cfg:\d+: \[net\] mosiac: unused key"):
        build_graph(apply_sets(cfg, ["mosiac=1"]))
    with pytest.warns(CfgWarning, match=r"\[yolo\] jiter: unused key"):
        build_graph(apply_sets(cfg, ["yolo.jiter=0.3"]))


def test_set_bad_values_are_errors(tmp_path):
    cfg = read_cfg(_cfg(tmp_path))
    with pytest.raises(DarknetCfgError, match=r"mini\.cfg:\d+: \[net\] mosaic: bad number 'abc'"):
        build_graph(apply_sets(cfg, ["mosaic=abc"]))
    for bad, msg in (("mosaic", "expected key=value"), ("head.jitter=1", "prefix must be")):
        with pytest.raises(DarknetError, match=msg):
            apply_sets(cfg, [bad])


def test_trainer_applies_set(dataset, tmp_path):
    tr = Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, sets=("mixup=1", "jitter=0.1",
                                                                "max_batches=3")))
    assert tr.aug.mixup == 1 and tr.aug.jitter == pytest.approx(0.1) and tr.max_batches == 3


# ------------------------------------------------------------------------ staged augmentation
def test_finetune_switches_settings_and_writes_both_stages(dataset, tmp_path):
    cfg = _cfg(tmp_path)
    tr = Trainer(_opts(dataset, cfg, tmp_path, calc_map=True, map_every=10 ** 6, finetune_at=0.5,
                       finetune_sets=("mosaic=1", "jitter=0.3", "learning_rate=0.002")))
    assert tr.finetune_iteration == 3 and tr.aug.mosaic == 0
    seen = []
    tr.o.on_iteration = lambda t, info: seen.append((info["iteration"], t.aug.mosaic,
                                                     t.aug.jitter, t.settings["learning_rate"]))
    tr.run()
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5, 6]
    assert [s[1] for s in seen] == [0, 0, 1, 1, 1, 1]          # switched after iteration 3
    assert seen[-1][2] == pytest.approx(0.3) and seen[-1][3] == pytest.approx(0.002)
    assert [h["rate"] for h in tr.o.history][3:] == pytest.approx([0.002] * 3)
    stage1 = os.path.join(tr.backup, "mini_stage1.weights")
    assert darknet_cfg.load(cfg, stage1).header["seen"] == 3 * 4
    assert darknet_cfg.load(cfg, tr.names["final"]).header["seen"] == 6 * 4
    ft = build_graph(os.path.join(tr.backup, "mini_finetune.cfg"))
    assert ft.net.settings["mosaic"] == 1
    assert tr.switched_at == 3 and os.path.isfile(os.path.join(tr.backup, "chart.png"))


def test_finetune_cfg_and_resume_inside_stage_two(dataset, tmp_path):
    cfg = _cfg(tmp_path)
    ft = tmp_path / "ft.cfg"
    ft.write_text(open(cfg).read().replace("[net]\n", "[net]\nmixup=1\n", 1))
    tr = Trainer(_opts(dataset, cfg, tmp_path, finetune_at=5, finetune_cfg=str(ft)))
    assert tr.finetune_iteration == 5 and tr.aug.mixup == 0
    tr = Trainer(_opts(dataset, cfg, tmp_path, max_batches=4))
    tr.run()
    tr = Trainer(_opts(dataset, cfg, tmp_path, weights=tr.names["last"], finetune_at=3,
                       finetune_cfg=str(ft)))
    assert tr.iteration == 4 and tr.switched_at == 4 and tr.aug.mixup == 1


@pytest.mark.parametrize("sets,msg", [(("width=96",), "layer 0 differs"),
                                      (("subdivisions=1",), "subdivisions must stay 2"),
                                      (("adam=1",), "adam must stay 0")])
def test_finetune_rejects_layout_changes(dataset, tmp_path, sets, msg):
    with pytest.raises(DarknetError, match=msg):
        Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, finetune_at=0.5, finetune_sets=sets))
    with pytest.raises(DarknetError, match="need --finetune-at"):
        Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, finetune_sets=("mosaic=1",)))
    with pytest.raises(DarknetError, match="not inside the run"):
        Trainer(_opts(dataset, _cfg(tmp_path), tmp_path, finetune_at=6))


def test_cli_train_set_and_finetune(dataset, tmp_path):
    from darknet_cfg.cli import main
    cfg = _cfg(tmp_path, max_batches=2)
    r = CliRunner().invoke(main, ["train", dataset["data"], cfg, "--workers", "0", "--backup",
                                  str(tmp_path / "b"), "--set", "mosiac=1", "--finetune-at", "0.5",
                                  "--finetune-set", "mosaic=1"])
    assert r.exit_code == 0, r.output
    assert "mosiac: unused key" in r.output
    assert os.path.isfile(tmp_path / "b" / "mini_stage1.weights")
    r = CliRunner().invoke(main, ["train", dataset["data"], cfg, "--set", "mosaic"])
    assert r.exit_code == 1 and "expected key=value" in r.output


def test_set_on_summary_map_and_detect(dataset, tmp_path):
    from darknet_cfg.cli import main
    cfg = _cfg(tmp_path)
    r = CliRunner().invoke(main, ["summary", cfg, "--json", "--set", "width=96"])
    assert r.exit_code == 0, r.output
    import json
    assert json.loads(r.output)["net"]["width"] == 96
    w = str(tmp_path / "m.weights")
    darknet_cfg.save_weights(darknet_cfg.build_model(cfg), w)
    r = CliRunner().invoke(main, ["map", dataset["data"], cfg, w, "--no-coco", "--set",
                                  "nms_kind=diounms"])
    assert r.exit_code == 0, r.output
    img = os.path.join(os.path.dirname(dataset["data"]), "obj")
    img = os.path.join(img, sorted(f for f in os.listdir(img) if f.endswith(".jpg"))[0])
    r = CliRunner().invoke(main, ["detect", cfg, w, img, "--set", "letterbox=1"])
    assert r.exit_code == 0 and "letterbox: unused key" in r.output, r.output
