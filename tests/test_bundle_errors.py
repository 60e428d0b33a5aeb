"""A user's mistake ends a bundle run with one clear message, last on stderr, naming the file or value and the
fix, a non-zero exit and nothing written (`monai_ckpt.data.install_brief_errors`, `brief_error`); a bug keeps its
traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_runs import BRAIN, TINY_UNET4, cfg, cli, env, overrides, run_in_process
from monai.bundle import run as bundle_run

from monai_ckpt.data import DataCheckError, brief_error, load_checked_datalist, make_synthetic_dataset


@pytest.fixture(autouse=True)
def _restore_excepthook(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # in-process bundle runs install theirs


def _brain_train_overrides(root: Path, data: Path) -> dict:
    return overrides(root, data, max_epochs=1, num_val=1, **TINY_UNET4)


def _report(tmp_path: Path, data: Path, **extra) -> str:
    """What the bundle run's excepthook prints for the exception an in-process brain training run raises."""
    root = tmp_path / "run"
    with pytest.raises(RuntimeError) as e:  # MONAI's config parser wraps what an expression raises
        bundle_run(config_file=cfg(BRAIN, "train"), logging_file=False,
                   **_brain_train_overrides(root, data), **extra)
    assert not root.exists()  # no models/, no eval/, no TensorBoard file
    report = brief_error(e.value)
    assert report is not None and "Traceback" not in report
    return report


def test_bad_dataset_dir_ends_the_run_with_one_clear_message(tmp_path):
    """The command line run: non-zero exit, no traceback, the last line names the file and the fix."""
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(BRAIN / "configs" / "train.json"),
           *cli(_brain_train_overrides(root, tmp_path / "nope"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: DataCheckError: {re.escape(str(tmp_path / 'nope' / 'dataset.json'))}: dataset list "
                        r"not found; --dataset_dir must name a folder in Medical Segmentation Decathlon layout .*",
                        last), proc.stderr[-2000:]
    assert not root.exists()


def test_truncated_image_and_wrong_label_shape_are_one_clear_message(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_training=2, num_test=1, shape=(16, 16, 16), num_classes=4)
    items = json.loads((data / "dataset.json").read_text())["training"]
    image = data / items[0]["image"]
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    label = data / items[1]["label"]
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), nib.load(label).affine), label)
    report = _report(tmp_path, data)
    lines = report.splitlines()
    assert lines[0] == "(traceback hidden: set MONAI_CKPT_TRACEBACK=1 to see it)"
    assert lines[1].startswith("while running the bundle: Failed to evaluate ConfigExpression")
    assert lines[2].startswith("error: DataCheckError: 2 problem(s) in the datalist from ")
    assert re.search(r"case_000\.nii\.gz: cannot read the image data, the file may be truncated .*copy it again",
                     lines[3]), report
    assert re.search(r"case_001\.nii\.gz: label shape \(16, 16, 12\) does not match.*resample it onto the image",
                     lines[4]), report


def test_bad_checkpoint_policy_is_one_clear_message(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_training=2, num_test=1, shape=(16, 16, 16), num_classes=4)
    last = _report(tmp_path, data, checkpoint_policy="alll").splitlines()[-1]
    assert last.startswith("error: ValueError: unknown checkpoint_policy 'alll' (did you mean 'all'?); valid policies "
                           "are 'none', 'all'")


def test_a_bug_keeps_its_traceback():
    try:
        raise RuntimeError("Failed to evaluate ConfigExpression") from KeyError("not a user's mistake")
    except RuntimeError as e:
        assert brief_error(e) is None
    try:
        raise RuntimeError("wrapped") from ValueError("raised outside monai_ckpt")
    except RuntimeError as e:
        assert brief_error(e) is None


def test_missing_weights_at_inference_is_one_clear_message(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_training=1, num_test=1, shape=(16, 16, 16), num_classes=4)
    root = tmp_path / "run"
    values = {k: v for k, v in _brain_train_overrides(root, data).items()
              if k not in ("max_epochs", "num_val", "num_samples", "progress")}
    with pytest.raises(RuntimeError) as e:
        bundle_run(config_file=cfg(BRAIN, "inference"), logging_file=False, **values)
    last = brief_error(e.value).splitlines()[-1]
    assert last == (f"error: DataCheckError: {root / 'models' / 'model.pt'}: trained weights not found; train the "
                    "bundle first (configs/train.json), fetch them from the location in large_files.yml, or run "
                    "without them: --load_pretrain False")
    assert not root.exists()


def test_bundle_with_bad_label_fails_before_writing(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_training=2, num_test=1, shape=(16, 16, 16), num_classes=3)
    items = load_checked_datalist(data, "training", 3)
    image = nib.load(items[1]["label"])
    label = np.asarray(image.dataobj).copy()
    label[1, 1, 1] = 9
    nib.save(nib.Nifti1Image(label, image.affine), items[1]["label"])
    root = tmp_path / "run"
    values = overrides(root, data, max_epochs=1, num_val=1, **TINY_UNET4)
    with pytest.raises(RuntimeError) as e:  # MONAI's config parser wraps what an expression raises
        run_in_process(BRAIN, ["train"], values)
    cause = e.value
    while cause is not None and not isinstance(cause, DataCheckError):
        cause = cause.__cause__
    assert cause is not None and items[1]["label"] in str(cause) and "[9]" in str(cause)
    assert not root.exists()  # no models/, no eval/, no TensorBoard file
