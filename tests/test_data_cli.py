"""``python -m monai_ckpt.data``: datasets it cannot make are refused before anything is written; a used folder is
replaced only with --overwrite, which removes the old dataset's stale files and never a user's; ``check`` takes the
dataset folder and the label values dataset.json declares; bad data and missing sources are one-line errors."""

import json

import nibabel as nib
import numpy as np
import pytest

from monai_ckpt.data import DataCheckError, check_datalist, make_synthetic_dataset
from monai_ckpt.data.cli import main

SMALL = ["--shape", "12", "12", "12", "--num-training", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--shape", "0", "0", "0"], "argument --shape: must be a positive integer, got '0'"),
    (["--num-classes", "1"], "argument --num-classes: counts the background: a segmentation needs at least 2"),
    (["--shape", "2", "2", "2"], "shape (2, 2, 2) is too small for 4 classes: case 0 would have no voxel of class(es)"),
])
def test_synthetic_refuses_what_it_cannot_make(argv, message, capsys, tmp_path):
    try:
        code = main(["synthetic", "--output", str(tmp_path / "data"), *argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing written
    with pytest.raises(ValueError, match="num_classes counts the background"):
        make_synthetic_dataset(tmp_path / "lib", num_classes=1)


def test_a_used_folder_is_replaced_only_with_overwrite_and_a_users_files_never(capsys, tmp_path):
    data = tmp_path / "data"
    assert main(["synthetic", "--output", str(data), *SMALL, "--num-test", "2"]) == 0
    before = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert main(["synthetic", "--output", str(data), *SMALL, "--num-test", "0"]) == 1
    assert "is not empty (a dataset of 7 files): pass --overwrite" in capsys.readouterr().err
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()) == before  # untouched
    assert main(["synthetic", "--output", str(data), *SMALL, "--num-test", "0", "--overwrite"]) == 0
    assert json.loads((data / "dataset.json").read_text())["test"] == [] and not any((data / "imagesTs").iterdir())
    (data / "imagesTr" / "notes.txt").write_text("mine")
    assert main(["synthetic", "--output", str(data), *SMALL, "--overwrite"]) == 1
    assert "holds files that are not part of a dataset this tool writes: imagesTr/notes.txt" in capsys.readouterr().err
    assert (data / "imagesTr" / "notes.txt").read_text() == "mine"


def test_check_takes_the_folder_and_its_declared_labels(capsys, tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_training=2, num_test=0, shape=(12, 12, 12), num_classes=3)
    assert main(["check", str(data)]) == 0
    assert "2 training items OK (label values 0, 1, 2 from dataset.json)" in capsys.readouterr().out
    label = data / "labelsTr" / "case_000.nii.gz"
    img = nib.load(label)
    values = np.asarray(img.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, img.affine), label)
    nib.save(nib.Nifti1Image(np.zeros((0, 0, 0), np.float32), np.eye(4)), data / "imagesTr" / "case_001.nii.gz")
    assert main(["check", str(data)]) == 1
    err = capsys.readouterr().err
    assert "case_000.nii.gz: label values [7] are not among the labels the dataset declares (0 background" in err
    assert "case_001.nii.gz: the image has no voxels (shape (0, 0, 0))" in err
    with pytest.raises(DataCheckError, match=r"the image has no voxels"):
        check_datalist([{"image": str(data / "imagesTr" / "case_001.nii.gz")}])
    assert main(["check", str(tmp_path)]) == 1
    assert "has no dataset.json; give the dataset folder" in capsys.readouterr().err


def test_a_missing_source_is_one_line(capsys, tmp_path):
    assert main(["brain-tissue", "--source", str(tmp_path / "nonexistent"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not the MNI ICBM152 2009a template folder (the " \
        "folder does not exist); it must hold mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz" in err[0]
    assert not (tmp_path / "out").exists()
