"""Checks of a dataset before anything is trained or written: `check_datalist` and `load_checked_datalist`
(missing, truncated or empty files, image/label shape or affine mismatch, label values outside the classes, empty
list; one `DataCheckError` names every bad file)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["DataCheckError", "check_datalist", "check_weights_file", "declared_labels", "load_checked_datalist"]


class DataCheckError(ValueError):
    """A dataset problem found by `check_datalist`; the message names every bad file."""


def _load_header(path: str) -> nib.spatialimages.SpatialImage:
    try:
        return nib.load(path)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DataCheckError(f"{path}: cannot read the image header ({type(e).__name__}: {e}); replace the file with a "
                             "readable NIfTI or remove it from the dataset list") from e


def _read_array(img: nib.spatialimages.SpatialImage, path: str) -> np.ndarray:
    try:
        return np.asarray(img.dataobj)
    except Exception as e:  # a truncated .nii.gz raises EOFError/OSError/zlib.error
        raise DataCheckError(f"{path}: cannot read the image data, the file may be truncated "
                             f"({type(e).__name__}: {e}); copy it again or remove it from the dataset list") from e


def check_datalist(
    datalist: Sequence[Mapping[str, Any]],
    num_classes: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    read_data: bool = True,
    atol: float = 1e-3,
    source: str | os.PathLike | None = None,
    max_errors: int = 20,
    label_values: Mapping[int, str] | None = None,
) -> list[dict]:
    """Check a segmentation datalist before training, evaluation or inference; returns it unchanged.

    Every item must have ``image_key`` naming a readable NIfTI (or other nibabel) file holding at least one voxel.
    Where an item has ``label_key``, the label must have the image's spatial shape and affine (to ``atol`` mm) and,
    with ``num_classes``, integer values in ``0 .. num_classes - 1`` (with ``label_values``, one of those values).
    With ``read_data`` every file is read in full (this finds truncated files; headers alone are read otherwise).

    Args:
        datalist: list of dicts such as ``{"image": path, "label": path}`` (``load_decathlon_datalist`` output).
        num_classes: number of classes including background; ``None`` skips the label value check.
        image_key: key of the image path.
        label_key: key of the label path (optional in items: inference lists have none).
        read_data: read the full arrays, not only the headers.
        atol: tolerance for comparing image and label affines.
        source: where the list came from (a dataset.json), named in the errors.
        max_errors: at most this many problems are listed in the error.
        label_values: the label values a dataset declares (``dataset.json``'s ``labels``: value -> name); a label
            value not among them is an error (with ``read_data``).

    Raises:
        DataCheckError: (a ``ValueError``) listing every problem found, each naming its file.
    """
    where = f" from {source}" if source is not None else ""
    if not datalist:
        raise DataCheckError(f"the datalist{where} is empty: no {image_key!r} files to use.")
    errors: list[str] = []
    for i, item in enumerate(datalist):
        if len(errors) >= max_errors:
            break
        try:
            _check_item(item, i, num_classes, image_key, label_key, read_data, atol, label_values)
        except DataCheckError as e:
            errors.append(str(e))
    if errors:
        more = " (stopped after the first {max_errors})" if len(errors) >= max_errors else ""
        raise DataCheckError(f"{len(errors)} problem(s) in the datalist{where}{more}:\n  - " + "\n  - ".join(errors))
    return list(datalist)


def _check_item(item: Mapping, index: int, num_classes: int | None, image_key: str, label_key: str,
                read_data: bool, atol: float, label_values: Mapping[int, str] | None = None) -> None:
    if not isinstance(item, Mapping) or image_key not in item:
        raise DataCheckError(f"item {index} has no {image_key!r} key: {item!r}")
    paths = {k: str(item[k]) for k in (image_key, label_key) if k in item}
    for key, path in paths.items():
        if not os.path.isfile(path):
            raise DataCheckError(f"{path}: {key} file not found (item {index}); fix the path in the dataset list or "
                                 "--dataset_dir")
    imgs = {k: _load_header(p) for k, p in paths.items()}
    for key, img in imgs.items():
        if not img.shape or 0 in img.shape:
            raise DataCheckError(f"{paths[key]}: the {key} has no voxels (shape {tuple(img.shape)}); replace the "
                                 "file or remove it from the dataset list")
    arrays = {k: _read_array(img, paths[k]) for k, img in imgs.items()} if read_data else {}
    if label_key not in imgs:
        return
    image, label = imgs[image_key], imgs[label_key]
    img_shape, lab_shape = tuple(image.shape[:3]), tuple(label.shape[:3])
    if img_shape != lab_shape:
        raise DataCheckError(f"{paths[label_key]}: label shape {lab_shape} does not match image shape {img_shape} "
                             f"of {paths[image_key]}; a label must be on its image's voxel grid: resample it onto "
                             "the image or fix the pairing in the dataset list")
    if not np.allclose(image.affine, label.affine, atol=atol):
        raise DataCheckError(f"{paths[label_key]}: label affine does not match the affine of {paths[image_key]}:\n"
                             f"{np.array2string(label.affine, precision=3)}\nvs\n"
                             f"{np.array2string(image.affine, precision=3)}")
    if (num_classes is not None or label_values is not None) and read_data:
        values = np.unique(arrays[label_key])
        if label_values is not None:
            bad = [v for v in values.tolist() if v not in label_values]
            if bad:
                declared = ", ".join(f"{k} {v}" for k, v in sorted(label_values.items()))
                raise DataCheckError(f"{paths[label_key]}: label values {bad[:10]} are not among the labels the "
                                     f"dataset declares ({declared}); fix the label values or dataset.json's labels")
        if num_classes is not None:
            bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < num_classes]
            if bad:
                raise DataCheckError(f"{paths[label_key]}: label values {bad[:10]} are outside the classes "
                                     f"0..{num_classes - 1}; fix the label values or the number of classes")


def load_checked_datalist(
    dataset_dir: str | os.PathLike,
    data_list_key: str = "training",
    num_classes: int | None = None,
    datalist_file: str | os.PathLike | None = None,
    read_data: bool = True,
    label_values: Mapping[int, str] | None = None,
) -> list[dict]:
    """``monai.data.load_decathlon_datalist`` of an MSD-layout dataset, checked with `check_datalist`.

    Args:
        dataset_dir: the dataset folder (holding ``dataset.json``, ``imagesTr/``...); paths are relative to it.
        data_list_key: ``"training"``, ``"test"`` or any other list in the JSON.
        num_classes: see `check_datalist`.
        datalist_file: the JSON file, by default ``dataset_dir/dataset.json``.
        read_data, label_values: see `check_datalist`.
    """
    from monai.data import load_decathlon_datalist

    datalist_file = Path(datalist_file) if datalist_file is not None else Path(dataset_dir) / "dataset.json"
    if not datalist_file.is_file():
        raise DataCheckError(f"{datalist_file}: dataset list not found; --dataset_dir must name a folder in Medical "
                             "Segmentation Decathlon layout (dataset.json, imagesTr/, labelsTr/, imagesTs/), or "
                             "--datalist_file the list")
    try:
        datalist = load_decathlon_datalist(datalist_file, True, data_list_key, dataset_dir)
    except (ValueError, json.JSONDecodeError) as e:
        raise DataCheckError(f"{datalist_file}: {e}") from e
    return check_datalist(datalist, num_classes, read_data=read_data, source=datalist_file, label_values=label_values)


def declared_labels(datalist_file: str | os.PathLike) -> dict[int, str] | None:
    """The label values an MSD ``dataset.json`` declares (its ``labels``: ``{"0": "background", ...}``), as
    value -> name; None when it declares none.

    Raises:
        DataCheckError: for a file that is not such JSON, or labels whose keys are not integers.
    """
    try:
        meta = json.loads(Path(datalist_file).read_text())
    except (OSError, ValueError) as e:
        raise DataCheckError(f"{datalist_file}: cannot read it as JSON ({e})") from e
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not labels:
        return None
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except (AttributeError, ValueError) as e:
        raise DataCheckError(f"{datalist_file}: 'labels' must map label values to names, e.g. "
                             f'{{"0": "background", "1": "spleen"}}, got {labels!r}') from e


def check_weights_file(path: str | os.PathLike) -> str:
    """``path`` if it is a file, else a `DataCheckError` saying how to get it: a bundle's inference checks its
    ``models/model.pt`` this way in ``initialize`` before its ``checkpointloader`` reads it.

    Example (a bundle's ``initialize``)::

        "$@load_pretrain and monai_ckpt.data.check_weights_file(@checkpointloader#load_path)"
    """
    if not os.path.isfile(path):
        raise DataCheckError(f"{path}: trained weights not found; train the bundle first (configs/train.json), fetch "
                             "them from the location in large_files.yml, or run without them: --load_pretrain False")
    return str(path)
