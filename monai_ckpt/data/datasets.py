"""Datasets in Medical Segmentation Decathlon layout, made reproducibly from a seed.

- `make_brain_tissue_dataset`: a small 4-class brain-tissue dataset (0 background, 1 CSF/other, 2 grey matter,
  3 white matter) derived from the MNI ICBM152 2009a template. Every subject is the template under a seeded
  spatial transform (rotation, anisotropic scaling, translation, smooth elastic displacement), resampled to a
  2 mm grid cropped at a random offset, with seeded intensity augmentation (multiplicative bias field, gamma,
  contrast, noise). The same arguments give the same arrays and, on the same platform, the same bytes.
- `make_synthetic_dataset`: tiny nested-ellipsoid volumes, for tests and smoke runs.
- `make_multichannel_dataset`: the same as 4D multi-modal images (MSD Task01/Task05 layout), anisotropic voxels,
  cases stored in several orientations.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_path, fsync_dir, is_temporary
from .writers import save_nifti_atomic

__all__ = ["BRAIN_TISSUE_LABELS", "make_brain_tissue_dataset", "make_multichannel_dataset", "make_synthetic_dataset",
           "prepare_dataset_dir"]

BRAIN_TISSUE_LABELS = {"0": "background", "1": "CSF/other", "2": "grey matter", "3": "white matter"}
MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _write_dataset_json(output: Path, name: str, description: str, labels: Mapping[str, str], modality: str,
                        training: list[dict], test: list[str], extra: Mapping[str, Any] | None = None) -> None:
    meta = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": dict(labels),
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        **(extra or {}),
    }
    with atomic_path(output / "dataset.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=4) + "\n")  # the model zoo's pretty-format-json form


# what the generators here write: folder in the dataset -> file names; any other file there is the user's
_CASE = r"(case|brain)_\d{3}\.nii(\.gz)?"
_OWN_FILES = {"": r"dataset\.json|NOTICE\.md", "imagesTr": _CASE, "labelsTr": _CASE, "imagesTs": _CASE}
_FOLDERS = ("imagesTr", "labelsTr", "imagesTs")


def _own(relative: str) -> bool:
    """Whether ``relative`` (a path in a dataset folder) is a file these generators write, or its temporary."""
    folder, _, name = relative.rpartition("/")
    pattern = _OWN_FILES.get(folder)
    return pattern is not None and (re.fullmatch(pattern, name) is not None or is_temporary(name, pattern))


def prepare_dataset_dir(output_dir: str | os.PathLike, listed: Iterable[str], overwrite: bool = False) -> list[Path]:
    """Check that ``output_dir`` can take a new dataset before anything is written, and say what of an old one to
    remove once the new one is complete.

    An empty or missing folder is always fine. A folder with files takes a new dataset only with ``overwrite``, and
    only if every file in it is one these generators write in their layout (``dataset.json``, ``NOTICE.md``,
    ``imagesTr|labelsTr|imagesTs/case_NNN.nii[.gz]`` or ``brain_NNN.nii.gz``, and `monai_ckpt.io.atomic_path`'s
    temporaries of them): a user's other files are never removed or overwritten.

    Args:
        output_dir: the dataset folder.
        listed: the files (relative to ``output_dir``, ``"imagesTr/case_000.nii.gz"``) the new dataset writes.
        overwrite: replace a dataset already there.

    Returns:
        the files of the old dataset the new one does not list: remove them (`_remove_stale`) after writing it.

    Raises:
        FileExistsError: the folder holds files and ``overwrite`` is off, or it holds files that are not a
            dataset's of this layout (named in the message).
    """
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} is a file, not a folder: choose a folder for the dataset")
    if not output.is_dir() or not any(output.iterdir()):
        return []
    files = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if not p.is_dir())
    foreign = [f for f in files if not _own(f)]
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise FileExistsError(
            f"{output} holds files that are not part of a dataset this tool writes: {', '.join(foreign[:10])}{more}; "
            "they are never removed or overwritten: move them, or choose an empty folder")
    if not overwrite:
        raise FileExistsError(
            f"{output} is not empty (a dataset of {len(files)} files): pass --overwrite (in Python overwrite=True) to "
            "replace it (its files the new dataset does not list are then removed), or choose an empty folder")
    keep = {Path(f).as_posix() for f in listed}
    return [output / f for f in files if f not in keep]


def _remove_stale(files: Sequence[Path]) -> None:
    """Remove the old dataset's files that the new one does not list (after the new one is complete)."""
    for path in files:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in files}:
        fsync_dir(folder)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of a (N, C, D, H, W) tensor, sigma in voxels."""
    radius = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.reshape(shape).repeat(c, 1, 1, 1, 1), groups=c)
    return x


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _brain_subject(src: torch.Tensor, src_affine: np.ndarray, rng: np.random.Generator, spacing: float,
                   shape: tuple[int, int, int], center: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented subject: (uint8 image, uint8 label, affine of its grid)."""
    # output grid: ``shape`` voxels of ``spacing`` mm, RAS, centred near the brain centre
    offset = center + rng.uniform(-8, 8, 3) - spacing * (np.array(shape) - 1) / 2
    out_affine = np.diag([spacing, spacing, spacing, 1.0])
    out_affine[:3, 3] = np.round(offset, 3)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx * spacing + out_affine[:3, 3]
    # subject -> template: rotation, anisotropic scaling about the brain centre, translation, elastic displacement
    lin = _rotation(np.deg2rad(rng.uniform(-10, 10, 3))) @ np.diag(rng.uniform(0.9, 1.1, 3))
    src_world = (world - center) @ lin.T + center + rng.uniform(-4, 4, 3)
    coarse = torch.from_numpy(rng.normal(0, 2.0, (1, 3, 5, 5, 5)))  # mm, on a 5^3 control grid
    disp = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0].reshape(3, -1).T.numpy()
    src_world = src_world + disp
    src_vox = (src_world - src_affine[:3, 3]) @ np.linalg.inv(src_affine[:3, :3]).T
    sizes = np.array(src.shape[2:])
    norm = 2 * src_vox / (sizes - 1) - 1  # grid_sample, align_corners=True
    grid = torch.from_numpy(norm[:, ::-1].copy()).float().reshape(1, *shape, 3)  # (x, y, z) = (W, H, D)
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0].numpy()
    t1, gm, wm, mask = warped
    # labels: brain mask from the template's T1 > 0; inside it the most probable of CSF/other, GM, WM
    other = np.clip(1 - gm - wm, 0, 1)
    label = np.where(mask >= 0.5, np.argmax(np.stack([other, gm, wm]), 0) + 1, 0).astype(np.uint8)
    # intensity: smooth multiplicative bias field, gamma, contrast, Rician-like noise in the brain
    coords = (idx - (np.array(shape) - 1) / 2) / (np.array(shape) / 2)
    terms = np.concatenate([coords, coords**2, coords[:, [0]] * coords[:, [1]], coords[:, [1]] * coords[:, [2]]], 1)
    bias = np.exp(terms @ rng.uniform(-0.12, 0.12, terms.shape[1])).reshape(shape)
    img = np.clip(t1, 0, 1) ** rng.uniform(0.8, 1.25) * rng.uniform(0.85, 1.05) * bias
    # noise inside the head only: the template is skull-stripped, and a noisy background would triple file sizes
    n1, n2 = rng.normal(0, noise, (2, *shape)) * (mask >= 0.5)
    img = np.sqrt((img + n1) ** 2 + n2**2)
    image = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return image, label, out_affine


