"""nnU-Net v2 end to end with nnUNetTrainerCkpt, on a tiny dataset generated in nnU-Net's raw layout (skipped without
``nnunetv2``: ``pip install monai-ckpt[nnunet]``; CI installs it).

nnU-Net's own code plans and preprocesses it (its process pools run as threads here: the same code without a
Python start per pool), then nnUNetTrainer and the shipped nnUNetTrainerCkpt, found by nnU-Net's trainer lookup
through ``nnUNet_extTrainer``, each train one epoch of two iterations from the same seeds (shortened on the trainer
instances: the class is the shipped one): identical losses and weights. nnUNetTrainerCkpt's checkpoint loads into
nnUNetTrainer. MONAI's nnUNetV2Runner's command for the trainer (run with ``-device cpu``, which the runner cannot
pass) runs nnU-Net's CLI, which finds the trainer, loads the checkpoint and predicts the validation case. Then the
planner: a predicted step peak equals the measured one, nnU-Net's own patches are among its candidates, and its
configuration is one nnU-Net reads and nnUNetTrainerCkpt builds.
"""

import json
import multiprocessing.pool
import os
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

# CI runs these where the optional extra is installed (.ci/run); one pytest-xdist worker makes the module fixtures once
pytestmark = [pytest.mark.nnunet, pytest.mark.xdist_group("nnunet_pipeline")]
pytest.importorskip("nnunetv2")
nib = pytest.importorskip("nibabel")

from test_nnunet_networks import _one_thread  # noqa: E402, F401 - a test-sized network: one thread, autouse

DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID}_Tiny"
CASES = 5  # nnU-Net's 5-fold split: fold 0 validates on one case


def _write_dataset(raw: str) -> None:
    """Five 32^3 volumes, one channel, two foreground classes (a bright ball and a dark box) and noise."""
    folder = os.path.join(raw, DATASET)
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"))
    for i in range(CASES):
        centre = rng.integers(10, 22, 3)
        label = np.zeros((32, 32, 32), np.uint8)
        label[((grid - centre[:, None, None, None]) ** 2).sum(0) < 36] = 1
        label[2:8, 20:28, 4:12] = 2
        image = (label == 1) * 2.0 - (label == 2) * 1.0 + rng.normal(0, 0.5, label.shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)),
                 os.path.join(folder, "imagesTr", f"case{i}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), os.path.join(folder, "labelsTr", f"case{i}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "ball": 1, "box": 2},
                   "numTraining": CASES, "file_ending": ".nii.gz"}, f)


class _ThreadContext:
    """A stand-in for ``multiprocessing.get_context("spawn")`` whose pools are thread pools."""

    Pool = multiprocessing.pool.ThreadPool


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """The dataset planned and preprocessed by nnU-Net (3d_fullres, nnUNetPlans), and the environment that finds
    nnUNetTrainerCkpt; yields the environment for subprocesses."""
    from monai_ckpt.nnunet.__main__ import trainers_path

    root = tmp_path_factory.mktemp("nnunet")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_extTrainer": trainers_path(), "nnUNet_n_proc_DA": "1",
           "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _write_dataset(env["nnUNet_raw"])
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.preprocessing.preprocessors import default_preprocessor

    threads = types.SimpleNamespace(get_context=lambda method=None: _ThreadContext)
    patched = [(module, module.multiprocessing) for module in (fingerprint_extractor, default_preprocessor)]
    try:
        for module, _ in patched:
            module.multiprocessing = threads
        extract_fingerprints([DATASET_ID], num_processes=1, show_progress_bar=False, verbose=False)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)
    finally:
        for module, original in patched:
            module.multiprocessing = original
    # a quarter of the features nnU-Net plans (32 to 256): the same topology, a test-sized network
    path = os.path.join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json")
    plans = json.loads(open(path).read())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f // 4 for f in arch["features_per_stage"]]
    with open(path, "w") as f:
        json.dump(plans, f, indent=4)
    yield dict(os.environ, **env)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train(name: str) -> tuple:
    """nnU-Net's trainer ``name`` (found by nnU-Net's lookup), one epoch of 2 iterations and 1 validation batch on the
    CPU from seed 0; its per-iteration losses and the trainer."""
    from nnunetv2.run.run_training import get_trainer_from_args

    _seed()
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, name, device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    losses = []
    step = trainer.train_step
    trainer.train_step = lambda batch: losses.append(step(batch)["loss"].item()) or {"loss": np.array(losses[-1])}
    os.environ["nnUNet_n_proc_DA"] = "0"  # data augmentation in this process: the same random numbers for both
    try:
        trainer.run_training()
    finally:
        os.environ["nnUNet_n_proc_DA"] = "1"
    return losses, trainer


@pytest.fixture(scope="module")
def trained(nnunet):
    return {name: _train(name) for name in ("nnUNetTrainer", "nnUNetTrainerCkpt")}


