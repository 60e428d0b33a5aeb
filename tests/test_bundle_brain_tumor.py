"""The multi-modal brain tumour bundle (CheckpointDynUNet with deep supervision, 4 MRI channels, TC/WT/ET sigmoid
sub-regions) end to end on tiny data in MSD Task01 layout (4D NIfTI, modalities as the last axis, anisotropic voxels,
cases in RAS and non-RAS orientations): label conversion, the deep-supervision loss, train, evaluate, infer on the
input's grid, TorchScript export (by tracing: DynUNet with deep supervision does not script), and training under
torchrun with 2 CPU processes. Sizes as a user overrides them: 16^3 patches, 4..16 filters over 4 levels, one
epoch."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runs import (
    SCHEMA,
    TINY_MULTICHANNEL,
    TUMOR,
    assert_export_parity,
    assert_outputs_on_input_grid,
    cfg,
    inference_overrides,
    metrics_of,
    overrides,
    run_in_process,
    torchrun_train,
)
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.networks.nets import DynUNet

from monai_ckpt import CheckpointDynUNet
from monai_ckpt.data import load_checked_datalist, make_multichannel_dataset

MSD_TUMOR_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
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

# one pytest-xdist worker runs this whole file: its module fixtures (data, a trained bundle) are made once
pytestmark = pytest.mark.xdist_group("bundle_brain_tumor")


def _ras(path: str | Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


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
    parser.read_config(cfg(TUMOR, "train"))
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
    parser.read_config(cfg(TUMOR, "train"))
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
    values = overrides(root, tumor_data, TINY_MULTICHANNEL, max_epochs=1, val_interval=1, num_val=1, batch_size=2,
                       **TINY_DYNUNET)
    run_in_process(TUMOR, ["train"], values)
    return root, values


def test_tumor_train_evaluate_infer(tumor_trained, tumor_data):
    root, values = tumor_trained
    models = root / "models"
    assert (models / "model.pt").stat().st_size > 0 and (models / "checkpoint_final.pt").stat().st_size > 0
    assert list((models / "resume").glob("checkpoint_*.pt"))  # ResumableCheckpoint
    assert list((root / "eval").glob("events.out.tfevents*"))
    run_in_process(TUMOR, ["train", "evaluate"], values)
    metrics = metrics_of(root)
    assert set(metrics) == {"val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"}
    assert all(0 <= v <= 1 for v in metrics.values())
    # the mean over the three channels (one validation image)
    assert metrics["val_mean_dice"] == pytest.approx(
        np.mean([metrics["val_dice_tc"], metrics["val_dice_wt"], metrics["val_dice_et"]]), abs=1e-4)
    raw = (root / "eval" / "val_mean_dice_raw.csv").read_text()
    assert "case_002.nii.gz" in raw
    run_in_process(TUMOR, ["inference"], inference_overrides(values))
    (seg,) = assert_outputs_on_input_grid(tumor_data, root / "eval", channels=3)
    assert seg.any()


def test_tumor_verify_export_parity(tumor_trained):
    root, _ = tumor_trained
    meta = str(TUMOR / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=meta, config_file=cfg(TUMOR, "inference"), device="cpu",
                      **{"_meta_#network_data_format#inputs#image#spatial_shape": [32, 32, 32]}, **TINY_DYNUNET)
    x = torch.randn(1, 4, 24, 16, 32, generator=torch.Generator().manual_seed(0))
    # MONAI's DynUNet with deep_supervision=True does not compile with torch.jit.script (its forward writes into
    # the Optional list self.heads): the bundle exports it with torch.jit.trace of the eval forward (the main output)
    export = {**TINY_DYNUNET, "use_trace": True, "_meta_#network_data_format#inputs#image#spatial_shape": [16, 16, 16]}
    ref = assert_export_parity(TUMOR, root, DynUNet(**TINY_DYNUNET_KWARGS),
                               CheckpointDynUNet(**TINY_DYNUNET_KWARGS, checkpoint_policy="all"), x, export)
    assert ref.shape == (1, 3, *x.shape[2:])
    with pytest.raises(RuntimeError, match="Arguments for call are not valid"):
        torch.jit.script(DynUNet(**TINY_DYNUNET_KWARGS).eval())


def test_tumor_multi_gpu_train_two_cpu_processes(tmp_path, tumor_data):
    # 3 cases: 1 trains per rank (DistributedSampler pads), 2 validate (1 per rank)
    values = overrides(tmp_path, tumor_data, TINY_MULTICHANNEL, max_epochs=1, val_interval=1, num_val=2, batch_size=1,
                           **TINY_DYNUNET)
    DynUNet(**TINY_DYNUNET_KWARGS).load_state_dict(torchrun_train(TUMOR, values, tmp_path))


