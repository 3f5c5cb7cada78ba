""".weights reading and writing: byte-exact round trips, header variants, errors, partial files."""
import struct
import warnings

import numpy as np
import pytest
import torch

import darknet_cfg
from darknet_cfg import DarknetWeightsError, build_model, load_weights, save_weights
from darknet_cfg.converters.weights import WeightsHeader

from conftest import ORACLE, needs_shared, oracle_io

SMALL_CFG = """[net]
width=16
height=16
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
pad=1
activation=leaky

[convolutional]
filters=4
size=1
activation=linear

[shortcut]
from=-2
weights_type=per_channel
weights_normalization=relu
activation=linear

[batchnorm]

[local]
filters=2
size=3
stride=2
pad=1
activation=leaky

[connected]
output=5
batch_normalize=1
activation=linear

[connected]
output=3
activation=linear

[softmax]
"""
# floats per layer, in file order
SMALL_SEGMENTS = [4 * 4 + 4 * 27, 4 + 16, 8, 16, 2 * 8 * 8 + 8 * 8 * 2 * 36, 5 + 5 * 128 + 15,
                  3 + 15]


@pytest.fixture()
def small(tmp_path):
    cfg = tmp_path / "small.cfg"
    cfg.write_text(SMALL_CFG)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.dtype.is_floating_point:
                p.uniform_(0.5, 1.5)
    return cfg, model


def test_small_model_segments(small):
    cfg, model = small
    assert [l.weight_floats for l in model.specs if l.weight_floats] == SMALL_SEGMENTS


def test_roundtrip_is_byte_identical_and_outputs_equal(small, tmp_path):
    cfg, model = small
    a, b = tmp_path / "a.weights", tmp_path / "b.weights"
    save_weights(model, a)
    raw = a.read_bytes()
    assert raw[:20] == struct.pack("<iiiQ", 0, 2, 5, 0)
    assert len(raw) == 20 + 4 * sum(SMALL_SEGMENTS)
    other = darknet_cfg.load(cfg, a)
    save_weights(other, b)
    assert b.read_bytes() == raw
    model.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(other(x)[0], model(x)[0], rtol=0, atol=0)


def test_old_header_with_32bit_seen_roundtrips(small, tmp_path):
    cfg, model = small
    model.header = {"major": 0, "minor": 1, "revision": 0, "seen": 123456}
    a, b = tmp_path / "old.weights", tmp_path / "again.weights"
    save_weights(model, a)
    raw = a.read_bytes()
    assert raw[:16] == struct.pack("<iiiI", 0, 1, 0, 123456)
    other = darknet_cfg.load(cfg, a)
    assert other.header == {"major": 0, "minor": 1, "revision": 0, "seen": 123456}
    save_weights(other, b)
    assert b.read_bytes() == raw


def test_transposed_connected_header(small, tmp_path):
    """major or minor > 1000: darknet stores [connected] matrices transposed."""
    cfg, model = small
    normal, transposed = tmp_path / "n.weights", tmp_path / "t.weights"
    save_weights(model, normal)
    model.header = {"major": 0, "minor": 1001, "revision": 0, "seen": 0}
    save_weights(model, transposed)
    n, t = normal.read_bytes()[20:], transposed.read_bytes()[20:]
    off = 4 * (sum(SMALL_SEGMENTS[:5]) + 5)  # start of the first connected matrix
    w = model.layers[5].linear.weight.detach().numpy()
    assert np.frombuffer(n[off:off + 4 * w.size], "<f4").reshape(5, 128).tolist() == w.tolist()
    assert np.frombuffer(t[off:off + 4 * w.size], "<f4").reshape(128, 5).T.tolist() == w.tolist()
    other = darknet_cfg.load(cfg, transposed)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)


def test_truncated_file_names_the_layer(small, tmp_path):
    cfg, model = small
    full = tmp_path / "full.weights"
    save_weights(model, full)
    cut = tmp_path / "cut.weights"
    keep = sum(SMALL_SEGMENTS[:4]) + 100  # ends inside layer 4 ([local])
    cut.write_bytes(full.read_bytes()[:20 + 4 * keep])
    fresh = build_model(cfg)
    with pytest.raises(DarknetWeightsError) as e:
        load_weights(fresh, cut)
    assert str(e.value) == (
        f"{cut}: weights end at layer 4 [local] (cfg line 26): segment 'biases' needs 128 floats, "
        f"only 100 left (expected {sum(SMALL_SEGMENTS)} floats for this cfg, found {keep}). "
        "Use strict=False (--partial) to load a partial file")
    report = load_weights(fresh, cut, strict=False)
    assert (report.layers_loaded, report.last_layer, report.complete) == (4, 3, False)
    assert report.floats_read == sum(SMALL_SEGMENTS[:4])
    assert "layer 4 [local] (cfg line 26) and later layers were not loaded" in report.notes[0]
    torch.testing.assert_close(fresh.layers[3].bn.running_var, model.layers[3].bn.running_var)


