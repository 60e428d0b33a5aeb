"""The brain-tissue bundle (CheckpointUNet, 4 classes, the embedded MNI152-derived data) end to end on tiny data:
the README's one-command quickstart (train, validate, infer, overlay PNG) as a subprocess, evaluation, metadata,
the network's input and output, TorchScript export as the plain MONAI UNet, training under torchrun with 2 CPU
processes, a kill -9 mid-epoch that the same command resumes, and the embedded dataset itself."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runs import (
    BRAIN,
    MNI152,
    QUIRKS,
    SCHEMA,
    TINY_UNET4,
    assert_export_parity,
    assert_segmentations,
    cfg,
    cli,
    env,
    overrides,
    run_in_process,
    torchrun_train,
)
from monai.bundle import verify_metadata, verify_net_in_out
from monai.networks.nets import UNet

from monai_ckpt import CheckpointUNet
from monai_ckpt.data import load_checked_datalist, make_brain_tissue_dataset, make_synthetic_dataset

NET_KWARGS = dict(spatial_dims=3, in_channels=1, out_channels=4, channels=(4, 8, 16, 32), strides=(2, 2, 2),
                  num_res_units=2, norm="instance")

# one pytest-xdist worker runs this whole file: its module fixtures (data, a trained bundle) are made once
pytestmark = pytest.mark.xdist_group("bundle_brain_tissue")


@pytest.fixture(scope="module")
def brain_data(tmp_path_factory) -> Path:
    # at the bundle's 2 mm: 16 x 16 x 17 (1 x 1 x 2.5 mm voxels) and 19 x 19 x 8 (1.2 mm); test case_004.nii, LPS
    return make_synthetic_dataset(tmp_path_factory.mktemp("brain_data"), num_training=4, num_test=1,
                                  shape=(32, 32, 14), num_classes=4, seed=1, spacing=[(1.0, 1.0, 2.5), 1.2],
                                  **QUIRKS)


@pytest.fixture(scope="module")
def brain_trained(tmp_path_factory, brain_data) -> tuple[Path, str]:
    """The README's one-command quickstart (train, infer, overlay PNG) with tiny sizes, as a subprocess."""
    root = tmp_path_factory.mktemp("brain_run")
    values = overrides(root, brain_data, max_epochs=2, val_interval=1, num_val=2, **TINY_UNET4)
    values["progress"] = True
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps(cfg(BRAIN, "train", "inference", "quickstart")), *cli(values)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return root, log


def test_brain_quickstart_trains_infers_and_plots(brain_trained, brain_data):
    root, log = brain_trained
    dice = [float(v) for v in re.findall(r"Metrics -- val_mean_dice: ([0-9.]+)", log)]
    assert len(dice) == 2 and all(0 <= d <= 1 for d in dice), log[-3000:]  # validated after each epoch
    assert re.search(r"best validation mean Dice 0\.\d{4}; segmentations", log)
    assert "Epoch [2/2]" in log  # the progress bar
    assert (root / "models" / "model.pt").stat().st_size > 0  # best key metric
    assert (root / "models" / "checkpoint_final.pt").stat().st_size > 0
    assert list((root / "eval").glob("events.out.tfevents*"))  # TensorBoard
    segs = assert_segmentations(brain_data, root / "eval", 4)
    for seg in segs:  # the log names the final file, never the temporary one
        assert f"written: {seg}" in log, log[-3000:]
    assert not re.search(r"writ\w+: \S*/\.[^/\s]*\.tmp", log)  # atomic_path's hidden ".<name>.<random>.tmp..."
    png = root / "eval" / "overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((root / "models").glob(".*tmp*")) and not list((root / "models").glob("tmp*"))


