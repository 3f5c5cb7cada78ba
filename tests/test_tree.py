"""Hierarchical softmax (tree=): darknet's group structure and the layer's normalisation."""
import warnings

import torch

import darknet_cfg
from darknet_cfg.tree import read_tree_groups

from conftest import UPSTREAM_CFG, needs_shared


def test_groups_are_runs_of_the_same_parent(tmp_path):
    p = tmp_path / "t.tree"
    p.write_text("a -1\nb -1\nc 0\nd 0\ne 0\nf 1\n")
    assert read_tree_groups(str(p)) == [2, 3, 1]


def test_tree_softmax_layer(tmp_path):
    (tmp_path / "t.tree").write_text("a -1\nb -1\nc 0\nd 0\ne 0\n")
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[net]\nwidth=1\nheight=1\nchannels=5\n[softmax]\ntree=data/t.tree\n")
    model = darknet_cfg.build_model(cfg).eval()  # found beside the cfg (darknet: ./data/)
    x = torch.randn(1, 5, 1, 1)
    y = model(x)[0].view(-1)
    torch.testing.assert_close(y[:2], torch.softmax(x.view(-1)[:2], 0))
    torch.testing.assert_close(y[2:], torch.softmax(x.view(-1)[2:], 0))


@needs_shared
def test_yolo9000_uses_its_9k_tree():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = darknet_cfg.build_model(UPSTREAM_CFG / "yolo9000.cfg").eval()
    # the upstream 9k.tree is damaged (NUL blocks, 8714 of 9418 entries): we say so
    assert any("class tree has 8714 entries but layer 24 has 9418 classes" in str(x.message)
               for x in w)
    assert sum(model.layers[-1].tree) == 8714
