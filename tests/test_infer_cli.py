"""`darknet-cfg detect` on a tiny detector: sources, outputs, Darknet's formats, bad input."""
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import darknet_cfg
from darknet_cfg.cli import main
from darknet_cfg.infer import Detector

TINY_CFG = """[net]
width=64
height=64
channels=3
letter_box=1

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=21
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=2
num=3
nms_kind=greedynms
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, weights) of a 2-class detector whose boxes pass the threshold."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "tiny.cfg"
    cfg.write_text(TINY_CFG)
    torch.manual_seed(0)
    model = darknet_cfg.build_model(cfg)
    with torch.no_grad():
        model.layers[1].conv.bias[4::7] += 1.0  # objectness up: some boxes above 0.25
        model.layers[1].conv.bias[5::7] += 2.0  # class 0 up
    weights = d / "tiny.weights"
    darknet_cfg.save_weights(model, weights)
    return cfg, weights


def _image(path, w=80, h=60, seed=0):
    import cv2
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_single_image_prints_darknet_lines_and_writes_outputs(tiny, tmp_path):
    cfg, weights = tiny
    img = _image(tmp_path / "img_000042.png")
    out, js, coco = tmp_path / "out", tmp_path / "r.json", tmp_path / "coco.json"
    r = _run("detect", cfg, weights, img, "--out", out, "--json", js, "--coco-json", coco)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert re.fullmatch(r".*img_000042\.png: Predicted in [\d.]+ milli-seconds\.", lines[0])
    det_lines = [l for l in lines[1:] if "left_x" in l]
    assert det_lines and all(re.fullmatch(r"\d: \d+%\t\(left_x: +-?\d+   top_y: +-?\d+   "
                                          r"width: +\d+   height: +\d+\)", l) for l in det_lines)
    assert (out / "img_000042.png").is_file()
    assert [p.name for p in out.iterdir()] == ["img_000042.png"]  # no temporary files left

    # --json: Darknet's -out format, equal to the Python API's boxes
    frames = json.loads(js.read_text())
    assert [f["frame_id"] for f in frames] == [1] and frames[0]["filename"] == str(img)
    model = darknet_cfg.load(cfg, weights).fuse()
    plain = Detector(model).detect(img)[0]
    det = Detector(model)
    det.darknet_array_order = True   # Darknet's -out order: its array after do_nms_sort
    dets = det.detect(img)[0]
    assert sorted(map(tuple, dets.boxes.tolist())) == sorted(map(tuple, plain.boxes.tolist()))
    want = [(int(i), int(j)) for i, j in zip(*np.nonzero(dets.probs))]
    objs = frames[0]["objects"]
    assert len(objs) == len(want) > 0
    for o, (i, j) in zip(objs, want):
        assert set(o) == {"class_id", "name", "relative_coordinates", "confidence"}
        assert o["class_id"] == j and o["name"] == str(j)
        rc = o["relative_coordinates"]
        np.testing.assert_allclose([rc["center_x"], rc["center_y"], rc["width"], rc["height"]],
                                   dets.boxes[i], atol=1e-6)
        assert o["confidence"] == pytest.approx(float(dets.probs[i, j]), abs=1e-6)
    # --coco-json: image id from the name, bbox [x, y, w, h] in pixels clipped to the image
    recs = json.loads(coco.read_text())
    assert len(recs) == len(want)
    assert {r["image_id"] for r in recs} == {42}
    for rec in recs:
        x, y, w, h = rec["bbox"]
        assert 0 <= x <= 80 and 0 <= y <= 60 and x + w <= 80 + 1e-3 and y + h <= 60 + 1e-3


def test_folder_list_batch_and_bad_inputs(tiny, tmp_path):
    cfg, weights = tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        _image(folder / f"a{k}.jpg", seed=k)
    (folder / "broken.png").write_bytes(b"not an image")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{folder / 'a0.jpg'}\nimgs/a1.jpg\nmissing.jpg\n")
    js = tmp_path / "r.json"
    r = _run("detect", cfg, weights, folder, lst, "--batch", "2", "--json", js, "--thresh", "0.3")
    assert r.exit_code == 0, r.output
    assert "broken.png: cannot decode image" in r.output
    assert "missing.jpg: no such file" in r.output
    assert "skipped 2 inputs" in r.output
    frames = json.loads(js.read_text())
    assert [f["frame_id"] for f in frames] == [1, 2, 3, 4, 5]
    assert all(o["confidence"] > 0.3 for f in frames for o in f["objects"])
    # batch 2 gives the same boxes as one at a time
    r1 = _run("detect", cfg, weights, folder, lst, "--json", tmp_path / "r1.json", "--thresh", "0.3")
    single = json.loads((tmp_path / "r1.json").read_text())
    assert _strip(single) == _strip(frames)  # same objects; values to float noise
    flat = lambda fr: [v for f in fr for o in f["objects"]
                       for v in [o["confidence"], *o["relative_coordinates"].values()]]
    np.testing.assert_allclose(flat(single), flat(frames), atol=1e-5)


def _strip(frames):
    return [(f["frame_id"], f["filename"], [o["class_id"] for o in f["objects"]]) for f in frames]


def test_nothing_processed_is_an_error_and_writes_nothing(tiny, tmp_path):
    cfg, weights = tiny
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    js = tmp_path / "r.json"
    r = _run("detect", cfg, weights, bad, "--json", js, "--out", tmp_path / "out")
    assert r.exit_code == 1
    assert "bad.jpg: cannot decode image" in r.output and "nothing could be processed" in r.output
    assert not js.exists()
    assert not (tmp_path / "out").exists()  # the folder it created is removed again


def test_names_file_too_short(tiny, tmp_path):
    cfg, weights = tiny
    names = tmp_path / "one.names"
    names.write_text("cat\n")
    r = _run("detect", cfg, weights, _image(tmp_path / "x.png"), "--names", names)
    assert r.exit_code == 1
    assert "1 names but the model has 2 classes" in r.output
    names.write_text("cat\ndog\n")
    r = _run("detect", cfg, weights, tmp_path / "x.png", "--names", names)
    assert r.exit_code == 0 and re.search(r"^(cat|dog): \d+%", r.output, re.M)


def test_unwritable_output_fails_before_work(tiny, tmp_path):
    cfg, weights = tiny
    blocker = tmp_path / "file"
    blocker.write_text("x")
    img = _image(tmp_path / "x.png")
    r = _run("detect", cfg, weights, img, "--out", blocker / "sub")
    assert r.exit_code == 1 and "--out" in r.output and "Predicted" not in r.output
    r = _run("detect", cfg, weights, img, "--json", blocker / "r.json")
    assert r.exit_code == 1 and "--json" in r.output and "Predicted" not in r.output


def test_video(tiny, tmp_path):
    import cv2
    cfg, weights = tiny
    video = tmp_path / "clip.avi"
    wr = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (80, 60))
    assert wr.isOpened()
    for k in range(5):
        wr.write(np.random.default_rng(k).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    wr.release()
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"no video here")
    out, js = tmp_path / "out", tmp_path / "r.json"
    r = _run("detect", cfg, weights, video, fake, "--out", out, "--json", js, "--batch", "2")
    assert r.exit_code == 0, r.output
    assert "fake.mp4: cannot decode video" in r.output
    frames = json.loads(js.read_text())
    assert [f["frame_id"] for f in frames] == [1, 2, 3, 4, 5]
    assert {f["filename"] for f in frames} == {str(video)}
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4"]
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    cap.release()


def test_cli_letter_box_and_size_options(tiny, tmp_path):
    cfg, weights = tiny
    img = _image(tmp_path / "x.png", w=120, h=40)
    js = [tmp_path / f"{k}.json" for k in range(3)]
    assert _run("detect", cfg, weights, img, "--json", js[0]).exit_code == 0
    assert _run("detect", cfg, weights, img, "--json", js[1], "--no-letter-box").exit_code == 0
    assert _run("detect", cfg, weights, img, "--json", js[2], "--width", "96", "--height", "96").exit_code == 0
    a, b, c = (json.loads(p.read_text())[0]["objects"] for p in js)
    assert a != b and a != c


def test_cli_winograd_flag(tiny, tmp_path, monkeypatch):
    """--winograd reaches the Detector (and through it the model's prepack)."""
    from darknet_cfg import infer
    seen = []
    real = infer.Detector.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("winograd"))
        real(self, *a, **kw)
    monkeypatch.setattr(infer.Detector, "__init__", spy)
    cfg, weights = tiny
    img = _image(tmp_path / "x.png")
    js = [tmp_path / f"{k}.json" for k in range(2)]
    assert _run("detect", cfg, weights, img, "--json", js[0]).exit_code == 0
    assert _run("detect", cfg, weights, img, "--json", js[1], "--winograd").exit_code == 0
    assert seen == [False, True]
    a, b = (json.loads(p.read_text())[0]["objects"] for p in js)
    assert len(a) == len(b) and [o["class_id"] for o in a] == [o["class_id"] for o in b]


def test_not_a_detector(tmp_path):
    from darknet_cfg import DarknetError
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[net]\nwidth=16\nheight=16\nchannels=3\n\n[convolutional]\nfilters=4\nsize=3\n"
                   "stride=1\npad=1\nactivation=leaky\n\n[avgpool]\n\n[softmax]\n")
    with pytest.raises(DarknetError, match="not a detector"):
        Detector(darknet_cfg.build_model(cfg))
    weights = tmp_path / "c.weights"
    darknet_cfg.save_weights(darknet_cfg.build_model(cfg), weights)
    r = _run("detect", cfg, weights, _image(tmp_path / "x.png"))
    assert r.exit_code == 1 and "not a detector" in r.output
