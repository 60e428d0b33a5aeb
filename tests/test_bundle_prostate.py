"""The prostate bundle (CheckpointVNet, T2 + ADC, resampled to 1 x 1 x 1.5 mm, 128 x 128 x 64 patches) end to end on
tiny data in MSD Task05 layout: its configs, train, evaluate, infer on the input's grid, metadata, the network's input
and output, TorchScript export as the plain MONAI VNet. VNet has no width argument (45.6 M parameters whatever the
patch), so its run is one training step of two 16^3 patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_runs import (
    PROSTATE,
    SCHEMA,
    TINY_MULTICHANNEL,
    assert_export_parity,
    assert_outputs_on_input_grid,
    cfg,
    inference_overrides,
    metrics_of,
    overrides,
    run_in_process,
)
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.networks.nets import VNet

from monai_ckpt import CheckpointVNet
from monai_ckpt.data import make_multichannel_dataset

MSD_PROSTATE_LABELS = {"0": "background", "1": "PZ", "2": "TZ"}

# one pytest-xdist worker runs this whole file: its module fixtures (data, a trained bundle) are made once
pytestmark = pytest.mark.xdist_group("bundle_prostate")


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
        parser.read_config(cfg(PROSTATE, name))
        assert all(s % 16 == 0 for s in parser["patch_size"]) and parser["patch_size"] == [128, 128, 64]
        assert parser["spacing"] == [1.0, 1.0, 1.5]
        nets[name] = parser.get_parsed_content("network_def")
        assert isinstance(nets[name], CheckpointVNet) and nets[name].checkpoint_policy == "all"
    assert {k: v.shape for k, v in nets["train"].state_dict().items()} == {
        k: v.shape for k, v in nets["inference"].state_dict().items()}
    parser = ConfigParser()
    parser.read_config(cfg(PROSTATE, "inference"))
    parser["stitch_device"] = "cpu"
    inferer = parser.get_parsed_content("inferer")
    assert inferer.mode == "gaussian" and str(inferer.device) == "cpu" and list(inferer.roi_size) == [128, 128, 64]


def test_prostate_train_evaluate_infer_export(tmp_path, prostate_data):
    root = tmp_path
    # one step of two 16^3 patches (BatchNorm needs more than one value per channel at VNet's 1^3 bottom)
    values = overrides(root, prostate_data, TINY_MULTICHANNEL, max_epochs=1, val_interval=1, num_val=1, batch_size=1,
                       num_samples=2)
    run_in_process(PROSTATE, ["train"], values)
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "checkpoint_final.pt").is_file()
    run_in_process(PROSTATE, ["train", "evaluate"], values)
    metrics = metrics_of(root)
    assert set(metrics) == {"val_mean_dice", "val_dice_pz", "val_dice_tz"}
    assert all(0 <= v <= 1 for v in metrics.values())
    run_in_process(PROSTATE, ["inference"], inference_overrides(values))
    (seg,) = assert_outputs_on_input_grid(prostate_data, root / "eval", channels=None)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}

    meta = str(PROSTATE / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=meta, config_file=cfg(PROSTATE, "inference"), device="cpu")
    x = torch.randn(1, 2, 16, 32, 16, generator=torch.Generator().manual_seed(0))
    ref = assert_export_parity(PROSTATE, root, VNet(3, 2, 3), CheckpointVNet(3, 2, 3, checkpoint_policy="all"), x, {})
    assert ref.shape == (1, 3, *x.shape[2:])
