"""Every cfg error names file:line, the section and the key."""
import warnings

import pytest

from darknet_cfg import CfgWarning, DarknetCfgError, build_graph, parse_cfg_text

from conftest import UPSTREAM_CFG, needs_shared

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"


def err(text, name="bad.cfg"):
    with pytest.raises(DarknetCfgError) as e:
        build_graph(parse_cfg_text(text, name))
    return e.value


def test_bad_number():
    e = err(NET + "[convolutional]\nfilters=abc\nsize=3\n")
    assert str(e) == "bad.cfg:6: [convolutional] filters: bad number 'abc'"
    assert (e.line, e.section, e.key) == (6, "convolutional", "filters")


def test_bad_number_in_list():
    e = err(NET + "[convolutional]\nfilters=8\n[route]\nlayers=-1,x\n")
    assert str(e) == "bad.cfg:8: [route] layers: bad number 'x' in list '-1,x'"


def test_unknown_section():
    e = err(NET + "[convolutional]\nfilters=8\n\n[transformer]\nheads=8\n")
    assert str(e) == "bad.cfg:8: [transformer] unknown section type [transformer]"


def test_missing_net():
    e = err("[convolutional]\nfilters=8\n")
    assert str(e).startswith("bad.cfg:1: the first section must be [net]")
    e = err("# nothing here\n")
    assert "no sections found" in str(e)


def test_option_before_section_and_garbage_line():
    assert str(err("width=3\n[net]\n")).startswith("bad.cfg:1: option 'width' appears before")
    assert str(err(NET + "[maxpool]\nsize 2\n")) == \
        "bad.cfg:6: cannot parse line 'size 2' (expected key=value)"


def test_route_index_out_of_range():
    e = err(NET + "[convolutional]\nfilters=8\n[route]\nlayers=-5\n")
    assert str(e).startswith("bad.cfg:8: [route] layers: layer -5 is out of range")
    e = err(NET + "[convolutional]\nfilters=8\n[route]\nlayers=1\n")
    assert "layer 1 is out of range (resolves to 1; layer 1 can only use layers 0..0)" in str(e)


def test_shortcut_index_out_of_range():
    e = err(NET + "[convolutional]\nfilters=8\n[shortcut]\nfrom=-3\n")
    assert str(e).startswith("bad.cfg:8: [shortcut] from: layer -3 is out of range")


def test_groups_not_dividing_channels():
    e = err(NET + "[convolutional]\nfilters=6\n[route]\nlayers=-1\ngroups=4\ngroup_id=1\n")
    assert str(e) == ("bad.cfg:9: [route] groups: groups=4 does not divide the 6 channels of "
                      "layer 0")
    e = err(NET + "[convolutional]\nfilters=6\ngroups=4\n")
    assert str(e) == "bad.cfg:7: [convolutional] groups: groups=4 does not divide the 3 input channels"


def test_concat_and_add_size_mismatch():
    text = NET + "[convolutional]\nfilters=8\n[maxpool]\nsize=2\nstride=2\n"
    e = err(text + "[route]\nlayers=-1,-2\n")
    assert str(e) == ("bad.cfg:11: [route] layers: cannot concatenate layer 0 (32x32) with layer "
                      "1 (16x16): sizes differ")
    e = err(text + "[shortcut]\nfrom=-2\n")
    assert str(e) == ("bad.cfg:11: [shortcut] from: cannot add layer 0 (32x32) to the previous "
                      "layer (16x16): sizes differ")


def test_yolo_channel_mismatch():
    e = err(NET + "[convolutional]\nfilters=250\n[yolo]\nmask=0,1,2\nclasses=80\nnum=3\n"
                  "anchors=1,2,3,4,5,6\n")
    assert str(e) == ("bad.cfg:9: [yolo] classes: input has 250 channels but 3 anchors x "
                      "(classes=80 + 5) = 255 are needed: set filters=255 in the [convolutional] "
                      "layer before it")


def test_region_channel_mismatch():
    e = err(NET + "[convolutional]\nfilters=10\n[region]\nclasses=20\nnum=5\n")
    assert "[region] classes: input has 10 channels but num=5 x (classes=20 + coords=4 + 1) = 125" \
        in str(e)


def test_bad_choice_and_missing_required():
    e = err(NET + "[convolutional]\nfilters=8\n[shortcut]\nfrom=-1\nweights_type=bogus\n")
    assert str(e).startswith("bad.cfg:9: [shortcut] weights_type: unknown weights_type 'bogus'")
    e = err(NET + "[route]\n")
    assert str(e) == "bad.cfg:5: [route] layers: required key is missing: route needs layers="


def test_cfg_file_not_found(tmp_path):
    with pytest.raises(DarknetCfgError, match="cannot read cfg"):
        build_graph(tmp_path / "nope.cfg")


@needs_shared
def test_cspx_p7_mask_past_anchor_list_warns_and_uses_listed_anchors():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = build_graph(UPSTREAM_CFG / "cspx-p7-mish.cfg")
    msgs = [str(x.message) for x in w if issubclass(x.category, CfgWarning)]
    assert len(msgs) == 4
    assert "cspx-p7-mish.cfg:2583: [yolo] mask: mask entry 16 >= num=16" in msgs[0]
    last = g.layers[374]
    assert last.mask == (16, 17, 18, 19)
    assert all(a > 0 for a in last.anchors)  # the anchors the line lists, not Darknet's zeros
