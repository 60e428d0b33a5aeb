"""Running the bundles in tests: paths, tiny-size overrides given as a user gives them on the command line
(``--key value``), in-process runs through ``monai.bundle``'s Python API (no interpreter start-up), ``torchrun`` runs
with 2 CPU processes (gloo), and the checks every bundle's outputs share."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ckpt_export
from monai.bundle import run as bundle_run

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
BRAIN = BUNDLES / "brain_tissue_segmentation"
SPLEEN = BUNDLES / "spleen_ct_ckpt_segmentation"
TUMOR = BUNDLES / "brain_tumor_mri_segmentation"
PROSTATE = BUNDLES / "prostate_mri_segmentation"
SCHEMA = BUNDLES / "meta_schema.json"
MNI152 = REPO.parent / "shared" / "data" / "mni152"

TINY_UNET4 = {"network_def#channels": [4, 8, 16, 32]}  # brain: 3 levels of stride 2
TINY_UNET5 = {"network_def#channels": [4, 8, 8, 16, 16]}  # spleen: 4 levels of stride 2
TINY = {"patch_size": [16, 16, 16], "num_samples": 2, "num_workers": 0, "progress": False, "amp": False}
# the multi-channel bundles (tumour, prostate) stitch on the CPU and take the bundle's num_samples
TINY_MULTICHANNEL = {"patch_size": [16, 16, 16], "num_workers": 0, "progress": False, "amp": False,
                     "stitch_device": "cpu"}
TRAIN_ONLY = ("num_val", "max_epochs", "val_interval", "num_samples", "batch_size", "progress")

# The quirks of real data in every bundle's test data: anisotropic and differing spacings, LPS beside RAS, int16
# beside float32, .nii beside .nii.gz, and volumes smaller than the 16^3 test patch after resampling.
QUIRKS = {"orientations": ("LPS", "RAS", "RAS", "LPS", "LPS"), "dtypes": ("int16", "float32"),
          "extensions": (".nii.gz", ".nii", ".nii.gz")}


def cfg(bundle: Path, *names: str) -> list[str]:
    return [str(bundle / "configs" / f"{n}.json") for n in names]


def overrides(root: Path, data: Path, tiny: dict = TINY, **extra) -> dict:
    return {"bundle_root": str(root), "dataset_dir": str(data), "ckpt_dir": str(root / "models"),
            "output_dir": str(root / "eval"), **tiny, **extra}


def inference_overrides(train_overrides: dict) -> dict:
    return {k: v for k, v in train_overrides.items() if k not in TRAIN_ONLY}


def cli(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]  # fire: "False" is a bool, "false" a str
    return out


def env() -> dict:
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def run_in_process(bundle: Path, configs: list[str], values: dict, **kwargs) -> None:
    bundle_run(config_file=cfg(bundle, *configs), meta_file=str(bundle / "configs" / "metadata.json"),
               logging_file=False, **values, **kwargs)


def torchrun_train(bundle: Path, values: dict, tmp_path: Path) -> dict:
    """Train ``bundle`` with train.json + multi_gpu_train.json under torchrun, 2 CPU processes (gloo); check the
    validation Dice is logged and return the saved weights, which must be free of DDP's ``module.`` prefix."""
    import re

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "--config_file",
           json.dumps(cfg(bundle, "train", "multi_gpu_train")), *cli(values)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"val_mean_dice: [0-9.]+", log), log[-3000:]
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DistributedDataParallel
    return state


def assert_export_parity(bundle: Path, root: Path, plain: torch.nn.Module, trained: torch.nn.Module,
                         x: torch.Tensor, export_overrides: dict, atol: float = 1e-5) -> torch.Tensor:
    """TorchScript export of models/model.pt (``ckpt_export``); it and the plain MONAI network loaded with the saved
    weights give the output of the checkpointed network that was trained. Returns that output."""
    ts_path = root / "models" / "model.ts"
    ckpt_export("network_def", filepath=str(ts_path), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"), config_file=cfg(bundle, "inference"),
                **export_overrides)
    assert ts_path.stat().st_size > 0
    scripted = torch.jit.load(str(ts_path))
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    plain.load_state_dict(state)  # strict: the checkpointed network saved exactly the plain network's keys
    trained.load_state_dict(state)
    plain.eval(), trained.eval()
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=atol)
        torch.testing.assert_close(trained(x), ref, rtol=0, atol=0)
    assert ref.abs().sum() > 0
    return ref


def assert_segmentations(data: Path, out_dir: Path, num_classes: int) -> list[Path]:
    """A segmentation per test image, with the image's shape and affine and only class values."""
    tests = json.loads((data / "dataset.json").read_text())["test"]
    segs = []
    for rel in tests:
        image = nib.load(data / rel)
        seg_path = out_dir / (Path(rel).name.split(".")[0] + "_seg.nii.gz")
        seg = nib.load(seg_path)
        assert seg.shape[:3] == image.shape[:3], seg_path
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4, err_msg=str(seg_path))
        values = np.unique(np.asarray(seg.dataobj))
        assert set(values.tolist()) <= set(range(num_classes)), values
        assert len(values) > 1, f"{seg_path} is constant"
        segs.append(seg_path)
    assert not list(out_dir.glob(".*tmp*")), "temporary files left behind"
    return segs


def metrics_of(root: Path) -> dict[str, float]:
    return {row[0]: float(row[1]) for row in csv.reader((root / "eval" / "metrics.csv").open())}


def assert_outputs_on_input_grid(data: Path, out_dir: Path, channels: int | None) -> list[np.ndarray]:
    """One segmentation per test image, on the image's grid and affine (the test images are stored LPS while
    the network ran in RAS at another spacing), values 0/1 per channel or class indices."""
    segs = []
    for rel in json.loads((data / "dataset.json").read_text())["test"]:
        image = nib.load(data / rel)
        assert nib.aff2axcodes(image.affine) != ("R", "A", "S")
        seg_img = nib.load(out_dir / (Path(rel).name.split(".")[0] + "_seg.nii.gz"))
        seg = np.asarray(seg_img.dataobj)
        assert seg.dtype == np.uint8
        np.testing.assert_allclose(seg_img.affine, image.affine, atol=1e-4)
        if channels is None:
            assert seg.shape == image.shape[:3]
        else:
            assert seg.shape == (*image.shape[:3], channels)  # the channels as the last axis, like the input
            assert set(np.unique(seg).tolist()) <= {0, 1}
        segs.append(seg)
    assert not list(out_dir.glob(".*tmp*")), "temporary files left behind"
    return segs
