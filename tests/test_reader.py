"""Darknet's cfg lexing rules, the cfg writer and [net] overrides."""
import warnings

import pytest

from darknet_cfg import DarknetCfgError, build_graph, parse_cfg_text, write_cfg
from darknet_cfg.reader import with_net_overrides

from conftest import UPSTREAM_CFG, needs_shared

TINY = """
# comment
; another comment
[net]
width = 32
height=32
channels=3
width=64            # duplicate key: the first one wins

[convolutional]
filters=8
size=3
stride=1
pad=1
activation=leaky

[ convolutional ]
filters = 4
size=1
activation=lin ear
"""


def test_lexing_rules():
    cfg = parse_cfg_text(TINY, "tiny.cfg")
    assert [s.name for s in cfg.sections] == ["net", "convolutional", "convolutional"]
    assert cfg.net.values()["width"] == "32"          # first duplicate wins
    assert cfg.sections[2].values()["activation"] == "linear"  # all whitespace removed
    assert cfg.sections[1].line == 10
    assert cfg.sections[1].get("filters").line == 11
    g = build_graph(cfg)
    assert g.net.width == 32 and g.layers[1].out_shape.as_list() == [4, 32, 32]


def test_value_after_first_equals_and_atoi_prefix():
    cfg = parse_cfg_text("[net]\nwidth=8\nheight=8\nchannels=3\n[maxpool]\nsize=2\n[route]\n"
                         "layers=0###P3\n[convolutional]\nfilters=2###x\nactivation=a=b\n", "x.cfg")
    assert cfg.sections[3].values()["activation"] == "a=b"
    with pytest.raises(DarknetCfgError, match="unknown activation 'a=b'"):
        build_graph(cfg)
    cfg.sections[3].options[1].value = "linear"
    g = build_graph(cfg)
    assert g.layers[1].inputs == (0,) and g.layers[2].out_shape.c == 2


def test_write_then_parse_roundtrip_and_overrides():
    cfg = parse_cfg_text(TINY, "tiny.cfg")
    again = parse_cfg_text(write_cfg(cfg), "again.cfg")
    assert [(s.name, s.values()) for s in again.sections] == \
        [(s.name, s.values()) for s in cfg.sections]
    g = build_graph(with_net_overrides(cfg, width=16, height=24))
    assert (g.net.width, g.net.height) == (16, 24)
    assert g.layers[-1].out_shape.as_list() == [4, 24, 16]
    assert build_graph(cfg, width=48).net.width == 48


@needs_shared
def test_write_roundtrip_every_upstream_cfg():
    paths = sorted(UPSTREAM_CFG.rglob("*.cfg"))
    assert len(paths) > 90
    for p in paths:
        cfg = parse_cfg_text(p.read_text(errors="replace"), str(p))
        again = parse_cfg_text(write_cfg(cfg))
        assert [(s.name, s.values()) for s in again.sections] == \
            [(s.name, s.values()) for s in cfg.sections], p


def test_unused_key_warns_once_with_line():
    text = "[net]\nwidth=8\nheight=8\nchannels=3\n[maxpool]\nsize=2\nstride=2\nbogus=1\nbogus=2\n"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        build_graph(parse_cfg_text(text, "w.cfg"))
    msgs = [str(x.message) for x in w]
    assert msgs == ["w.cfg:8: [maxpool] bogus: unused key"]