def test_brain_evaluate_verify_export_parity(brain_trained, brain_data):
    root, _ = brain_trained
    values = overrides(root, brain_data, num_val=2, **TINY_UNET4)
    run_in_process(BRAIN, ["train", "evaluate"], values)
    rows = list(csv.reader((root / "eval" / "metrics.csv").open()))
    assert rows[0][0] == "val_mean_dice" and 0 < float(rows[0][1]) <= 1
    raw = (root / "eval" / "val_mean_dice_raw.csv").read_text()
    assert "case_002.nii.gz" in raw and "case_003.nii.gz" in raw  # per-image Dice of the validation images

    verify_metadata(meta_file=str(BRAIN / "configs" / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=str(BRAIN / "configs" / "metadata.json"),
                      config_file=cfg(BRAIN, "inference"), device="cpu", **TINY_UNET4)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_export_parity(BRAIN, root, UNet(**NET_KWARGS), CheckpointUNet(**NET_KWARGS, checkpoint_policy="all"), x,
                         TINY_UNET4, atol=1e-6)


def test_multi_gpu_train_two_cpu_processes(tmp_path, brain_data):
    values = overrides(tmp_path, brain_data, max_epochs=1, val_interval=1, num_val=2, **TINY_UNET4)  # 1 per rank
    state = torchrun_train(BRAIN, values, tmp_path)
    UNet(3, 1, 4, (4, 8, 16, 32), (2, 2, 2), num_res_units=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# the embedded dataset


def test_embedded_dataset_is_what_the_generator_makes(tmp_path):
    data = BRAIN / "data" / "mni152_tissue"
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "CSF/other", "2": "grey matter", "3": "white matter"}
    assert meta["numTraining"] == len(meta["training"]) >= 4 and meta["numTest"] == len(meta["test"]) >= 1
    assert "Louis Collins" in (data / "NOTICE.md").read_text()
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) < 3_000_000
    load_checked_datalist(data, "training", 4)
    load_checked_datalist(data, "test")
    if not MNI152.is_dir():
        pytest.skip("the MNI152 source files are not available")
    out = make_brain_tissue_dataset(MNI152, tmp_path / "regen", subjects=[0])
    assert json.loads((out / "dataset.json").read_text()) == meta
    for sub in ("imagesTr", "labelsTr"):
        new, old = nib.load(out / sub / "brain_000.nii.gz"), nib.load(data / sub / "brain_000.nii.gz")
        np.testing.assert_allclose(new.affine, old.affine)
        a, b = np.asarray(new.dataobj).astype(int), np.asarray(old.dataobj).astype(int)
        assert a.shape == b.shape
        assert np.mean(a != b) < 1e-3 and np.abs(a - b).max() <= 1  # float rounding across CPUs at most
    labels = np.asarray(nib.load(data / "labelsTr" / "brain_000.nii.gz").dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------------------------
# crash-safe training: kill -9 mid-epoch, rerun the same command, it resumes


BUDGET = {"budget_gb": 0.0019}  # the tiny UNet needs 2.2 MiB at 2x16^3 without checkpointing: the plan must checkpoint
# test hook, in an extra config file given to both runs: a fresh run stops before iteration 7 until it is killed
PAUSE = {"test_pause_imports": "$import time", "run": [
    "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED(once=7), lambda e, "
    "resumer=@train#handlers#0 : resumer.resumed_from is None and (print('PAUSED', e.state.iteration, flush=True), "
    "time.sleep(600)))",
    "$@train#trainer.run()",
]}


def test_brain_train_killed_mid_epoch_resumes_on_rerun(tmp_path):
    """kill -9 while training (after the checkpoint of iteration 6, mid-epoch 2 of 4 iterations each), rerun the
    same command: it resumes from iteration 6, trains 7 and 8 only, and leaves only complete files. Also runs the
    budget policy (a plan is made for the patch shape) and gradient accumulation from the command line."""
    data = make_synthetic_dataset(tmp_path / "data", num_training=6, num_test=1, shape=(24, 24, 24), num_classes=4,
                                  seed=3)
    root = tmp_path / "run"
    pause = tmp_path / "pause.json"
    pause.write_text(json.dumps(PAUSE))
    values = overrides(root, data, max_epochs=2, val_interval=100, num_val=2, resume_interval=2,
                           gradient_accumulation_steps=2, **TINY_UNET4)  # 4 iterations per epoch, windows of 2
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(cfg(BRAIN, "train") + [str(pause)]),
           *cli(values), "--checkpoint_policy", str(BUDGET)]
    resume_dir = root / "models" / "resume"

    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env())
        try:
            lines = []
            for line in first.stdout:
                lines.append(line)
                if line.startswith("PAUSED"):
                    break
            err_log = (tmp_path / "first.err").read_text()[-3000:]
            assert lines and lines[-1].split() == ["PAUSED", "7"], "".join(lines)[-3000:] + err_log
            assert (resume_dir / "checkpoint_6.pt").is_file()
        finally:
            first.kill()  # SIGKILL
            first.wait(timeout=30)
    assert first.returncode == -9
    assert sorted(p.name for p in resume_dir.iterdir()) == ["checkpoint_4.pt", "checkpoint_6.pt"]
    first_log = "".join(lines)
    assert "resumed from" not in first_log
    assert f"checkpoint_policy {BUDGET!r} for input (2, 1, 16, 16, 16)" in first_log  # the planner ran

    second = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, check=False)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert re.search(r"resumed from \S*checkpoint_6\.pt: iteration 6, epoch 1 \(\+2 batches", log), log[-3000:]
    plan = re.search(rf"checkpoint_policy {re.escape(repr(BUDGET))} for input \(2, 1, 16, 16, 16\): (.*)", log)
    assert plan and "checkpoint_policy = 'none'" not in plan.group(1), log[-3000:]  # something is checkpointed
    assert re.search(r"Memory epoch 2: .*peak", log), log[-3000:]  # MemoryStatsHandler, epoch 2 only
    assert not re.search(r"Memory epoch 1:", log)

    assert sorted(p.name for p in resume_dir.iterdir()) == ["checkpoint_6.pt", "checkpoint_8.pt"]
    final = torch.load(resume_dir / "checkpoint_8.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 8 == 2 * final["trainer"]["epoch_length"]  # an uninterrupted run's
    assert final["lr_scheduler"]["last_epoch"] == 2  # one scheduler step per epoch, none repeated
    assert set(final) == {"network", "optimizer", "lr_scheduler", "trainer"}
    UNet(3, 1, 4, (4, 8, 16, 32), (2, 2, 2), num_res_units=2, norm="instance").load_state_dict(final["network"])
    assert (root / "models" / "checkpoint_final.pt").stat().st_size > 0
    for folder in (root / "models", resume_dir):  # no temporary or truncated file
        for p in folder.iterdir():
            assert not p.name.startswith(".") and "tmp" not in p.name, p
            if p.is_file():
                torch.load(p, weights_only=True)
