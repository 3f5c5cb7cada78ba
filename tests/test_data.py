"""Darknet-format data: obj.data, list files, label discovery, label validation, augmentation."""
import os

import numpy as np
import pytest

from darknet_cfg.data import (AugmentParams, DataError, DetectionDataset, ScaleBatchSampler, augment,
                              collate, label_path_for, read_data_file, read_list, scan_dataset)


def _img(path, w=40, h=30, value=128):
    import cv2
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = np.full((h, w, 3), value, np.uint8)
    im[5:15, 5:25] = (255, 0, 0)
    cv2.imwrite(str(path), im)
    return str(path)


def test_read_data_file_and_lists(tmp_path):
    (tmp_path / "train.txt").write_text("a.jpg\n\n  b.jpg  \n")
    (tmp_path / "obj.names").write_text("cat\ndog\n")
    (tmp_path / "obj.data").write_text("# comment\nclasses = 2\ntrain  = train.txt\nvalid=train.txt\n"
                                       "names = obj.names\nbackup = backup/\n")
    d = read_data_file(tmp_path / "obj.data")
    assert d.classes == 2
    assert os.path.samefile(d.train, tmp_path / "train.txt")
    assert d.class_names() == ["cat", "dog"]
    assert [os.path.basename(p) for p in read_list(d.train)] == ["a.jpg", "b.jpg"]
    with pytest.raises(DataError, match="not found"):
        read_data_file(tmp_path / "missing.data")


def test_label_discovery_like_darknet(tmp_path):
    voc = _img(tmp_path / "VOC" / "JPEGImages" / "x.jpg")
    (tmp_path / "VOC" / "labels").mkdir()
    (tmp_path / "VOC" / "labels" / "x.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    assert label_path_for(voc) == str(tmp_path / "VOC" / "labels" / "x.txt")
    img = _img(tmp_path / "set" / "images" / "y.png")
    (tmp_path / "set" / "labels").mkdir()
    (tmp_path / "set" / "labels" / "y.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    assert label_path_for(img) == str(tmp_path / "set" / "labels" / "y.txt")
    beside = _img(tmp_path / "obj" / "z.jpeg")
    assert label_path_for(beside) == str(tmp_path / "obj" / "z.txt")   # beside the image (AlexeyAB)


def test_bad_labels_reported_once_and_skipped(tmp_path):
    good = _img(tmp_path / "obj" / "a.jpg")
    (tmp_path / "obj" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"          # ok
        "3 0.5 0.5 0.2 0.2\n"          # class out of range
        "1 1.5 0.5 0.2 0.2\n"          # x outside [0, 1]
        "1 0.5 0.5 0.2\n"              # 4 fields
        "1 0.5 abc 0.2 0.2\n"          # not a number
        "\n"
        "2 0.25 0.75 0.1 0.3\n")       # ok
    bg = _img(tmp_path / "obj" / "b.jpg")                  # no label file: background
    broken = tmp_path / "obj" / "c.jpg"
    broken.write_bytes(b"not an image at all")
    missing = str(tmp_path / "obj" / "d.jpg")
    msgs = []
    scan = scan_dataset([good, bg, str(broken), missing], classes=3, report=msgs.append)
    lab = str(tmp_path / "obj" / "a.txt")
    bad = [m for m in msgs if m.startswith(lab)]
    assert bad == [f"{lab}:2: class id 3 outside [0, 3)",
                   f"{lab}:3: coordinates outside [0, 1]: x=1.5",
                   f"{lab}:4: expected 5 fields (class x_center y_center width height), got 4",
                   f"{lab}:5: not a number: 'abc'"]
    assert scan.images == [good, bg]
    np.testing.assert_allclose(scan.labels[0], [[0, .5, .5, .2, .2], [2, .25, .75, .1, .3]], rtol=1e-6)
    assert scan.background == 1 and scan.with_labels == 1
    assert len(scan.unreadable) == 2 and len(scan.bad_lines) == 4
    s = scan.summary()
    assert "4 images listed, 2 usable" in s and "1 background" in s
    assert "2 unreadable images skipped" in s and "4 bad label lines skipped" in s


def test_augment_identity_and_flip():
    import cv2
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[1, 0.25, 0.5, 0.2, 0.4]], np.float32)
    p = AugmentParams(augment=False)
    x, t = augment(img, boxes, 32, 24, p, rng)
    ref = cv2.resize(img, (32, 24), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1) / np.float32(255)
    np.testing.assert_allclose(x, ref, atol=1e-7)
    np.testing.assert_allclose(t, boxes, atol=1e-6)
    # flip only (no jitter, no colour): the image mirrors and x -> 1 - x
    p = AugmentParams(jitter=0.0, flip=1, augment=True)
    for seed in range(8):
        x, t = augment(img, boxes, 64, 48, p, np.random.default_rng(seed))
        if np.allclose(x, img.transpose(2, 0, 1) / np.float32(255)):
            np.testing.assert_allclose(t, boxes, atol=1e-6)
        else:
            np.testing.assert_allclose(x, img[:, ::-1].transpose(2, 0, 1) / np.float32(255))
            np.testing.assert_allclose(t, [[1, 0.75, 0.5, 0.2, 0.4]], atol=1e-6)


def test_augment_jitter_keeps_boxes_consistent():
    """A uniquely coloured rectangle must stay inside its corrected box after jitter + flip."""
    img = np.zeros((100, 100, 3), np.uint8)
    img[20:50, 30:70] = (255, 255, 255)
    boxes = np.array([[0, 0.5, 0.35, 0.4, 0.3]], np.float32)
    p = AugmentParams(jitter=0.3, flip=1, hue=0, saturation=1, exposure=1)
    for seed in range(20):
        x, t = augment(img, boxes, 64, 64, p, np.random.default_rng(seed))
        assert x.shape == (3, 64, 64) and x.dtype == np.float32
        assert ((t[:, 1:] >= 0) & (t[:, 1:] <= 1)).all()
        if len(t):
            _, cx, cy, w, h = t[0]
            mask = x[0] > 0.9
            ys, xs = np.nonzero(mask)
            if len(xs):
                assert xs.min() >= (cx - w / 2) * 64 - 2 and xs.max() <= (cx + w / 2) * 64 + 2
                assert ys.min() >= (cy - h / 2) * 64 - 2 and ys.max() <= (cy + h / 2) * 64 + 2


def test_dataset_sampler_collate(tmp_path):
    imgs = [_img(tmp_path / "obj" / f"{k}.jpg") for k in range(5)]
    for k, p in enumerate(imgs[:4]):
        (tmp_path / "obj" / f"{k}.txt").write_text(f"{k % 2} 0.4 0.3 0.5 0.3\n")
    scan = scan_dataset(imgs, 2)
    ds = DetectionDataset(scan.images, scan.labels, AugmentParams(jitter=0.1))
    sizes = {k: (32 + 32 * (k // 10 % 2), 32) for k in range(40)}
    smp = ScaleBatchSampler(len(ds), 2, 3, 0, 20, sizes.__getitem__, seed=1)
    batches = list(smp)
    assert len(batches) == len(smp) == 60
    assert {b[0][1] for b in batches[:30]} == {32} and {b[0][1] for b in batches[30:]} == {64}
    x, t = collate([ds[i] for i in batches[0]])
    assert x.shape == (2, 3, 32, 32) and t.shape[1] == 6
    assert set(t[:, 0].tolist()) <= {0.0, 1.0}
    # every image appears once per epoch (5 images, 6 per iteration)
    first = [i for b in batches[:3] for (i, *_ ) in b][:5]
    assert sorted(first) == list(range(5))