def make_brain_tissue_dataset(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_training: int = 6,
    num_test: int = 2,
    seed: int = 0,
    spacing: float = 2.0,
    noise: float = 0.01,
    subjects: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Derive the 4-class brain-tissue dataset from the MNI ICBM152 2009a template, in MSD layout.

    Labels: 0 background (outside the template's brain mask ``T1 > 0``), and inside it the most probable of
    1 CSF/other (probability ``1 - p_GM - p_WM``: ventricles, sulcal CSF, deep structures the tissue maps give
    to neither), 2 grey matter, 3 white matter, the probability maps warped with the image. Subject ``i`` uses
    the random stream ``(seed, i)`` only, so any subset can be regenerated and compared with the full dataset.
    A ``NOTICE.md`` with the template's copyright notice and terms of use (from the source's) is written with it.

    Args:
        source_dir: folder with the template files (see ``MNI152_FILES``) and ``NOTICE.md``.
        output_dir: dataset folder to write (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``).
        num_training: labelled subjects (``imagesTr``/``labelsTr``).
        num_test: unlabelled subjects (``imagesTs``).
        seed: random seed.
        spacing: output voxel size in mm.
        noise: noise standard deviation, as a fraction of the intensity range.
        subjects: write only these subject indices (0 .. num_training + num_test - 1); all by default.
        overwrite: replace a dataset already in ``output_dir`` (see `prepare_dataset_dir`).

    Returns:
        The dataset folder.

    Raises:
        FileNotFoundError: the template files are not in ``source_dir``.
        FileExistsError: ``output_dir`` is not empty (see `prepare_dataset_dir`).
    """
    source, output = Path(source_dir), Path(output_dir)
    _check_counts(num_training, num_test)
    if spacing <= 0:
        raise ValueError(f"spacing must be a positive number of mm, got {spacing}")
    wanted_files = [*MNI152_FILES.values(), "NOTICE.md"]
    missing = [f for f in wanted_files if not (source / f).is_file()]
    if missing:
        where = "the folder does not exist" if not source.is_dir() else f"missing: {', '.join(missing)}"
        raise FileNotFoundError(f"{source}: not the MNI ICBM152 2009a template folder ({where}); it must hold "
                                f"{', '.join(wanted_files)}")
    total = num_training + num_test
    listed = ["dataset.json", "NOTICE.md"] + [f"{d}/brain_{i:03d}.nii.gz" for i in range(total)
                                              for d in (("imagesTr", "labelsTr") if i < num_training else ("imagesTs",))]
    stale = prepare_dataset_dir(output, listed, overwrite)
    vols, src_affine = [], None
    for key in ("t1", "gm", "wm"):
        img = nib.load(source / MNI152_FILES[key])
        vols.append(np.asarray(img.dataobj, dtype=np.float32) / 255.0)
        src_affine = img.affine if src_affine is None else src_affine
    mask = (vols[0] > 0).astype(np.float32)
    src = torch.from_numpy(np.stack([*vols, mask]))[None]
    # anti-aliasing before sampling the 1 mm template on a coarser grid
    src = _smooth(src, sigma=0.4 * spacing / float(abs(src_affine[0, 0])))
    idx = np.argwhere(mask > 0)
    center = (idx.min(0) + idx.max(0)) / 2 @ src_affine[:3, :3].T + src_affine[:3, 3]
    wanted = range(total) if subjects is None else subjects
    _make_folders(output)
    training, test = [], []
    for i in range(total):
        name = f"brain_{i:03d}.nii.gz"
        if i < num_training:
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
        if i not in wanted:
            continue
        rng = np.random.default_rng([seed, i])
        shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ((60, 68), (72, 80), (60, 68)))
        image, label, affine = _brain_subject(src, src_affine, rng, spacing, shape, center, noise)
        folder = "imagesTr" if i < num_training else "imagesTs"
        save_nifti_atomic(_nifti(image, affine), output / folder / name)
        if i < num_training:
            save_nifti_atomic(_nifti(label, affine), output / "labelsTr" / name)
    _write_dataset_json(
        output, "MNI152 brain tissue",
        f"4-class brain tissue segmentation derived from the MNI ICBM152 2009a nonlinear symmetric template "
        f"(T1, GM/WM probability maps): {total} subjects made by seeded spatial and intensity augmentation "
        f"(seed {seed}), {spacing:g} mm. Generated by `python -m monai_ckpt.data brain-tissue`. "
        "See NOTICE.md for the template's terms of use.",
        BRAIN_TISSUE_LABELS, "T1", training, test,
        {"reference": "MNI ICBM152 2009a, McConnell Brain Imaging Centre, Montreal Neurological Institute",
         "licence": "see NOTICE.md", "release": f"seed {seed}"},
    )
    notice = (source / "NOTICE.md").read_text()
    with atomic_path(output / "NOTICE.md") as tmp:
        tmp.write_text(
            "# Notice\n\nThe images and labels in this folder are derived from the MNI ICBM152 2009a nonlinear "
            "symmetric template\n(T1 and grey/white-matter probability maps; McConnell Brain Imaging Centre, "
            "Montreal Neurological Institute)\nby `python -m monai_ckpt.data brain-tissue` "
            f"(seed {seed}, {spacing:g} mm; see monai_ckpt/data/datasets.py). They carry the\ntemplate's copyright notice "
            "and terms of use, reproduced below from the source's NOTICE.md.\n\n---\n\n" + notice)
    _remove_stale(stale)
    return output


def _check_counts(num_training: int, num_test: int) -> None:
    if num_training < 1 or num_test < 0:
        raise ValueError(f"a dataset needs at least 1 training case and 0 or more test cases, got num_training="
                         f"{num_training}, num_test={num_test}")


def _case_files(num_training: int, num_test: int, extensions: Sequence[str]) -> list[str]:
    """The files `_save_case` writes for every case, relative to the dataset folder, and ``dataset.json``."""
    files = ["dataset.json"]
    for i in range(num_training + num_test):
        name = f"case_{i:03d}{extensions[i % len(extensions)]}"
        files += [f"imagesTr/{name}", f"labelsTr/{name}"] if i < num_training else [f"imagesTs/{name}"]
    return files


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _ellipsoid_grid(shape: Sequence[int]) -> np.ndarray:
    """Coordinates in [-1, 1] of every voxel of ``shape``."""
    return np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)


def _make_folders(output: Path) -> None:
    for d in _FOLDERS:
        (output / d).mkdir(parents=True, exist_ok=True)


def _synthetic_cases(grid: np.ndarray, count: int, num_classes: int, means: np.ndarray, noise: float,
                     spacings: list[list[float]], rng: np.random.Generator) -> Iterator[tuple[np.ndarray, ...]]:
    """`make_synthetic_dataset`'s cases in order, each (label, image, affine), drawn from ``rng``."""
    span = float(means.max() - means.min()) or 1.0
    for i in range(count):
        label = _nested_ellipsoids(grid, num_classes, rng)
        image = (means[label] + rng.normal(0, noise * span, grid.shape[:-1])).astype(np.float32)
        affine = np.diag([*spacings[i % len(spacings)], 1.0])
        affine[:3, 3] = rng.uniform(-20, 20, 3).round(2)
        yield label, image, affine


def _nested_ellipsoids(grid: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A label volume of random nested ellipsoids: class ``k`` inside class ``k - 1``."""
    label = np.zeros(grid.shape[:-1], np.uint8)
    center = rng.uniform(-0.15, 0.15, 3)
    for k in range(1, num_classes):
        radii = rng.uniform(0.75, 0.9, 3) * (1 - (k - 1) / num_classes)
        label[(((grid - center) / radii) ** 2).sum(-1) <= 1] = k
    return label


def _per_case_spacings(spacing: float | Sequence) -> list[list[float]]:
    if np.isscalar(spacing):
        return [[float(spacing)] * 3]
    if all(np.isscalar(s) for s in spacing):
        return [[float(s) for s in spacing]]
    return [[float(v) for v in ([s] * 3 if np.isscalar(s) else s)] for s in spacing]


def _save_case(output: Path, index: int, labelled: bool, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
               axcodes: str, dtype: str, extension: str, int_scale: float) -> dict | str:
    """Write case ``index`` (RAS arrays with their affine) reoriented to ``axcodes``, the image as ``dtype``
    (an integer dtype stores ``round(value * int_scale)``, like scanner data kept as int16) with file extension
    ``extension`` (``".nii.gz"`` or ``".nii"``); returns its ``dataset.json`` entry."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        image = np.round(image * int_scale)
    image = image.astype(dtype)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(tuple(axcodes)))
    file = f"case_{index:03d}{extension}"
    if not labelled:
        save_nifti_atomic(_nifti(image, affine).as_reoriented(ornt), output / "imagesTs" / file)
        return f"./imagesTs/{file}"
    save_nifti_atomic(_nifti(image, affine).as_reoriented(ornt), output / "imagesTr" / file)
    save_nifti_atomic(_nifti(label, affine).as_reoriented(ornt), output / "labelsTr" / file)
    return {"image": f"./imagesTr/{file}", "label": f"./labelsTr/{file}"}


def make_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_training: int = 3,
    num_test: int = 1,
    shape: Sequence[int] = (32, 32, 32),
    num_classes: int = 4,
    seed: int = 0,
    spacing: float | Sequence = 1.5,
    intensities: Sequence[float] | None = None,
    noise: float = 0.05,
    test_orientation: str = "LPS",
    orientations: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32",),
    extensions: Sequence[str] = (".nii.gz",),
    int_scale: float = 1000.0,
    overwrite: bool = False,
) -> Path:
    """Tiny volumes in MSD layout: nested random ellipsoids, class ``k`` inside class ``k - 1``, each class with
    its own mean intensity, plus Gaussian noise. Test images are stored in ``test_orientation`` (LPS by default,
    the training ones in RAS), so a pipeline that writes outputs with its input's affine can be checked.

    Args:
        output_dir: dataset folder to write.
        num_training: labelled volumes.
        num_test: unlabelled volumes.
        shape: spatial size.
        num_classes: classes including background.
        seed: random seed.
        spacing: voxel size in mm: one value, one per RAS axis (anisotropic), or a list of those, cycled per case.
        intensities: mean intensity per class; by default ``0, 1, ..., num_classes - 1`` scaled to [0, 1].
        noise: noise standard deviation, relative to the intensity range.
        test_orientation: axis codes of the test images (``"RAS"``, ``"LPS"``, ...).
        orientations: axis codes per case, cycled over training and test cases (image and label alike); replaces
            the RAS training / ``test_orientation`` test default.
        dtypes, extensions, int_scale: see `_save_case`: per case, cycled (``"int16"``; ``".nii"``).
        overwrite: replace a dataset already in ``output_dir`` (see `prepare_dataset_dir`).

    Raises:
        ValueError: for a shape or number of classes it cannot make: every case must hold every class (checked
            before anything is written).
        FileExistsError: ``output_dir`` is not empty (see `prepare_dataset_dir`).

    Example::

        # the quirks of real data: LPS and RAS, 1 x 1 x 2.5 mm voxels, int16 beside float32, .nii beside .nii.gz
        make_synthetic_dataset("data", shape=(20, 20, 10), spacing=(1.0, 1.0, 2.5), orientations=("LPS", "RAS"),
                               dtypes=("int16", "float32"), extensions=(".nii", ".nii.gz"))
    """
    output = Path(output_dir)
    _check_counts(num_training, num_test)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be 3 sizes of at least 2 voxels, got {shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background: a segmentation needs at least 2, got {num_classes}")
    stale = prepare_dataset_dir(output, _case_files(num_training, num_test, extensions), overwrite)
    means = np.asarray(intensities if intensities is not None else np.linspace(0, 1, num_classes), dtype=np.float32)
    cases = list(_synthetic_cases(_ellipsoid_grid(shape), num_training + num_test, num_classes, means, noise,
                                  _per_case_spacings(spacing), np.random.default_rng(seed)))
    for i, (label, _, _) in enumerate(cases):  # nothing is written before this check
        missing = sorted(set(range(num_classes)) - set(np.unique(label).tolist()))
        if missing:
            raise ValueError(f"shape {shape} is too small for {num_classes} classes: case {i} would have no voxel of "
                             f"class(es) {missing}; use a larger shape or fewer classes")
    _make_folders(output)
    training, test = [], []
    for i, (label, image, affine) in enumerate(cases):
        if orientations:
            axcodes = orientations[i % len(orientations)]
        else:
            axcodes = "RAS" if i < num_training else test_orientation
        item = _save_case(output, i, i < num_training, image, label, affine, axcodes, dtypes[i % len(dtypes)],
                          extensions[i % len(extensions)], int_scale)
        (training if i < num_training else test).append(item)
    labels = {str(k): ("background" if k == 0 else f"class {k}") for k in range(num_classes)}
    _write_dataset_json(output, "synthetic", "nested ellipsoids (monai_ckpt.data.make_synthetic_dataset)", labels,
                        "synthetic", training, test)
    _remove_stale(stale)
    return output


def make_multichannel_dataset(
    output_dir: str | os.PathLike,
    num_training: int = 3,
    num_test: int = 1,
    shape: Sequence[int] = (32, 32, 16),
    modalities: Sequence[str] = ("T2", "ADC"),
    num_classes: int = 3,
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 2.5),
    orientations: Sequence[str] = ("RAS", "LPS"),
    noise: float = 0.05,
    labels: Mapping[str, str] | None = None,
    name: str = "synthetic multi-channel",
    dtypes: Sequence[str] = ("float32",),
    extensions: Sequence[str] = (".nii.gz",),
    int_scale: float = 1000.0,
    overwrite: bool = False,
) -> Path:
    """Tiny multi-modal volumes in the layout of the Medical Segmentation Decathlon's multi-modal tasks
    (Task01_BrainTumour, Task05_Prostate): each image one 4D NIfTI ``(X, Y, Z, C)`` with the modalities as the
    last axis, labels 3D, ``dataset.json`` with ``tensorImageSize: "4D"`` and one ``modality`` entry per channel.

    The label holds nested random ellipsoids (value ``k`` inside value ``k - 1``); every channel gives each
    class its own mean intensity (a per-channel random order of ``0 .. 1``), plus Gaussian noise. The voxels are
    ``spacing`` mm (anisotropic by default), and case ``i`` is stored in orientation
    ``orientations[i % len(orientations)]`` (image and label alike), so pipelines that reorient and resample
    are exercised; test images (``imagesTs``) continue the same cycle.

    Args:
        output_dir: dataset folder to write.
        num_training: labelled volumes.
        num_test: unlabelled volumes.
        shape: spatial size, in RAS voxel order before reorientation.
        modalities: channel names, one channel each.
        num_classes: label values ``0 .. num_classes - 1``.
        seed: random seed.
        spacing: voxel size in mm per RAS axis.
        orientations: axis codes per case, cycled (``"RAS"``, ``"LPS"``, ``"PIR"``, ...).
        noise: noise standard deviation, relative to the intensity range.
        labels: the ``labels`` of ``dataset.json``; by default ``background``, ``class 1``, ...
        name: the ``name`` of ``dataset.json``.
        dtypes, extensions, int_scale: see `_save_case`: per case, cycled (``"int16"``; ``".nii"``).
        overwrite: replace a dataset already in ``output_dir`` (see `prepare_dataset_dir`).
    """
    output = Path(output_dir)
    _check_counts(num_training, num_test)
    stale = prepare_dataset_dir(output, _case_files(num_training, num_test, extensions), overwrite)
    rng = np.random.default_rng(seed)
    channels = len(modalities)
    means = np.stack([rng.permutation(np.linspace(0, 1, num_classes)) for _ in range(channels)], -1)
    grid = _ellipsoid_grid(shape)
    _make_folders(output)
    training, test = [], []
    for i in range(num_training + num_test):
        label = _nested_ellipsoids(grid, num_classes, rng)
        image = (means[label] + rng.normal(0, noise, (*shape, channels))).astype(np.float32)
        affine = np.diag([*map(float, spacing), 1.0])
        affine[:3, 3] = rng.uniform(-20, 20, 3).round(2)
        item = _save_case(output, i, i < num_training, image, label, affine, orientations[i % len(orientations)],
                          dtypes[i % len(dtypes)], extensions[i % len(extensions)], int_scale)
        (training if i < num_training else test).append(item)
    labels = dict(labels) if labels is not None else {
        str(k): ("background" if k == 0 else f"class {k}") for k in range(num_classes)}
    _write_dataset_json(output, name, "nested ellipsoids, one 4D NIfTI per case with the modalities as channels "
                        "(monai_ckpt.data.make_multichannel_dataset)", labels, "", training, test,
                        {"tensorImageSize": "4D", "modality": {str(c): m for c, m in enumerate(modalities)}})
    _remove_stale(stale)
    return output