def test_nnunet_trainer_ckpt_trains_exactly_as_nnunet_trainer(trained):
    """Same seed, same data, same augmentation: the same losses, bit for bit, and the same weights; the network is
    ours and checkpointed."""
    from monai_ckpt.nnunet import CheckpointPlainConvUNet

    (plain_losses, plain), (ckpt_losses, ckpt) = trained["nnUNetTrainer"], trained["nnUNetTrainerCkpt"]
    assert type(ckpt).__module__ == "monai_ckpt.nnunet.trainer"
    assert isinstance(ckpt.network, CheckpointPlainConvUNet) and ckpt.network.checkpoint_groups()
    assert len(plain_losses) == 2 and ckpt_losses == plain_losses
    theirs, ours = plain.network.state_dict(), ckpt.network.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_checkpoint_file_loads_into_nnunet_trainer(trained):
    """checkpoint_final.pth of nnUNetTrainerCkpt is an nnU-Net checkpoint: nnUNetTrainer loads it as its own."""
    (_, plain), (_, ckpt) = trained["nnUNetTrainer"], trained["nnUNetTrainerCkpt"]
    path = os.path.join(ckpt.output_folder, "checkpoint_final.pth")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["trainer_name"] == "nnUNetTrainerCkpt"
    for p in plain.network.parameters():
        p.data.zero_()
    plain.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(plain.network.state_dict().values(),
                                                  ckpt.network.state_dict().values()))


