"""The spleen CT bundle (CheckpointUNet, BatchNorm, 96^3 patches, gaussian sliding window) end to end on tiny
CT-like data: train, evaluate, infer on the input's grid, metadata, the network's input and output, TorchScript
export as the plain MONAI UNet; its inferer stitches on the CPU when asked."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from bundle_runs import (
    QUIRKS,
    SCHEMA,
    SPLEEN,
    TINY_UNET5,
    assert_export_parity,
    assert_segmentations,
    cfg,
    inference_overrides,
    overrides,
    run_in_process,
)
from monai.bundle import verify_metadata, verify_net_in_out
from monai.networks.nets import UNet

from monai_ckpt import CheckpointUNet
from monai_ckpt.data import make_synthetic_dataset

NET_KWARGS = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 8, 16, 16), strides=(2, 2, 2, 2),
                  num_res_units=2, norm="batch")

# one pytest-xdist worker runs this whole file: its module fixtures (data, a trained bundle) are made once
pytestmark = pytest.mark.xdist_group("bundle_spleen")


@pytest.fixture(scope="module")
def spleen_data(tmp_path_factory) -> Path:
    # CT-like: background ~0 HU, spleen ~120 HU stored as int16 HU (int_scale 1), so the -57..164 window matters;
    # at the bundle's 1.5 mm: 21 x 21 x 20 (1 x 1 x 2.5 mm voxels) and 26 x 26 x 10 (1.25 mm)
    return make_synthetic_dataset(tmp_path_factory.mktemp("spleen_data"), num_training=3, num_test=1,
                                  shape=(32, 32, 12), num_classes=2, seed=2, intensities=[0.0, 120.0], noise=0.1,
                                  spacing=[(1.0, 1.0, 2.5), 1.25], int_scale=1.0, **QUIRKS)


def test_spleen_train_evaluate_infer_export(tmp_path, spleen_data):
    root = tmp_path
    # two steps only: the bundle's 1e-4 leaves the tiny network predicting background everywhere
    values = overrides(root, spleen_data, max_epochs=1, val_interval=1, num_val=1, batch_size=1,
                           stitch_device="cpu", learning_rate=0.01, **TINY_UNET5)
    run_in_process(SPLEEN, ["train"], values)
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "checkpoint_final.pt").is_file()
    run_in_process(SPLEEN, ["train", "evaluate"], values)
    rows = list(csv.reader((root / "eval" / "metrics.csv").open()))
    assert rows[0][0] == "val_mean_dice" and 0 < float(rows[0][1]) <= 1
    run_in_process(SPLEEN, ["inference"], inference_overrides(values))
    assert_segmentations(spleen_data, root / "eval", 2)

    verify_metadata(meta_file=str(SPLEEN / "configs" / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=str(SPLEEN / "configs" / "metadata.json"),
                      config_file=cfg(SPLEEN, "inference"), device="cpu", **TINY_UNET5)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_export_parity(SPLEEN, root, UNet(**NET_KWARGS), CheckpointUNet(**NET_KWARGS, checkpoint_policy="all"), x,
                         TINY_UNET5, atol=1e-6)


def test_spleen_inferer_stitches_on_cpu():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(cfg(SPLEEN, "inference"))
    parser["stitch_device"] = "cpu"
    inferer = parser.get_parsed_content("inferer")
    assert inferer.mode == "gaussian" and str(inferer.device) == "cpu"
    assert list(inferer.roi_size) == [96, 96, 96]
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, CheckpointUNet) and net.checkpoint_policy == "all"


