"""The bundles end to end on tiny data: train, evaluate, infer, verify, export, deploy as the plain MONAI UNet.

Sizes are overridden from the command line as a user would (``--key value``): 32^3 synthetic volumes in MSD
layout, 16^3 patches, 4..32 channels, one or two epochs. The brain bundle's one-command quickstart and the
multi-GPU config run as subprocesses (the README's command, ``torchrun`` with 2 CPU processes); the rest run
in-process through ``monai.bundle``'s Python API to save interpreter start-ups.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle import run as bundle_run
from monai.networks.nets import UNet

from monai_ckpt import CheckpointUNet
from monai_ckpt.handlers import AtomicCheckpointSaver
from monai_ckpt.data import (
    AtomicNibabelWriter,
    DataCheckError,
    check_datalist,
    load_checked_datalist,
    make_brain_tissue_dataset,
    make_synthetic_dataset,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
BRAIN = BUNDLES / "brain_tissue_segmentation"
SPLEEN = BUNDLES / "spleen_ct_ckpt_segmentation"
SCHEMA = BUNDLES / "meta_schema.json"
MNI152 = REPO.parent / "shared" / "data" / "mni152"

TINY_UNET4 = {"network_def#channels": [4, 8, 16, 32]}  # brain: 3 levels of stride 2
TINY_UNET5 = {"network_def#channels": [4, 8, 8, 16, 16]}  # spleen: 4 levels of stride 2
TINY = {"patch_size": [16, 16, 16], "num_samples": 2, "num_workers": 0, "progress": False, "amp": False}


def _cfg(bundle: Path, *names: str) -> list[str]:
    return [str(bundle / "configs" / f"{n}.json") for n in names]


def _overrides(root: Path, data: Path, **extra) -> dict:
    return {"bundle_root": str(root), "dataset_dir": str(data), "ckpt_dir": str(root / "models"),
            "output_dir": str(root / "eval"), **TINY, **extra}


def _cli(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]  # fire: "False" is a bool, "false" a str
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run_in_process(bundle: Path, configs: list[str], overrides: dict, **kwargs) -> None:
    bundle_run(config_file=_cfg(bundle, *configs), meta_file=str(bundle / "configs" / "metadata.json"),
               logging_file=False, **overrides, **kwargs)


def _assert_parity(bundle: Path, root: Path, net_kwargs: dict, overrides: dict) -> None:
    """Export the trained checkpoint to TorchScript; the TorchScript module and MONAI's *plain* UNet loaded with
    the saved weights give the output of the CheckpointUNet that was trained."""
    ts_path = root / "models" / "model.ts"
    ckpt_export("network_def", filepath=str(ts_path), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"), config_file=_cfg(bundle, "inference"),
                **{k: v for k, v in overrides.items() if k.startswith("network_def")})
    assert ts_path.stat().st_size > 0
    scripted = torch.jit.load(str(ts_path))
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    plain = UNet(**net_kwargs).eval()
    plain.load_state_dict(state)  # strict: the checkpointed network saved exactly the plain keys
    trained = CheckpointUNet(**net_kwargs, checkpoint_policy="all").eval()
    trained.load_state_dict(state)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trained(x), ref, rtol=0, atol=0)
    assert ref.abs().sum() > 0


def _assert_segmentations(data: Path, out_dir: Path, num_classes: int) -> list[Path]:
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


# The quirks of real data in every bundle's test data: anisotropic and differing spacings, LPS beside RAS, int16
# beside float32, .nii beside .nii.gz, and volumes smaller than the 16^3 test patch after resampling.
QUIRKS = {"orientations": ("LPS", "RAS", "RAS", "LPS", "LPS"), "dtypes": ("int16", "float32"),
          "extensions": (".nii.gz", ".nii", ".nii.gz")}


@pytest.fixture(scope="module")
def brain_data(tmp_path_factory) -> Path:
    # at the bundle's 2 mm: 16 x 16 x 17 (1 x 1 x 2.5 mm voxels) and 19 x 19 x 8 (1.2 mm); test case_004.nii, LPS
    return make_synthetic_dataset(tmp_path_factory.mktemp("brain_data"), num_training=4, num_test=1,
                                  shape=(32, 32, 14), num_classes=4, seed=1, spacing=[(1.0, 1.0, 2.5), 1.2],
                                  **QUIRKS)


@pytest.fixture(scope="module")
def spleen_data(tmp_path_factory) -> Path:
    # CT-like: background ~0 HU, spleen ~120 HU stored as int16 HU (int_scale 1), so the -57..164 window matters;
    # at the bundle's 1.5 mm: 21 x 21 x 20 (1 x 1 x 2.5 mm voxels) and 26 x 26 x 10 (1.25 mm)
    return make_synthetic_dataset(tmp_path_factory.mktemp("spleen_data"), num_training=3, num_test=1,
                                  shape=(32, 32, 12), num_classes=2, seed=2, intensities=[0.0, 120.0], noise=0.1,
                                  spacing=[(1.0, 1.0, 2.5), 1.25], int_scale=1.0, **QUIRKS)


@pytest.fixture(scope="module")
def brain_trained(tmp_path_factory, brain_data) -> tuple[Path, str]:
    """The README's one-command quickstart (train, infer, overlay PNG) with tiny sizes, as a subprocess."""
    root = tmp_path_factory.mktemp("brain_run")
    overrides = _overrides(root, brain_data, max_epochs=2, val_interval=1, num_val=2, **TINY_UNET4)
    overrides["progress"] = True
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps(_cfg(BRAIN, "train", "inference", "quickstart")), *_cli(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, check=False)
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
    segs = _assert_segmentations(brain_data, root / "eval", 4)
    for seg in segs:  # the log names the final file, never the temporary one
        assert f"written: {seg}" in log, log[-3000:]
    assert not re.search(r"writ\w+: \S*/\.[^/\s]*\.tmp", log)  # atomic_path's hidden ".<name>.<random>.tmp..."
    png = root / "eval" / "overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((root / "models").glob(".*tmp*")) and not list((root / "models").glob("tmp*"))