def test_oversized_and_damaged_files(small, tmp_path):
    cfg, model = small
    full = tmp_path / "full.weights"
    save_weights(model, full)
    big = tmp_path / "big.weights"
    big.write_bytes(full.read_bytes() + b"\0" * 12)
    with pytest.raises(DarknetWeightsError, match=r"3 trailing floats after the last layer \(expected "
                       rf"{sum(SMALL_SEGMENTS)} floats for this cfg, found {sum(SMALL_SEGMENTS) + 3}\)"):
        load_weights(build_model(cfg), big)
    assert load_weights(build_model(cfg), big, strict=False).trailing_floats == 3
    odd = tmp_path / "odd.weights"
    odd.write_bytes(full.read_bytes() + b"\0")
    with pytest.raises(DarknetWeightsError, match="not a whole number of float32 values"):
        load_weights(build_model(cfg), odd)


@pytest.mark.parametrize("content,message", [
    (b"", "0 bytes is too short for a .weights header"),
    (struct.pack("<ii", 0, 2), "8 bytes is too short"),
    (struct.pack("<iiiI", -1, 2, 5, 0), "not a Darknet .weights file (header major=-1"),
    (struct.pack("<iii", 0, 2, 5) + b"\0\0\0\0", "file ends inside the header (16 bytes, the "
                                                 "header alone needs 20)"),
])
def test_invalid_headers(small, tmp_path, content, message):
    cfg, _ = small
    p = tmp_path / "bad.weights"
    p.write_bytes(content)
    with pytest.raises(DarknetWeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_weights(build_model(cfg), p)


def test_missing_weights_file(small, tmp_path):
    cfg, _ = small
    with pytest.raises(DarknetWeightsError, match="cannot open weights"):
        load_weights(build_model(cfg), tmp_path / "nope.weights")


def test_failed_save_leaves_previous_file(small, tmp_path, monkeypatch):
    cfg, model = small
    out = tmp_path / "m.weights"
    out.write_bytes(b"previous")
    import darknet_cfg.converters.weights as W

    def broken(*a, **k):
        yield b"partial data"
        raise RuntimeError("disk full")
    monkeypatch.setattr(W, "weights_bytes_iter", broken)
    with pytest.raises(RuntimeError):
        save_weights(model, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_checkpoint_roundtrip(small, tmp_path):
    cfg, model = small
    model.header = {"major": 0, "minor": 2, "revision": 5, "seen": 64000}
    w1, pt, w2 = tmp_path / "a.weights", tmp_path / "m.pt", tmp_path / "b.weights"
    save_weights(model, w1)
    darknet_cfg.save_checkpoint(darknet_cfg.load(cfg, w1), pt)
    ckpt = torch.load(pt, weights_only=True)
    assert ckpt["cfg_text"] == SMALL_CFG and (ckpt["width"], ckpt["height"]) == (16, 16)
    rebuilt = darknet_cfg.load(pt)  # no cfg needed
    assert rebuilt.header["seen"] == 64000
    save_weights(rebuilt, w2)
    assert w2.read_bytes() == w1.read_bytes()


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"hello": torch.zeros(1)}, p)
    with pytest.raises(darknet_cfg.DarknetError, match="not a darknet_cfg checkpoint"):
        darknet_cfg.load(p)


def test_shared_conv_is_saved_once(tmp_path):
    cfg = tmp_path / "share.cfg"
    cfg.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=3\nsize=3\n"
                   "pad=1\nbatch_normalize=1\nactivation=leaky\n[convolutional]\nshare_index=0\n"
                   "filters=3\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n")
    model = build_model(cfg).eval()
    assert model.specs[1].weight_floats == 0
    assert list(model.state_dict()) == ["layers.0.conv.weight", "layers.0.bn.weight",
                                        "layers.0.bn.bias", "layers.0.bn.running_mean",
                                        "layers.0.bn.running_var", "layers.0.bn.num_batches_tracked"]
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model.layers[0](model.layers[0](x)))


ROUNDTRIP_MODELS = ["yolov4-tiny", "yolov3-tiny-prn", "yolov2", "efficientnet_b0", "darknet53",
                    "yolov4-csp-s-mish", "enet-coco"]


@needs_shared
@pytest.mark.parametrize("name", ROUNDTRIP_MODELS)
def test_oracle_weights_roundtrip_byte_identical(name, tmp_path):
    oio = oracle_io()
    m = oio.load_model(name)
    src = tmp_path / "src.weights"
    src.write_bytes(oio.weights_bytes(m.layout, m.meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = darknet_cfg.load(m.cfg_path, src, width=m.meta["width"], height=m.meta["height"])
    out = tmp_path / "out.weights"
    save_weights(model, out)
    assert out.read_bytes() == src.read_bytes()
    # .weights -> .pt -> .weights
    pt, back = tmp_path / "m.pt", tmp_path / "back.weights"
    darknet_cfg.save_checkpoint(model, pt)
    save_weights(darknet_cfg.load(pt), back)
    assert back.read_bytes() == src.read_bytes()
