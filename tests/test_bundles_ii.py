"""Bundles II end to end on tiny data: multi-modal brain tumour (CheckpointDynUNet, deep supervision, sigmoid
sub-regions) and prostate (CheckpointVNet, two MRI channels).

The data are tiny 4D NIfTI files in the layout of MSD Task01/Task05 (``make_multichannel_dataset``: modalities as
the last axis, anisotropic voxels, cases stored in RAS and non-RAS orientations). Sizes are overridden as a user
would (``--key value``): 16^3 patches, 4..16 DynUNet filters over 4 levels, one epoch. VNet has no width argument
(45.6 M parameters whatever the patch), so its run is one training step of two 16^3 patches. The brain tumour
bundle's multi-GPU config runs under ``torchrun`` with 2 CPU processes (gloo); the rest run in-process.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.networks.nets import DynUNet, VNet
from test_bundles import SCHEMA, _cfg, _run_in_process, _torchrun_train

from monai_ckpt import CheckpointDynUNet, CheckpointVNet
from monai_ckpt.data import load_checked_datalist, make_multichannel_dataset

REPO = Path(__file__).resolve().parents[1]
TUMOR = REPO / "bundles" / "brain_tumor_mri_segmentation"
PROSTATE = REPO / "bundles" / "prostate_mri_segmentation"

MSD_TUMOR_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
MSD_PROSTATE_LABELS = {"0": "background", "1": "PZ", "2": "TZ"}

# 4 levels: 16^3 patches reach 2^3 at the bottom; deep supervision with 2 extra heads
TINY_DYNUNET = {
    "network_def#filters": [4, 8, 8, 16],
    "network_def#kernel_size": [[3, 3, 3]] * 4,
    "network_def#strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "network_def#deep_supr_num": 2,
}
TINY_DYNUNET_KWARGS = {"spatial_dims": 3, "in_channels": 4, "out_channels": 3, "kernel_size": [[3, 3, 3]] * 4,
                       "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "upsample_kernel_size": [[2, 2, 2]] * 3,
                       "filters": [4, 8, 8, 16], "norm_name": "instance", "deep_supervision": True, "deep_supr_num": 2}
TINY = {"patch_size": [16, 16, 16], "num_workers": 0, "progress": False, "amp": False, "stitch_device": "cpu"}


def _overrides(root: Path, data: Path, **extra) -> dict:
    return {"bundle_root": str(root), "dataset_dir": str(data), "ckpt_dir": str(root / "models"),
            "output_dir": str(root / "eval"), **TINY, **extra}


def _inference_overrides(overrides: dict) -> dict:
    train_only = ("num_val", "max_epochs", "val_interval", "num_samples", "batch_size", "progress")
    return {k: v for k, v in overrides.items() if k not in train_only}


def _metrics(root: Path) -> dict[str, float]:
    return {row[0]: float(row[1]) for row in csv.reader((root / "eval" / "metrics.csv").open())}


def _ras(path: str | Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def _assert_outputs_on_input_grid(data: Path, out_dir: Path, channels: int | None) -> list[np.ndarray]:
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


def _assert_export_parity(bundle: Path, root: Path, plain: torch.nn.Module, trained: torch.nn.Module,
                          x: torch.Tensor, overrides: dict) -> None:
    """TorchScript export of models/model.pt; it and the plain MONAI network loaded with the saved weights give the
    output of the checkpointed network that was trained."""
    ts_path = root / "models" / "model.ts"
    ckpt_export("network_def", filepath=str(ts_path), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"), config_file=_cfg(bundle, "inference"),
                **overrides)
    scripted = torch.jit.load(str(ts_path))
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    plain.load_state_dict(state)  # strict: the checkpointed network saved exactly the plain network's keys
    trained.load_state_dict(state)
    plain.eval(), trained.eval()
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trained(x), ref, rtol=0, atol=0)
    assert ref.shape == (x.shape[0], 3, *x.shape[2:]) and ref.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# brain tumour: CheckpointDynUNet with deep supervision, 4 modalities, TC/WT/ET sigmoid channels


@pytest.fixture(scope="module")
def tumor_data(tmp_path_factory) -> Path:
    # 1 x 1 x 2 mm voxels (the bundle resamples to 1 mm), cases in LPS, RAS and PIR
    # int16 beside float32, .nii beside .nii.gz; 24 x 12 x 24 at 1 mm: smaller than the 16^3 test patch in y
    return make_multichannel_dataset(tmp_path_factory.mktemp("tumor_data"), num_training=3, num_test=1,
                                     shape=(24, 12, 12), modalities=("FLAIR", "T1w", "t1gd", "T2w"), num_classes=4,
                                     seed=3, spacing=(1.0, 1.0, 2.0), orientations=("LPS", "RAS", "PIR"),
                                     labels=MSD_TUMOR_LABELS, name="BRATS", dtypes=("int16", "float32"),
                                     extensions=(".nii.gz", ".nii"))


def test_tumor_labels_are_converted_to_msd_subregions(tumor_data):
    """MSD Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour -> TC = {2, 3}, WT = {1, 2, 3}, ET = {3},
    after reorientation to RAS; checked against nibabel on every training case (one is stored PIR)."""
    parser = ConfigParser()
    parser.read_config(_cfg(TUMOR, "train"))
    parser["spacing"] = [1.0, 1.0, 2.0]  # the data's own: no resampling, so labels compare voxel by voxel
    parser["patch_size"] = [8, 8, 8]
    from monai.transforms import Compose

    transform = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    items = load_checked_datalist(tumor_data, "training", 4)
    for item in items:
        out = transform(item)
        label = _ras(item["label"])
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
        expected = np.stack([np.isin(label, (2, 3)), np.isin(label, (1, 2, 3)), label == 3]).astype(np.float32)
        assert out["label"].dtype == torch.float32 and out["image"].shape == (4, *label.shape)
        np.testing.assert_array_equal(out["label"].numpy(), expected)
    # MONAI's BraTS transform alone reads label 1 as necrotic core: with MSD labels its TC would include edema
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    naive = ConvertToMultiChannelBasedOnBratsClasses(et_label=3)(label[None])
    assert not np.array_equal(naive[0], expected[0])


def test_tumor_loss_is_deep_supervision_over_the_stacked_heads():
    """The trainer's loss takes DynUNet's stacked training output (B, 1 + deep_supr_num, C, ...) and weighs the
    heads 1, 1/2, 1/4 (DeepSupervisionLoss "exp") over sigmoid Dice + BCE."""
    parser = ConfigParser()
    parser.read_config(_cfg(TUMOR, "train"))
    loss_fn = parser.get_parsed_content("loss_function")
    region = parser.get_parsed_content("region_loss")
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 3, 8, 8, 8, generator=g)
    label = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.5).float()
    expected = sum(w * region(pred[:, i], label) for i, w in enumerate([1.0, 0.5, 0.25, 0.125]))
    torch.testing.assert_close(loss_fn(pred, label), expected)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, CheckpointDynUNet) and net.deep_supervision and net.deep_supr_num == 3
    assert net.checkpoint_policy == "all" and net.filters == [32, 64, 128, 256, 320, 320]


@pytest.fixture(scope="module")
def tumor_trained(tmp_path_factory, tumor_data) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tumor_run")
    overrides = _overrides(root, tumor_data, max_epochs=1, val_interval=1, num_val=1, batch_size=2, **TINY_DYNUNET)
    _run_in_process(TUMOR, ["train"], overrides)
    return root, overrides


def test_tumor_train_evaluate_infer(tumor_trained, tumor_data):
    root, overrides = tumor_trained
    models = root / "models"
    assert (models / "model.pt").stat().st_size > 0 and (models / "checkpoint_final.pt").stat().st_size > 0
    assert list((models / "resume").glob("checkpoint_*.pt"))  # ResumableCheckpoint
    assert list((root / "eval").glob("events.out.tfevents*"))
    _run_in_process(TUMOR, ["train", "evaluate"], overrides)
    metrics = _metrics(root)
    assert set(metrics) == {"val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"}
    assert all(0 <= v <= 1 for v in metrics.values())
    # the mean over the three channels (one validation image)
    assert metrics["val_mean_dice"] == pytest.approx(
        np.mean([metrics["val_dice_tc"], metrics["val_dice_wt"], metrics["val_dice_et"]]), abs=1e-4)
    raw = (root / "eval" / "val_mean_dice_raw.csv").read_text()
    assert "case_002.nii.gz" in raw
    _run_in_process(TUMOR, ["inference"], _inference_overrides(overrides))
    (seg,) = _assert_outputs_on_input_grid(tumor_data, root / "eval", channels=3)
    assert seg.any()


def test_tumor_verify_export_parity(tumor_trained):
    root, _ = tumor_trained
    meta = str(TUMOR / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=meta, config_file=_cfg(TUMOR, "inference"), device="cpu",
                      **{"_meta_#network_data_format#inputs#image#spatial_shape": [32, 32, 32]}, **TINY_DYNUNET)
    x = torch.randn(1, 4, 24, 16, 32, generator=torch.Generator().manual_seed(0))
    # MONAI's DynUNet with deep_supervision=True does not compile with torch.jit.script (its forward writes into
    # the Optional list self.heads): the bundle exports it with torch.jit.trace of the eval forward (the main output)
    export = {**TINY_DYNUNET, "use_trace": True, "_meta_#network_data_format#inputs#image#spatial_shape": [16, 16, 16]}
    _assert_export_parity(TUMOR, root, DynUNet(**TINY_DYNUNET_KWARGS),
                          CheckpointDynUNet(**TINY_DYNUNET_KWARGS, checkpoint_policy="all"), x, export)
    with pytest.raises(RuntimeError, match="Arguments for call are not valid"):
        torch.jit.script(DynUNet(**TINY_DYNUNET_KWARGS).eval())


def test_tumor_multi_gpu_train_two_cpu_processes(tmp_path, tumor_data):
    # 3 cases: 1 trains per rank (DistributedSampler pads), 2 validate (1 per rank)
    overrides = _overrides(tmp_path, tumor_data, max_epochs=1, val_interval=1, num_val=2, batch_size=1,
                           **TINY_DYNUNET)
    DynUNet(**TINY_DYNUNET_KWARGS).load_state_dict(_torchrun_train(TUMOR, overrides, tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# prostate: CheckpointVNet, T2 + ADC, anisotropic voxels


@pytest.fixture(scope="module")
def prostate_data(tmp_path_factory) -> Path:
    # 0.8 x 0.8 x 2.5 mm voxels, like Task05's thick slices; the bundle resamples to 1 x 1 x 1.5 mm
    return make_multichannel_dataset(tmp_path_factory.mktemp("prostate_data"), num_training=2, num_test=1,
                                     shape=(24, 24, 8), modalities=("T2", "ADC"), num_classes=3, seed=5,
                                     spacing=(0.8, 0.8, 2.5), orientations=("LPS", "RAS"),
                                     labels=MSD_PROSTATE_LABELS, name="PROSTATE", dtypes=("float32", "int16"),
                                     extensions=(".nii", ".nii.gz", ".nii.gz"))


def test_prostate_configs():
    """VNet's spatial sizes must be multiples of 16: the patch is; train and inference build the same network."""
    nets = {}
    for name in ("train", "inference"):
        parser = ConfigParser()
        parser.read_config(_cfg(PROSTATE, name))
        assert all(s % 16 == 0 for s in parser["patch_size"]) and parser["patch_size"] == [128, 128, 64]
        assert parser["spacing"] == [1.0, 1.0, 1.5]
        nets[name] = parser.get_parsed_content("network_def")
        assert isinstance(nets[name], CheckpointVNet) and nets[name].checkpoint_policy == "all"
    assert {k: v.shape for k, v in nets["train"].state_dict().items()} == {
        k: v.shape for k, v in nets["inference"].state_dict().items()}
    parser = ConfigParser()
    parser.read_config(_cfg(PROSTATE, "inference"))
    parser["stitch_device"] = "cpu"
    inferer = parser.get_parsed_content("inferer")
    assert inferer.mode == "gaussian" and str(inferer.device) == "cpu" and list(inferer.roi_size) == [128, 128, 64]