def test_brain_evaluate_verify_export_parity(brain_trained, brain_data):
    root, _ = brain_trained
    overrides = _overrides(root, brain_data, num_val=2, **TINY_UNET4)
    _run_in_process(BRAIN, ["train", "evaluate"], overrides)
    rows = list(csv.reader((root / "eval" / "metrics.csv").open()))
    assert rows[0][0] == "val_mean_dice" and 0 < float(rows[0][1]) <= 1
    raw = (root / "eval" / "val_mean_dice_raw.csv").read_text()
    assert "case_002.nii.gz" in raw and "case_003.nii.gz" in raw  # per-image Dice of the validation images

    verify_metadata(meta_file=str(BRAIN / "configs" / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=str(BRAIN / "configs" / "metadata.json"),
                      config_file=_cfg(BRAIN, "inference"), device="cpu", **TINY_UNET4)
    net_kwargs = dict(spatial_dims=3, in_channels=1, out_channels=4, channels=(4, 8, 16, 32), strides=(2, 2, 2),
                      num_res_units=2, norm="instance")
    _assert_parity(BRAIN, root, net_kwargs, TINY_UNET4)


def test_metadata_schema_rejects_bad_metadata(tmp_path):
    meta = json.loads((BRAIN / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


def test_spleen_train_evaluate_infer_export(tmp_path, spleen_data):
    root = tmp_path
    # two steps only: the bundle's 1e-4 leaves the tiny network predicting background everywhere
    overrides = _overrides(root, spleen_data, max_epochs=1, val_interval=1, num_val=1, batch_size=1,
                           stitch_device="cpu", learning_rate=0.01, **TINY_UNET5)
    _run_in_process(SPLEEN, ["train"], overrides)
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "checkpoint_final.pt").is_file()
    _run_in_process(SPLEEN, ["train", "evaluate"], overrides)
    rows = list(csv.reader((root / "eval" / "metrics.csv").open()))
    assert rows[0][0] == "val_mean_dice" and 0 < float(rows[0][1]) <= 1
    _run_in_process(SPLEEN, ["inference"], {k: v for k, v in overrides.items() if k not in ("num_val", "max_epochs",
                    "val_interval", "num_samples", "batch_size", "progress")})
    _assert_segmentations(spleen_data, root / "eval", 2)

    verify_metadata(meta_file=str(SPLEEN / "configs" / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file=str(SPLEEN / "configs" / "metadata.json"),
                      config_file=_cfg(SPLEEN, "inference"), device="cpu", **TINY_UNET5)
    net_kwargs = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 8, 16, 16),
                      strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    _assert_parity(SPLEEN, root, net_kwargs, TINY_UNET5)


def test_spleen_inferer_stitches_on_cpu():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_cfg(SPLEEN, "inference"))
    parser["stitch_device"] = "cpu"
    inferer = parser.get_parsed_content("inferer")
    assert inferer.mode == "gaussian" and str(inferer.device) == "cpu"
    assert list(inferer.roi_size) == [96, 96, 96]
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, CheckpointUNet) and net.checkpoint_policy == "all"


