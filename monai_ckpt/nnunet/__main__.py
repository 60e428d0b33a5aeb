"""``python -m monai_ckpt.nnunet``: nnU-Net v2 with monai-ckpt from the command line.

Commands:
    trainers-path         print the folder to put in ``nnUNet_extTrainer`` (nnU-Net then finds nnUNetTrainerCkpt)
    check                 say whether nnU-Net finds nnUNetTrainerCkpt here, and what to do if not
    torchvision-shim      install | remove | status: the startup hook that lets a torchvision built for another
                          torch import (see monai_ckpt.nnunet.torchvision_shim)
    plan                  add a configuration sized for a GPU with checkpointing to an nnU-Net plans file

Example::

    export nnUNet_extTrainer=$(python -m monai_ckpt.nnunet trainers-path)
    nnUNetv2_train 3 3d_fullres 0 -tr nnUNetTrainerCkpt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import torchvision_shim

TRAINERS = Path(__file__).resolve().parent / "trainers"


def trainers_path() -> str:
    """The folder for ``nnUNet_extTrainer``: nnU-Net finds ``nnUNetTrainerCkpt`` there."""
    return str(TRAINERS)


def _lookup_error() -> str | None:
    """What nnU-Net's own trainer lookup says for nnUNetTrainerCkpt in a fresh process with nnUNet_extTrainer set to
    `trainers_path` (None: it finds it)."""
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            "print('found', find('nnUNetTrainerCkpt').__module__)")
    env = dict(os.environ, nnUNet_extTrainer=os.pathsep.join(
        p for p in (trainers_path(), os.environ.get("nnUNet_extTrainer", "")) if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode == 0 and "found monai_ckpt.nnunet.trainer" in proc.stdout:
        return None
    lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _check() -> int:
    import importlib.metadata as metadata

    for package in ("nnunetv2", "dynamic_network_architectures", "torch", "torchvision", "timm"):
        try:
            print(f"{package}: {metadata.version(package.replace('_', '-'))}")
        except metadata.PackageNotFoundError:
            print(f"{package}: not installed")
    print(f"torchvision shim: {'installed' if torchvision_shim.installed() else 'not installed'}")
    error = _lookup_error()
    if error is None:
        print(f"nnU-Net finds nnUNetTrainerCkpt with nnUNet_extTrainer={trainers_path()}")
        return 0
    print(f"nnU-Net's trainer lookup fails: {error}")
    if "torchvision" in error:
        print("torchvision does not import with this torch: install the torchvision built for your torch (from the "
              "index you installed torch from), or run: python -m monai_ckpt.nnunet torchvision-shim install")
    return 1


def _shim(action: str, force: bool) -> int:
    if action == "status":
        error = torchvision_shim.torchvision_import_error()
        print(f"shim: {'installed' if torchvision_shim.installed() else 'not installed'}; "
              f"import torchvision: {'works' if error is None else error}")
        return 0
    if action == "remove":
        print("removed" if torchvision_shim.remove() else "not installed: nothing to remove")
        return 0
    if not force and not torchvision_shim.installed():
        error = torchvision_shim.torchvision_import_error()
        if error is None:
            print("torchvision imports here (or is not installed): no shim needed (--force installs it anyway)")
            return 0
        print(f"import torchvision fails: {error}")
    path = torchvision_shim.install()
    error = torchvision_shim.torchvision_import_error()
    print(f"installed {path}; import torchvision: {'works' if error is None else error}")
    return 0 if error is None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.nnunet", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("trainers-path", help="print the folder for nnUNet_extTrainer")
    commands.add_parser("check", help="whether nnU-Net finds nnUNetTrainerCkpt here")
    shim = commands.add_parser("torchvision-shim", help="let a torchvision built for another torch import")
    shim.add_argument("action", choices=("install", "remove", "status"))
    shim.add_argument("--force", action="store_true", help="install even where torchvision imports")
    from .plans import add_plan_arguments, run_plan

    add_plan_arguments(commands.add_parser("plan", help="add a configuration sized for a GPU to an nnU-Net plans "
                                                        "file"))
    args = parser.parse_args(argv)
    if args.command == "trainers-path":
        print(trainers_path())
        return 0
    if args.command == "check":
        return _check()
    if args.command == "torchvision-shim":
        return _shim(args.action, args.force)
    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