def test_prostate_train_evaluate_infer_export(tmp_path, prostate_data):
    root = tmp_path
    # one step of two 16^3 patches (BatchNorm needs more than one value per channel at VNet's 1^3 bottom)
    overrides = _overrides(root, prostate_data, max_epochs=1, val_interval=1, num_val=1, batch_size=1, num_samples=2)
    _run_in_process(PROSTATE, ["train"], overrides)
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "checkpoint_final.pt").is_file()
    _run_in_process(PROSTATE, ["train", "evaluate"], overrides)
    metrics = _metrics(root)
    assert set(metrics) == {"val_mean_dice", "val_dice_pz", "val_dice_tz"}
    assert all(0 <= v <= 1 for v in metrics.values())
    _run_in_process(PROSTATE, ["inference"], _inference_overrides(overrides))
    (seg,) = _assert_outputs_on_input_grid(prostate_data, root / "eval", channels=None)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}

    meta = str(PROSTATE / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=meta, config_file=_cfg(PROSTATE, "inference"), device="cpu")
    x = torch.randn(1, 2, 16, 32, 16, generator=torch.Generator().manual_seed(0))
    _assert_export_parity(PROSTATE, root, VNet(3, 2, 3), CheckpointVNet(3, 2, 3, checkpoint_policy="all"), x, {})
