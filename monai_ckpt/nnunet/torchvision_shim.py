"""Lets torchvision import where its compiled operators cannot load, so that nnU-Net can find its trainers.

nnU-Net looks a trainer up by importing every module of its trainer package; one of them imports timm, and timm
imports torchvision. A torchvision built for another torch (PyPI's CUDA build beside a CPU-only torch installed
from a wheel, for example) cannot load its compiled operators, and importing it then fails with ``operator
torchvision::nms does not exist``: torchvision registers Python kernels for two of its operators, ``nms`` and
``qnms``, whether or not they loaded. Every trainer but ``nnUNetTrainer`` then fails to load.

The right fix is the torchvision built for your torch (from the index you installed torch from). Where there is
none, ``python -m monai_ckpt.nnunet torchvision-shim install`` writes a startup hook into the environment's
site-packages (a ``.pth`` file and a module of the standard library only): just before torchvision registers those
kernels, and only if its operators did not load, it defines the two operators' schemas, without kernels. Nothing
else changes: torchvision's operators still fail with torchvision's own "Couldn't load custom C++ ops" where they are
called (nnU-Net's training and inference call none), and a torchvision whose operators load is left alone.
``python -m monai_ckpt.nnunet torchvision-shim remove`` takes it out again.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from ..io import atomic_path

__all__ = ["MODULE_NAME", "install", "installed", "remove", "torchvision_import_error"]

MODULE_NAME = "monai_ckpt_torchvision_shim"

# Written into site-packages as MODULE_NAME.py; imported at startup by MODULE_NAME.pth. Standard library only: it
# runs in every Python process of the environment, and imports torch only when torchvision is being imported.
_MODULE = '''"""Installed by monai-ckpt (python -m monai_ckpt.nnunet torchvision-shim install; remove with ... remove).

Where torchvision's compiled operators did not load (a torchvision built for another torch), torchvision's import
fails registering Python kernels for torchvision::nms and torchvision::qnms. Just before that, this defines the two
operators' schemas (no kernels: calling them raises torchvision's own error), so that torchvision, timm and nnU-Net's
trainer lookup import. Nothing happens where the operators loaded.
"""

import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # kept alive: the definitions last as long as it does


def _define_missing_operators():
    global _library
    import torch

    for schema in _SCHEMAS:
        try:
            getattr(torch.ops.torchvision, schema.split("(")[0])
        except (AttributeError, RuntimeError):
            if _library is None:
                _library = torch.library.Library("torchvision", "FRAGMENT")
            _library.define(schema)


class MonaiCkptTorchvisionShim:
    """A meta path finder that acts once, when torchvision._meta_registrations is imported, and finds nothing."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            _define_missing_operators()
        return None


if not any(type(finder).__name__ == "MonaiCkptTorchvisionShim" for finder in sys.meta_path):
    sys.meta_path.insert(0, MonaiCkptTorchvisionShim())
'''


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def installed(site_packages: str | Path | None = None) -> bool:
    """Whether the hook is installed in ``site_packages`` (default: this interpreter's)."""
    return (Path(site_packages or _site_packages()) / f"{MODULE_NAME}.pth").exists()


def install(site_packages: str | Path | None = None) -> Path:
    """Write the hook (``monai_ckpt_torchvision_shim.py`` and ``.pth``) into ``site_packages`` (default: this
    interpreter's); each file is written whole or not at all. Returns the ``.pth`` path."""
    folder = Path(site_packages or _site_packages())
    for name, text in ((f"{MODULE_NAME}.py", _MODULE), (f"{MODULE_NAME}.pth", f"import {MODULE_NAME}\n")):
        with atomic_path(folder / name) as tmp:
            Path(tmp).write_text(text)
    return folder / f"{MODULE_NAME}.pth"


def remove(site_packages: str | Path | None = None) -> bool:
    """Remove the hook from ``site_packages`` (default: this interpreter's); whether there was one."""
    folder = Path(site_packages or _site_packages())
    found = False
    for name in (f"{MODULE_NAME}.pth", f"{MODULE_NAME}.py"):  # the .pth first: never one importing a missing module
        path = folder / name
        if path.exists():
            path.unlink()
            found = True
    return found


def torchvision_import_error(python: str | None = None) -> str | None:
    """What ``import torchvision`` raises in a fresh ``python`` process (default: this interpreter), None if it
    imports or is not installed."""
    code = ("import importlib.util, sys\nif importlib.util.find_spec('torchvision') is None: sys.exit(0)\n"
            "import torchvision")
    proc = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"
