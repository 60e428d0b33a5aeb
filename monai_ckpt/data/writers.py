"""Writers that never leave a half-written file: `AtomicNibabelWriter` for ``SaveImaged`` and `save_nifti_atomic`,
both through `monai_ckpt.io.atomic_path` (temporary file, fsync, rename). Model files:
`monai_ckpt.handlers.AtomicCheckpointSaver`."""

from __future__ import annotations

import logging
import os
from typing import Any

import nibabel as nib

from ..io import atomic_path

__all__ = ["AtomicNibabelWriter", "save_nifti_atomic"]


def save_nifti_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """``nib.save(img, path)``, atomically."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


try:
    from monai.data import NibabelWriter
    from monai.data import image_writer as monai_image_writer
except ImportError:  # pragma: no cover
    NibabelWriter = object  # type: ignore[misc,assignment]


class AtomicNibabelWriter(NibabelWriter):  # type: ignore[misc,valid-type]
    """MONAI's ``NibabelWriter`` that writes to a temporary file and renames it onto the target, so a crash or
    interrupt never leaves a truncated segmentation. Use as ``SaveImaged(..., writer=AtomicNibabelWriter)`` or
    ``"writer": "monai_ckpt.data.AtomicNibabelWriter"`` in a bundle config."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)
        if verbose:  # the final name, once it holds the complete file
            logging.getLogger(monai_image_writer.__name__).info(f"written: {filename}")
