"""darknet-cfg synth: a valid Darknet-format dataset."""
import os

import numpy as np
import pytest

from darknet_cfg.data import read_data_file, read_list, scan_dataset
from darknet_cfg.synth import SHAPES, make_synthetic


def test_synthetic_dataset_is_valid_darknet_data(tmp_path):
    paths = make_synthetic(tmp_path / "ds", images=20, classes=4, size=96, valid=5, seed=1)
    d = read_data_file(paths["data"])
    assert d.classes == 4 and d.class_names() == list(SHAPES[:4])
    train, valid = read_list(d.train), read_list(d.valid)
    assert len(train) == 20 and len(valid) == 5
    msgs = []
    scan = scan_dataset(train + valid, 4, report=msgs.append)
    assert msgs == [] and len(scan.images) == 25
    assert scan.boxes >= 20 and scan.with_labels + scan.background == 25
    for lab in scan.labels:
        if len(lab):
            assert ((lab[:, 1:] > 0) & (lab[:, 1:] <= 1)).all()
            # boxes lie inside the image
            assert (lab[:, 1] - lab[:, 3] / 2 >= -1e-3).all() and (lab[:, 1] + lab[:, 3] / 2 <= 1 + 1e-3).all()
    import cv2
    assert cv2.imread(train[0]).shape == (96, 96, 3)
    # deterministic for a seed
    again = make_synthetic(tmp_path / "ds2", images=20, classes=4, size=96, valid=5, seed=1)
    a = open(os.path.splitext(train[3])[0] + ".txt").read() if os.path.exists(os.path.splitext(train[3])[0] + ".txt") else ""
    b_img = read_list(again["train"])[3]
    b = open(os.path.splitext(b_img)[0] + ".txt").read() if os.path.exists(os.path.splitext(b_img)[0] + ".txt") else ""
    assert a == b


def test_synth_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        make_synthetic(tmp_path, images=2, classes=len(SHAPES) + 1)
