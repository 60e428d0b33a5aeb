"""Datalist checks before anything runs (`monai_ckpt.data.check_datalist`, `load_checked_datalist`): a missing,
truncated or non-NIfTI file, a label whose shape, affine or values do not match, an empty or missing datalist -- each
a `DataCheckError` that names the file, all problems listed at once."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_ckpt.data import DataCheckError, check_datalist, load_checked_datalist, make_synthetic_dataset


@pytest.fixture()
def small_data(tmp_path) -> Path:
    return make_synthetic_dataset(tmp_path / "data", num_training=2, num_test=1, shape=(16, 16, 16), num_classes=3)


def _items(data: Path) -> list[dict]:
    return load_checked_datalist(data, "training", 3)


def test_check_datalist_accepts_good_data(small_data):
    items = _items(small_data)
    assert len(items) == 2 and all(Path(i["label"]).is_file() for i in items)
    assert load_checked_datalist(small_data, "test")[0]["image"].endswith("case_002.nii.gz")


def test_check_missing_file(small_data):
    items = _items(small_data)
    os.remove(items[1]["label"])
    with pytest.raises(DataCheckError, match=re.escape(items[1]["label"]) + ".*not found"):
        check_datalist(items, 3)


def test_check_truncated_file(small_data):
    items = _items(small_data)
    path = Path(items[0]["image"])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataCheckError, match=re.escape(str(path)) + ".*truncated"):
        check_datalist(items, 3)


def test_check_not_a_nifti(small_data):
    items = _items(small_data)
    Path(items[0]["image"]).write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(DataCheckError, match=re.escape(items[0]["image"])):
        check_datalist(items, 3)


def _rewrite(path: str, array: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if array is None else array,
                             img.affine if affine is None else affine), path)


def test_check_shape_mismatch(small_data):
    items = _items(small_data)
    _rewrite(items[1]["label"], array=np.zeros((16, 16, 15), np.uint8))
    with pytest.raises(DataCheckError, match=re.escape(items[1]["label"]) + r".*shape \(16, 16, 15\)"):
        check_datalist(items, 3)


def test_check_affine_mismatch(small_data):
    items = _items(small_data)
    affine = nib.load(items[0]["label"]).affine.copy()
    affine[0, 3] += 3.0
    _rewrite(items[0]["label"], affine=affine)
    with pytest.raises(DataCheckError, match=re.escape(items[0]["label"]) + ".*affine"):
        check_datalist(items, 3)


def test_check_label_values(small_data):
    items = _items(small_data)
    label = np.asarray(nib.load(items[0]["label"]).dataobj).copy()
    label[0, 0, 0] = 7
    _rewrite(items[0]["label"], array=label)
    with pytest.raises(DataCheckError, match=re.escape(items[0]["label"]) + r".*\[7\].*0\.\.2"):
        check_datalist(items, 3)
    check_datalist(items, 8)  # fine with 8 classes


def test_check_empty_and_missing_datalist(small_data, tmp_path):
    meta = json.loads((small_data / "dataset.json").read_text())
    meta["training"] = []
    (small_data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataCheckError, match="dataset.json is empty"):
        load_checked_datalist(small_data, "training", 3)
    with pytest.raises(DataCheckError, match="dataset list not found"):
        load_checked_datalist(tmp_path / "nowhere", "training", 3)


def test_check_lists_every_bad_file(small_data):
    items = _items(small_data)
    os.remove(items[0]["image"])
    os.remove(items[1]["label"])
    with pytest.raises(DataCheckError, match="2 problem") as e:
        check_datalist(items, 3)
    assert items[0]["image"] in str(e.value) and items[1]["label"] in str(e.value)
