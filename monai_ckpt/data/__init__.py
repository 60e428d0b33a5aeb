"""Datasets, data checks and safe writing of outputs for the bundles.

- ``monai_ckpt/data/checks.py``: `check_datalist`, `load_checked_datalist` and `DataCheckError`: a dataset is
  validated before anything is trained or written; one error names every bad file.
- ``monai_ckpt/data/datasets.py``: `make_brain_tissue_dataset` (4 classes, derived from the MNI ICBM152 2009a
  template), `make_synthetic_dataset` and `make_multichannel_dataset`, in Medical Segmentation Decathlon layout.
- ``monai_ckpt/data/writers.py``: `AtomicNibabelWriter` (a ``SaveImaged`` writer) and `save_nifti_atomic`: an
  interrupted run never leaves a half-written segmentation.
- ``monai_ckpt/data/overlay.py``: `save_overlay_png` and `save_bundle_overlay`.
- ``monai_ckpt/data/errors.py``: `install_brief_errors`: a bundle run ends a user's mistake with one message that
  names the file and the fix, not a traceback.
- ``monai_ckpt/data/cli.py``: ``python -m monai_ckpt.data brain-tissue|synthetic|check ...``.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

# public name -> the module that defines it (imported on first use: ``python -m monai_ckpt.data --help`` needs none)
_LAZY = {
    "BRAIN_TISSUE_LABELS": ".datasets",
    "AtomicNibabelWriter": ".writers",
    "DataCheckError": ".checks",
    "atomic_path": "..io",
    "brief_error": ".errors",
    "check_datalist": ".checks",
    "check_weights_file": ".checks",
    "install_brief_errors": ".errors",
    "load_checked_datalist": ".checks",
    "main": ".cli",
    "make_brain_tissue_dataset": ".datasets",
    "make_multichannel_dataset": ".datasets",
    "make_synthetic_dataset": ".datasets",
    "save_bundle_overlay": ".overlay",
    "save_nifti_atomic": ".writers",
    "save_overlay_png": ".overlay",
}
_SUBMODULES = ("checks", "cli", "datasets", "errors", "overlay", "writers")

__all__ = [
    "BRAIN_TISSUE_LABELS",
    "AtomicNibabelWriter",
    "DataCheckError",
    "atomic_path",
    "brief_error",
    "check_datalist",
    "check_weights_file",
    "install_brief_errors",
    "load_checked_datalist",
    "main",
    "make_brain_tissue_dataset",
    "make_multichannel_dataset",
    "make_synthetic_dataset",
    "save_bundle_overlay",
    "save_nifti_atomic",
    "save_overlay_png",
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)

if TYPE_CHECKING:
    from ..io import atomic_path
    from .checks import DataCheckError, check_datalist, check_weights_file, load_checked_datalist
    from .cli import main
    from .datasets import (
        BRAIN_TISSUE_LABELS,
        make_brain_tissue_dataset,
        make_multichannel_dataset,
        make_synthetic_dataset,
    )
    from .errors import brief_error, install_brief_errors
    from .overlay import save_bundle_overlay, save_overlay_png
    from .writers import AtomicNibabelWriter, save_nifti_atomic