def test_nnunet_cli_and_monai_runner_find_the_trainer(trained, nnunet, tmp_path, monkeypatch):
    """nnU-Net's CLI finds the trainer through nnUNet_extTrainer: ``nnUNetv2_predict -tr nnUNetTrainerCkpt`` (one
    process: -npp 0 -nps 0) loads its checkpoint and segments a case. MONAI's nnUNetV2Runner with
    ``trainer_class_name="nnUNetTrainerCkpt"`` runs ``nnUNetv2_train ... -tr nnUNetTrainerCkpt`` with the environment
    it was given (nnUNet_extTrainer included): the lookup that command makes is the one the trainings above made."""
    from monai.apps.nnunet import nnUNetV2Runner

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, nnunet.get(key, "1"))  # the runner sets these in os.environ: restored after
    runner = nnUNetV2Runner({"dataset_name_or_id": DATASET_ID, "nnunet_raw": nnunet["nnUNet_raw"],
                             "nnunet_preprocessed": nnunet["nnUNet_preprocessed"],
                             "nnunet_results": nnunet["nnUNet_results"]},
                            trainer_class_name="nnUNetTrainerCkpt", work_dir=str(tmp_path))
    cmd, env = runner.train_single_model_command("3d_fullres", 0, 0, {})
    assert cmd[:6] == ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerCkpt"]
    assert env["nnUNet_extTrainer"] == nnunet["nnUNet_extTrainer"]

    images = tmp_path / "images"
    images.mkdir()
    case = os.path.join(nnunet["nnUNet_raw"], DATASET, "imagesTr", "case0_0000.nii.gz")
    os.symlink(case, images / "case0_0000.nii.gz")
    predict = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_predict")
    proc = subprocess.run([predict, "-i", str(images), "-o", str(tmp_path / "out"), "-d", str(DATASET_ID), "-c",
                           "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerCkpt", "-device", "cpu", "-npp", "0", "-nps",
                           "0", "--disable_tta", "--disable_progress_bar"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Using trainer 'nnUNetTrainerCkpt'" in proc.stdout
    segmentation = np.asarray(nib.load(tmp_path / "out" / "case0.nii.gz").dataobj)
    assert segmentation.shape == (32, 32, 32) and set(np.unique(segmentation)) <= {0, 1, 2}


def test_predicted_step_peak_equals_the_measured_one(nnunet):
    """The planner's prediction (fake tensors) against a real step on the CPU with the same network, loss, targets,
    autocast and optimizer, at the tiny dataset's plan: the same bytes."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from monai_ckpt.nnunet.plans import predicted_step_peak
    from monai_ckpt.nnunet.trainer import nnUNetTrainerCkpt

    plans = json.loads(open(os.path.join(nnunet["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json")).read())
    configuration = PlansManager(plans).get_configuration("3d_fullres").configuration
    arch, patch = configuration["architecture"], [16, 16, 16]  # the plan's network, a smaller (faster) patch
    network = nnUNetTrainerCkpt.build_network_architecture(None, PlansManager(plans).get_configuration("3d_fullres"), 1,
                                                          3, True)
    norms = sum(m.num_features for m in network.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    for policy in ("none", "all"):
        predicted, measured = (predicted_step_peak(arch, patch, 2, 1, 3, policy, estimate=e, amp=False)
                               for e in (True, False))
        assert predicted == measured, policy
    # under bf16 autocast torch's fake batch norm gives its saved mean and inverse std (B x C each) in bf16, where the
    # CPU kernel keeps them in float32: 4 bytes more per batch element and channel of every instance norm, at most
    predicted, measured = (predicted_step_peak(arch, patch, 2, 1, 3, "none", estimate=e) for e in (True, False))
    assert 0 <= measured - predicted <= 4 * 2 * norms, (predicted, measured)


def test_candidate_patches_are_nnunets_own(nnunet, tmp_path):
    """nnU-Net's default and ResEnc-L planners, for an abdominal CT fingerprint at their own and larger GPU targets:
    every patch they choose is one of our candidates, with their topology."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from monai_ckpt.nnunet.plans import candidate_patches

    from torch._subclasses.fake_tensor import FakeTensorMode

    planner = ExperimentPlanner(DATASET_ID, 8)
    estimate = planner.static_estimate_VRAM_usage

    def without_weights(*args):  # nnU-Net's estimate reads shapes only: the same numbers, no 30M weights to fill
        with FakeTensorMode():
            return estimate(*args)

    planner.static_estimate_VRAM_usage = without_weights
    spacing, median = [1.0, 0.83, 0.83], [360, 512, 512]
    candidates = {tuple(p): (s, k) for p, s, k in candidate_patches(spacing, median)}
    cache: dict = {}
    for target in (48, 24, 8):
        planner.UNet_vram_target_GB = target
        chosen = planner.get_plans_for_configuration(spacing, median, "x", float(np.prod(median)) * 100, cache)
        arch = chosen["architecture"]["arch_kwargs"]
        assert tuple(chosen["patch_size"]) in candidates, target
        strides, kernels = candidates[tuple(chosen["patch_size"])]
        assert [list(s) for s in strides] == [list(s) for s in arch["strides"]]
        assert [list(k) for k in kernels] == [list(k) for k in arch["kernel_sizes"]]


def test_plan_command_writes_a_configuration_nnunet_reads(nnunet, trained, capsys):
    """``python -m monai_ckpt.nnunet plan --keep-patch`` with a GPU too small for the tiny plan without checkpointing:
    it adds a configuration inheriting 3d_fullres with the planner's policy, faster than "all" (recomputing less) and
    within the budget in a real step; nnU-Net reads it, nnUNetTrainerCkpt builds it with that policy, a second run
    (with ``--policies``) replaces only its own configuration, and a GPU too small for the patch is a clear error."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from monai_ckpt.nnunet.__main__ import main
    from monai_ckpt.nnunet.plans import predicted_step_peak
    from monai_ckpt.nnunet.trainer import nnUNetTrainerCkpt

    path = os.path.join(nnunet["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json")
    plans = PlansManager(json.loads(open(path).read()))
    source = plans.get_configuration("3d_fullres").configuration
    arch, patch = source["architecture"], source["patch_size"]
    peaks = {p: predicted_step_peak(arch, patch, 2, 1, 3, p) for p in ("none", "cheap", "all")}
    assert peaks["all"] < peaks["cheap"] < peaks["none"]
    gpu_gb = (peaks["cheap"] + 0.5 * (peaks["none"] - peaks["cheap"])) / 2**30 / 0.9  # "cheap" fits, "none" not
    assert main(["plan", "-d", str(DATASET_ID), "--gpu-memory-gb", f"{gpu_gb:.4f}", "--headroom-gb",
                 f"{gpu_gb * 0.1:.4f}", "--name", "3d_fullres_small", "--keep-patch"]) == 0
    assert "added '3d_fullres_small'" in capsys.readouterr().out
    configuration = PlansManager(json.loads(open(path).read())).get_configuration("3d_fullres_small")
    assert configuration.patch_size == source["patch_size"]
    assert configuration.data_identifier == source["data_identifier"]
    policy, note = configuration.configuration["checkpoint_policy"], configuration.configuration["monai_ckpt"]
    assert policy not in ("none", "all") and note["predicted_time_ratio"] >= 1
    network = nnUNetTrainerCkpt.build_network_architecture(plans, configuration, 1, 3, True)
    assert network.checkpoint_policy == policy
    norms = sum(m.num_features for m in network.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    predicted, measured = (predicted_step_peak(arch, patch, 2, 1, 3, policy, estimate=e) for e in (True, False))
    assert note["predicted_peak_gib"] == round(predicted / 2**30, 3) and predicted <= gpu_gb * 0.9 * 2**30
    assert 0 <= measured - predicted <= 4 * 2 * norms  # a real bf16 step: see the test above
    assert main(["plan", "-d", str(DATASET_ID), "--gpu-memory-gb", "8", "--name", "3d_fullres_small",
                 "--policies", '["all"]']) == 0
    rewritten = PlansManager(json.loads(open(path).read())).get_configuration("3d_fullres_small").configuration
    assert rewritten["checkpoint_policy"] == "all" and rewritten["monai_ckpt"]["predicted_time_ratio"] is None
    assert main(["plan", "-d", str(DATASET_ID), "--gpu-memory-gb", "8", "--name", "3d_fullres"]) == 2
    assert "monai_ckpt did not write" in capsys.readouterr().err
    assert main(["plan", "-d", str(DATASET_ID), "--gpu-memory-gb", "0.01", "--headroom-gb", "0.001",
                 "--keep-patch", "--dry-run"]) == 2
    assert f"the configuration's patch {source['patch_size']} (batch 2) does not fit" in capsys.readouterr().err
