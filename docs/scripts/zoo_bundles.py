"""Checkpoint a model-zoo bundle: the zoo's own bundles, trained plainly and with monai_ckpt's override, on the CPU.

For each local copy of a bundle folder (the user's download, e.g. ``python -m monai.bundle download --name
spleen_ct_segmentation --bundle_dir bundles/``) this script fetches nothing: it copies the folder twice into a work
directory (the copy given is never written to), writes a tiny dataset in the layout the bundle's configs expect,
and runs, with ``python -m monai.bundle run`` exactly as a user would:

1. ``configs/train.json`` for one short epoch, plainly and with the override that swaps in the monai_ckpt class
   (`OVERRIDES`), both from the same seed (the bundle's own ``set_determinism``): the training losses of every
   iteration and the trained weights (``models/model.pt``, saved by the bundle's validation) must be the same;
2. ``configs/inference.json`` both ways: the plain network with the weights trained with checkpointing, and the
   monai_ckpt class with the plainly trained weights: the segmentations written must be the same.

The same CPU-sized overrides go to both runs of a bundle (`SPECS`: one epoch, validation after it, patches and
sliding windows of 32-64 voxels, no worker processes, the bundle's seed with deterministic kernels; SwinUNETR's
``ITKReader`` replaced by ``NibabelReader`` where ``itk`` is not installed; for ``brats_mri_segmentation`` the labels
cast to float, without which its loss fails on MONAI >= 1.5 whichever network runs). The bundles' files stay where they are; nothing of them is copied into this repository.

Usage::

    python docs/scripts/zoo_bundles.py ~/zoo/spleen_ct_segmentation ~/zoo/swin_unetr_btcv_segmentation \\
        ~/zoo/brats_mri_segmentation ~/zoo/wholeBody_ct_segmentation --work /tmp/zoo_runs --json zoo.json

Exit status 0 when every bundle trained the same both ways and inferred both ways.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

LOSS = re.compile(r"train_loss: ([-+0-9.eE]+|nan|inf)")


@dataclass(frozen=True)
class Spec:
    """How to run one zoo bundle tiny on the CPU.

    Attributes:
        network: the MONAI class of its ``network_def``.
        layout: ``"msd"`` (``imagesTr/``, ``labelsTr/``, ``imagesTs/`` under ``dataset_dir``, read by glob) or
            ``"brats"`` (a folder of four modality files and a ``_seg`` file per case, listed in
            ``configs/datalist.json``).
        cases: training + validation cases (the zoo's configs take the last 9 or 10 of them for validation).
        shape, spacing: of each generated volume (the bundle's own spacing, so nothing is resampled).
        classes, channels: label classes and image channels.
        train, infer: overrides for a tiny CPU run, the same for the plain and the checkpointed run.
        network_def: a whole ``network_def`` for MONAI versions that no longer take an argument the zoo's config
            passes (SwinUNETR's ``img_size``): used for both runs, plus ``_target_``/``checkpoint_policy`` for ours.
        readers: config ids of ``LoadImaged`` transforms that name ``ITKReader``.
    """

    network: str
    layout: str
    cases: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    classes: int
    channels: int = 1
    train: dict = field(default_factory=dict)
    infer: dict = field(default_factory=dict)
    network_def: dict | None = None
    readers: tuple[str, ...] = ()


_NO_WORKERS = {"train#dataloader#num_workers": 0, "validate#dataloader#num_workers": 0}
SPECS = {
    "spleen_ct_segmentation": Spec(
        "UNet", "msd", 12, (40, 40, 40), (1.5, 1.5, 2.0), 2,
        train={"epochs": 1, "val_interval": 1, "train#dataset#num_workers": 0, **_NO_WORKERS,
               "train#random_transforms#0#spatial_size": [32, 32, 32], "validate#inferer#roi_size": [32, 32, 32]},
        infer={"dataloader#num_workers": 0, "inferer#roi_size": [32, 32, 32]}),
    "swin_unetr_btcv_segmentation": Spec(
        "SwinUNETR", "msd", 11, (32, 32, 64), (1.5, 1.5, 2.0), 14,
        train={"val_interval": 1, "train#trainer#max_epochs": 1, "train#dataset#num_workers": 0, **_NO_WORKERS,
               "train#dataloader#batch_size": 1, "train#random_transforms#0#num_samples": 1,
               "train#random_transforms#0#spatial_size": [32, 32, 64], "validate#inferer#roi_size": [32, 32, 64]},
        infer={"dataloader#num_workers": 0, "inferer#roi_size": [32, 32, 64]},
        network_def={"_target_": "SwinUNETR", "spatial_dims": 3, "in_channels": 1, "out_channels": 14,
                     "feature_size": 48, "use_checkpoint": True},
        readers=("train#deterministic_transforms#0#reader", "preprocessing#transforms#0#reader")),
    "brats_mri_segmentation": Spec(
        "SegResNet", "brats", 4, (32, 32, 32), (1.0, 1.0, 1.0), 4, channels=4,
        train={"epochs": 1, "val_interval": 1, **_NO_WORKERS, "train#random_transforms#0#roi_size": [32, 32, 32],
               "validate#inferer#roi_size": [32, 32, 32],
               # MONAI >= 1.5's DiceLoss(squared_pred=True) cannot take the bool labels of
               # ConvertToMultiChannelBasedOnBratsClassesd (linalg.vector_norm): the shipped bundle fails without
               # this, with or without our override
               "train#preprocessing_transforms#1": {"_target_": "Compose", "transforms": [
                   {"_target_": "ConvertToMultiChannelBasedOnBratsClassesd", "keys": "label"},
                   {"_target_": "EnsureTyped", "keys": "label", "dtype": "$torch.float32"}]}},
        infer={"dataloader#num_workers": 0, "inferer#roi_size": [32, 32, 32]}),
    "wholeBody_ct_segmentation": Spec(
        "SegResNet", "msd", 12, (32, 32, 32), (1.5, 1.5, 1.5), 105,
        train={"val_interval": 1, "train#trainer#max_epochs": 1, "batch_size": 1, "train#dataset#num_workers": 0,
               **_NO_WORKERS, "train#deterministic_transforms#6#k_divisible": [32, 32, 32],
               "validate#preprocessing#transforms#6#k_divisible": [32, 32, 32],
               "validate#preprocessing#transforms#9#roi_size": [32, 32, 32],
               "train#random_transforms#0#roi_size": [32, 32, 32], "validate#inferer#roi_size": [32, 32, 32]},
        infer={"dataloader#num_workers": 0, "inferer#roi_size": [32, 32, 32]}),
}
# the override that checkpoints a zoo bundle: the monai_ckpt class in place of the MONAI one, and a policy
OVERRIDES = {network: {"network_def#_target_": f"monai_ckpt.Checkpoint{network}", "network_def#checkpoint_policy": "all"}
             for network in ("UNet", "SegResNet", "SwinUNETR")}


def _volume(rng: np.random.Generator, shape: tuple[int, ...], classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A label map of ``classes`` boxes on background (every class present) and an image that shows them."""
    label = np.zeros(shape, np.uint8)
    for c in range(1, classes):
        corner = [rng.integers(0, s - 4) for s in shape]
        size = [rng.integers(3, max(4, s // 3)) for s in shape]
        label[tuple(slice(a, a + b) for a, b in zip(corner, size))] = c
    image = (label.astype(np.float32) * 40.0 + rng.normal(0, 20, shape)).astype(np.float32)
    return image, label


def _save(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def make_dataset(spec: Spec, root: Path, bundles: list[Path]) -> Path:
    """The tiny dataset in the layout ``spec`` says, under ``root``; for the BraTS layout also the datalist the
    bundle's configs read (``configs/datalist.json`` of each working copy in ``bundles``)."""
    rng = np.random.default_rng(0)
    if spec.layout == "msd":
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(spec.cases + 1):
            image, label = _volume(rng, spec.shape, spec.classes)
            name = f"case_{i:03d}.nii.gz"
            if i < spec.cases:
                _save(image, spec.spacing, root / "imagesTr" / name)
                _save(label, spec.spacing, root / "labelsTr" / name)
            else:
                _save(image, spec.spacing, root / "imagesTs" / name)
        return root
    # BraTS: labels 1, 2, 4 (necrosis, oedema, enhancing tumour), four modalities per case
    items = []
    for i in range(spec.cases + 1):
        case = root / "training" / f"Brats_{i:03d}"
        case.mkdir(parents=True, exist_ok=True)
        image, label = _volume(rng, spec.shape, 4)
        label[label == 3] = 4
        modalities = [_save(image + rng.normal(0, 5, spec.shape).astype(np.float32), spec.spacing,
                            case / f"Brats_{i:03d}_{m}.nii.gz") for m in ("t1ce", "t1", "t2", "flair")]
        items.append({"image": modalities, "label": _save(label, spec.spacing, case / f"Brats_{i:03d}_seg.nii.gz")})
    datalist = {"training": items[:-2], "validation": items[-2:-1], "testing": [{"image": items[-1]["image"]}]}
    for bundle in bundles:
        (bundle / "configs" / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return root


def _cli(overrides: dict) -> list[str]:
    """``--id value`` arguments as on a shell command line (fire reads each value as a Python literal)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def bundle_run(bundle: Path, config: str, overrides: dict, log: Path) -> tuple[str, float]:
    """``python -m monai.bundle run`` of one config of the working copy ``bundle``; its output (also written to
    ``log``) and wall seconds. Raises RuntimeError with the output's tail if the run fails."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / config),
           "--bundle_root", str(bundle), "--logging_file", str(bundle / "configs" / "logging.conf"), *_cli(overrides)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    log.write_text(" ".join(cmd) + "\n\n" + out)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed ({proc.returncode}):\n{out[-3000:]}")
    return out, seconds


def _state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def _segmentations(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def check_bundle(source: Path, work: Path) -> dict:
    """Train and infer one bundle both ways (see the module docstring); returns what was compared."""
    name = json.loads((source / "configs" / "metadata.json").read_text()).get("name", source.name)
    key = source.name if source.name in SPECS else next((k for k in SPECS if k.lower() == str(name).lower()), None)
    if key is None:
        raise ValueError(f"{source}: no spec for bundle {name!r}; known: {', '.join(SPECS)}")
    spec = SPECS[key]
    work = work / key
    shutil.rmtree(work, ignore_errors=True)
    copies = {run: work / run for run in ("plain", "ckpt")}
    for copy in copies.values():
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("models", "eval"))
        (copy / "models").mkdir()
    data = make_dataset(spec, work / "data", list(copies.values()))
    ours = dict(OVERRIDES[spec.network])
    # the same seed for both runs (the bundle's own), and deterministic kernels: SwinUNETR's relative position bias
    # gradient (an index accumulation) otherwise sums in a different order from run to run, plain runs alike
    deterministic = {"initialize#0": "$monai.utils.set_determinism(seed=123, use_deterministic_algorithms=True)"}
    common_train = {"dataset_dir": str(data), **deterministic, **spec.train}
    common_infer = {"dataset_dir": str(data), **spec.infer}
    if importlib.util.find_spec("itk") is None:
        for reader in spec.readers:
            (common_infer if reader.startswith("preprocessing") else common_train)[reader] = "NibabelReader"
    train_net, infer_net = {}, {}
    if spec.network_def is not None:  # the zoo's network_def passes an argument this MONAI no longer takes
        train_net = {"network_def": dict(spec.network_def)}
        infer_net = {"network_def": dict(spec.network_def, use_checkpoint=False)}
        ours_train = {"network_def": dict(spec.network_def, _target_=ours["network_def#_target_"],
                                          checkpoint_policy=ours["network_def#checkpoint_policy"])}
        ours_infer = {"network_def": dict(ours_train["network_def"], use_checkpoint=False)}
    else:
        ours_train = ours_infer = ours
    result: dict = {"bundle": key, "network": spec.network, "override": ours_train, "train_overrides": common_train}
    losses, seconds = {}, {}
    for run, net in (("plain", train_net), ("ckpt", ours_train)):
        out, seconds[run] = bundle_run(copies[run], "train.json", {**common_train, **net}, work / f"train_{run}.log")
        losses[run] = [float(v) for v in LOSS.findall(out)]
    result["losses"] = losses
    result["train_seconds"] = seconds
    result["same_losses"] = bool(losses["plain"]) and losses["plain"] == losses["ckpt"]
    plain, ckpt = _state(copies["plain"] / "models" / "model.pt"), _state(copies["ckpt"] / "models" / "model.pt")
    result["same_keys"] = list(plain) == list(ckpt)
    result["max_weight_difference"] = max(float((plain[k].double() - ckpt[k].double()).abs().max()) for k in plain
                                          if plain[k].is_floating_point())
    result["bit_identical_weights"] = all(torch.equal(plain[k], ckpt[k]) for k in plain)
    # inference both ways: each copy infers with the weights the other trained
    shutil.copy(copies["ckpt"] / "models" / "model.pt", work / "ckpt_model.pt")
    shutil.copy(copies["plain"] / "models" / "model.pt", copies["ckpt"] / "models" / "model.pt")
    shutil.copy(work / "ckpt_model.pt", copies["plain"] / "models" / "model.pt")
    for run, net in (("plain", infer_net), ("ckpt", ours_infer)):
        shutil.rmtree(copies[run] / "eval", ignore_errors=True)
        bundle_run(copies[run], "inference.json", {**common_infer, **net}, work / f"inference_{run}.log")
    segs = {run: _segmentations(copies[run] / "eval") for run in copies}
    result["segmentations"] = len(segs["plain"])
    result["same_segmentations"] = bool(segs["plain"]) and segs["plain"].keys() == segs["ckpt"].keys() and all(
        np.array_equal(segs["plain"][k], segs["ckpt"][k]) for k in segs["plain"])
    result["ok"] = result["same_losses"] and result["same_keys"] and result["same_segmentations"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="local copies of model-zoo bundle folders")
    parser.add_argument("--work", type=Path, default=Path("zoo_runs"), help="where the copies, data and logs go")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    for bundle in args.bundles:
        if not (bundle / "configs" / "train.json").is_file():
            parser.error(f"{bundle}: not a bundle folder (no configs/train.json)")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    results = []
    for bundle in args.bundles:
        try:
            result = check_bundle(bundle.resolve(), args.work.resolve())
        except RuntimeError as error:
            result = {"bundle": bundle.name, "ok": False, "error": str(error)}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "train_overrides")}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
