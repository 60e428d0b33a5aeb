"""Figures of images with their segmentations overlaid (PNG, written atomically)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import atomic_path

__all__ = ["save_bundle_overlay", "save_overlay_png"]


def save_overlay_png(
    images: Sequence[str | os.PathLike],
    segmentations: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    num_classes: int = 4,
    title: str | None = None,
) -> Path:
    """A PNG with, per image, its axial, coronal and sagittal middle slices with the segmentation overlaid.

    Both are read with nibabel and brought to RAS (closest canonical), so an image and a segmentation written
    with the same affine line up whatever their storage orientation. Written atomically.

    Args:
        images: image files.
        segmentations: segmentation files, one per image, same grid.
        path: PNG to write.
        num_classes: classes including background (background is not drawn).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if len(images) != len(segmentations) or not images:
        raise ValueError(f"need one segmentation per image, got {len(images)} images, {len(segmentations)} segs.")
    colors = plt.get_cmap("tab10")(np.arange(max(num_classes - 1, 1)))
    cmap = ListedColormap(colors)
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 3.1 * len(images)), squeeze=False)
    for row, (img_path, seg_path) in enumerate(zip(images, segmentations)):
        img = np.asarray(nib.as_closest_canonical(nib.load(img_path)).dataobj, dtype=np.float32)
        seg = np.asarray(nib.as_closest_canonical(nib.load(seg_path)).dataobj)
        img, seg = img.reshape(img.shape[:3]), seg.reshape(seg.shape[:3])
        if img.shape != seg.shape:
            raise ValueError(f"{seg_path}: shape {seg.shape} differs from {img_path} {img.shape}.")
        c = [n // 2 for n in img.shape]
        views = [("axial", img[:, :, c[2]], seg[:, :, c[2]]), ("coronal", img[:, c[1], :], seg[:, c[1], :]),
                 ("sagittal", img[c[0], :, :], seg[c[0], :, :])]
        for ax, (name, im, sg) in zip(axes[row], views):
            ax.imshow(im.T, cmap="gray", origin="lower")
            ax.imshow(np.ma.masked_where(sg.T == 0, sg.T - 1), cmap=cmap, vmin=0, vmax=max(num_classes - 2, 1),
                      alpha=0.45, origin="lower", interpolation="nearest")
            ax.set_title(f"{Path(img_path).name.split('.')[0]} {name}", fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)


def save_bundle_overlay(images: Sequence[str | os.PathLike], output_dir: str | os.PathLike, path: str | os.PathLike,
                        postfix: str = "seg", num_classes: int = 4, max_images: int = 3) -> Path:
    """`save_overlay_png` of the first ``max_images`` of ``images`` with the segmentations a bundle's inference
    wrote for them (``SaveImaged(output_dir=output_dir, output_postfix=postfix, separate_folder=False)``, that is
    ``<output_dir>/<image name>_<postfix>.nii.gz``).

    Args:
        images: the input image files.
        output_dir: where the segmentations are.
        path: PNG to write.
        postfix: the ``output_postfix`` of the bundle's ``SaveImaged``.
        num_classes: classes including background.
        max_images: at most this many images.
    """
    images = [str(p) for p in images][:max_images]
    segs = [Path(output_dir) / f"{Path(p).name.split('.')[0]}_{postfix}.nii.gz" for p in images]
    missing = [str(s) for s in segs if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"no segmentation for: {', '.join(missing)}")
    return save_overlay_png(images, segs, path, num_classes, title="image with predicted segmentation")