def test_multi_gpu_train_two_cpu_processes(tmp_path, brain_data):
    overrides = _overrides(tmp_path, brain_data, max_epochs=1, val_interval=1, num_val=2, **TINY_UNET4)  # 1 per rank
    state = _torchrun_train(BRAIN, overrides, tmp_path)
    UNet(3, 1, 4, (4, 8, 16, 32), (2, 2, 2), num_res_units=2).load_state_dict(state)


def _torchrun_train(bundle: Path, overrides: dict, tmp_path: Path) -> dict:
    """Train ``bundle`` with train.json + multi_gpu_train.json under torchrun, 2 CPU processes (gloo); check the
    validation Dice is logged and return the saved weights, which must be free of DDP's ``module.`` prefix."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "--config_file",
           json.dumps(_cfg(bundle, "train", "multi_gpu_train")), *_cli(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"val_mean_dice: [0-9.]+", log), log[-3000:]
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DistributedDataParallel
    return state


# ---------------------------------------------------------------------------------------------------------------
# bad data: a clear error naming the file, before anything is written


@pytest.fixture()
def small_data(tmp_path) -> Path:
    return make_synthetic_dataset(tmp_path / "data", num_training=2, num_test=1, shape=(16, 16, 16), num_classes=3)


def _items(data: Path) -> list[dict]:
    return load_checked_datalist(data, "training", 3)


def test_check_datalist_accepts_good_data(small_data):
    items = _items(small_data)
    assert len(items) == 2 and all(Path(i["label"]).is_file() for i in items)
    assert load_checked_datalist(small_data, "test")[0]["image"].endswith("case_002.nii.gz")


def test_check_missing_file(small_data):
    items = _items(small_data)
    os.remove(items[1]["label"])
    with pytest.raises(DataCheckError, match=re.escape(items[1]["label"]) + ".*not found"):
        check_datalist(items, 3)


def test_check_truncated_file(small_data):
    items = _items(small_data)
    path = Path(items[0]["image"])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataCheckError, match=re.escape(str(path)) + ".*truncated"):
        check_datalist(items, 3)


def test_check_not_a_nifti(small_data):
    items = _items(small_data)
    Path(items[0]["image"]).write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(DataCheckError, match=re.escape(items[0]["image"])):
        check_datalist(items, 3)


def _rewrite(path: str, array: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if array is None else array,
                             img.affine if affine is None else affine), path)


def test_check_shape_mismatch(small_data):
    items = _items(small_data)
    _rewrite(items[1]["label"], array=np.zeros((16, 16, 15), np.uint8))
    with pytest.raises(DataCheckError, match=re.escape(items[1]["label"]) + r".*shape \(16, 16, 15\)"):
        check_datalist(items, 3)


def test_check_affine_mismatch(small_data):
    items = _items(small_data)
    affine = nib.load(items[0]["label"]).affine.copy()
    affine[0, 3] += 3.0
    _rewrite(items[0]["label"], affine=affine)
    with pytest.raises(DataCheckError, match=re.escape(items[0]["label"]) + ".*affine"):
        check_datalist(items, 3)


def test_check_label_values(small_data):
    items = _items(small_data)
    label = np.asarray(nib.load(items[0]["label"]).dataobj).copy()
    label[0, 0, 0] = 7
    _rewrite(items[0]["label"], array=label)
    with pytest.raises(DataCheckError, match=re.escape(items[0]["label"]) + r".*\[7\].*0\.\.2"):
        check_datalist(items, 3)
    check_datalist(items, 8)  # fine with 8 classes


def test_check_empty_and_missing_datalist(small_data, tmp_path):
    meta = json.loads((small_data / "dataset.json").read_text())
    meta["training"] = []
    (small_data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataCheckError, match="dataset.json is empty"):
        load_checked_datalist(small_data, "training", 3)
    with pytest.raises(DataCheckError, match="dataset list not found"):
        load_checked_datalist(tmp_path / "nowhere", "training", 3)


def test_check_lists_every_bad_file(small_data):
    items = _items(small_data)
    os.remove(items[0]["image"])
    os.remove(items[1]["label"])
    with pytest.raises(DataCheckError, match="2 problem") as e:
        check_datalist(items, 3)
    assert items[0]["image"] in str(e.value) and items[1]["label"] in str(e.value)


def test_bundle_with_bad_label_fails_before_writing(small_data, tmp_path):
    items = _items(small_data)
    label = np.asarray(nib.load(items[1]["label"]).dataobj).copy()
    label[1, 1, 1] = 9
    _rewrite(items[1]["label"], array=label)
    root = tmp_path / "run"
    overrides = _overrides(root, small_data, max_epochs=1, num_val=1, **TINY_UNET4)
    with pytest.raises(RuntimeError) as e:  # MONAI's config parser wraps what an expression raises
        _run_in_process(BRAIN, ["train"], overrides)
    cause = e.value
    while cause is not None and not isinstance(cause, DataCheckError):
        cause = cause.__cause__
    assert cause is not None and items[1]["label"] in str(cause) and "[9]" in str(cause)
    assert not root.exists()  # no models/, no eval/, no TensorBoard file


# ---------------------------------------------------------------------------------------------------------------
# atomic writing


def test_checkpoint_saver_is_atomic(tmp_path, monkeypatch):
    from ignite.engine import Engine, Events

    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="m",
                                  key_metric_filename="model.pt")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    scores = iter([0.1, 0.2, 0.3])

    @engine.on(Events.EPOCH_STARTED)
    def _metric(e):
        e.state.metrics["m"] = next(scores)

    engine.run([0], max_epochs=1)
    first = torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.no_grad():
        net.weight.add_(1.0)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")  # after bytes were written: a non-atomic saver would leave them in model.pt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        engine.run([0], max_epochs=2)
    monkeypatch.undo()
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(kept["weight"], first["weight"])  # the previous best model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_nifti_writer_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "seg.nii.gz"

    def writer() -> AtomicNibabelWriter:
        w = AtomicNibabelWriter(output_dtype=np.uint8)
        w.set_data_array(torch.ones(1, 4, 4, 4), channel_dim=0)
        w.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
        return w

    def failing_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("interrupted")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="interrupted"):
        writer().write(target)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    writer().write(target)
    assert nib.load(target).shape == (4, 4, 4) and list(tmp_path.iterdir()) == [target]


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
    overrides = _overrides(root, data, max_epochs=2, val_interval=100, num_val=2, resume_interval=2,
                           gradient_accumulation_steps=2, **TINY_UNET4)  # 4 iterations per epoch, windows of 2
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(_cfg(BRAIN, "train") + [str(pause)]),
           *_cli(overrides), "--checkpoint_policy", str(BUDGET)]
    resume_dir = root / "models" / "resume"

    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
        try:
            lines = []
            for line in first.stdout:
                lines.append(line)
                if line.startswith("PAUSED"):
                    break
            assert lines and lines[-1].split() == ["PAUSED", "7"], "".join(lines)[-3000:] + (tmp_path / "first.err").read_text()[-3000:]
            assert (resume_dir / "checkpoint_6.pt").is_file()
        finally:
            first.kill()  # SIGKILL
            first.wait(timeout=30)
    assert first.returncode == -9
    assert sorted(p.name for p in resume_dir.iterdir()) == ["checkpoint_4.pt", "checkpoint_6.pt"]
    first_log = "".join(lines)
    assert "resumed from" not in first_log
    assert f"checkpoint_policy {BUDGET!r} for input (2, 1, 16, 16, 16)" in first_log  # the planner ran

    second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, check=False)
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
