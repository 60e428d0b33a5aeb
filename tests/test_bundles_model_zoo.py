"""The MONAI model zoo's CI rules that run offline, checked on every bundle; checkpointing a zoo-style bundle with a
one-line override; a bad dataset or value ends a bundle run with one clear message.

The zoo's own CI (``ci/verify_bundle.py`` of Project-MONAI/model-zoo) is not copied here: these are our checks of
the same rules: required files (``models/model.pt`` or a ``large_files.yml`` naming it), metadata against the
schema shipped in ``bundles/`` (the constraints of ``meta_schema_20240725.json``), the declared TorchScript
exclusion (``bundles/zoo_ci.json``), JSON in the form of the zoo's ``pretty-format-json --indent=4 --no-sort-keys``
hook, the README sections and inference config ids of the zoo's bundles. The network's input and output
(``verify_net_in_out``) and the TorchScript export (``ckpt_export``) of every bundle run in its own test file
(test_bundle_*.py), on the weights each bundle trained there.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.bundle import run as bundle_run
from monai.networks.nets import UNet
from pre_commit_hooks.pretty_format_json import main as pretty_format_json
from bundle_runs import BUNDLES, SCHEMA, BRAIN

from monai_ckpt import CheckpointUNet

ZOO_CI = json.loads((BUNDLES / "zoo_ci.json").read_text())
NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
# the fields meta_schema_20240725.json requires (the zoo's current schema)
SCHEMA_20240725_REQUIRED = {"schema", "version", "monai_version", "pytorch_version", "numpy_version",
                            "required_packages_version", "task", "description", "authors", "copyright",
                            "network_data_format"}
# the README sections of the zoo's bundles (models/*/docs/README.md)
README_SECTIONS = ["Model Overview", "Data", "Preprocessing", "Training configuration", "Input", "Output",
                   "Performance", "MONAI Bundle Commands", "References", "License"]
ZOO_INFERENCE_IDS = ["image_key", "output_postfix", "output_ext", "separate_folder", "output_dtype", "dataset_dir",
                     "checkpointloader", "initialize", "network_def", "network", "inferer", "preprocessing",
                     "postprocessing", "evaluator"]
ZOO_BUNDLE_NAMES = {"spleen_ct_segmentation", "brats_mri_segmentation", "prostate_mri_anatomy",
                    "swin_unetr_btcv_segmentation", "wholeBody_ct_segmentation", "spleen_deepedit_annotation"}


@pytest.fixture(autouse=True)
def _restore_excepthook(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # in-process bundle runs may install theirs


def test_bundle_set_and_names():
    assert NAMES == ["brain_tissue_segmentation", "brain_tumor_mri_segmentation", "prostate_mri_segmentation",
                     "spleen_ct_ckpt_segmentation"]
    assert not set(NAMES) & ZOO_BUNDLE_NAMES  # a zoo test named after a bundle never runs against ours


@pytest.mark.parametrize("name", NAMES)
def test_zoo_required_files_and_metadata(name):
    bundle = BUNDLES / name
    for rel in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE"):
        assert (bundle / rel).is_file(), rel
    if not (bundle / "models" / "model.pt").is_file():  # trained weights are not committed: large_files.yml
        large = ConfigParser.load_config_file(str(bundle / "large_files.yml"))["large_files"]
        (entry,) = [e for e in large if e["path"] == "models/model.pt"]
        assert {"url", "hash_val", "hash_type"} <= set(entry)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    assert meta["name"] and meta["version"] in meta["changelog"]
    assert SCHEMA_20240725_REQUIRED <= set(meta)
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))


def test_metadata_schema_rejects_bad_metadata(tmp_path):
    meta = json.loads((BRAIN / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


def test_shipped_schema_holds_the_20240725_rules(tmp_path):
    schema = json.loads(SCHEMA.read_text())
    assert SCHEMA_20240725_REQUIRED <= set(schema["required"])
    meta = json.loads((BUNDLES / NAMES[0] / "configs" / "metadata.json").read_text())
    for field in ("required_packages_version", "name"):
        bad = {k: v for k, v in meta.items() if k != field}
        (tmp_path / "metadata.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=field):
            verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


def test_every_json_in_the_zoo_pretty_format():
    files = sorted(str(p) for p in BUNDLES.rglob("*.json"))
    assert len(files) >= 4 * 5
    # the zoo's pre-commit hook, without --autofix: non-zero if any file is not in its form
    assert pretty_format_json(["--indent=4", "--no-sort-keys", *files]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_readme_has_the_zoo_sections(name):
    text = (BUNDLES / name / "docs" / "README.md").read_text()
    headings = [h.strip() for h in re.findall(r"^#+\s*(.+?)\s*$", text, flags=re.M)]
    for section in README_SECTIONS:
        assert any(h == section or h.startswith(section + " ") or h.startswith(section + ":") for h in headings), \
            (name, section)
    performance = text.split("Performance", 1)[1]
    assert "MiB" in performance or "GiB" in performance  # the memory figures are under Performance


@pytest.mark.parametrize("name", NAMES)
def test_zoo_inference_ids(name):
    config = json.loads((BUNDLES / name / "configs" / "inference.json").read_text())
    for key in ZOO_INFERENCE_IDS:
        assert key in config, key
    assert "@checkpointloader(@evaluator)" in " ".join(config["initialize"])
    assert config["initialize"][0] == "$monai_ckpt.data.install_brief_errors()"


def test_torchscript_exclusion_is_declared_where_it_is_needed():
    """The zoo verifies a TorchScript export of every bundle not in its exclusion list; the bundle tests export
    each bundle's trained weights (test_bundle_*.py: ``torch.jit.script``, or ``use_trace``
    for DynUNet with deep supervision, whose scripting fails there). Here: the exclusion names exactly the bundles
    whose network has deep supervision, each with its reason."""
    excluded = ZOO_CI["exclude_verify_torchscript_list"]
    needs = set()
    for name in NAMES:
        net = json.loads((BUNDLES / name / "configs" / "inference.json").read_text())["network_def"]
        if net.get("deep_supervision"):
            needs.add(name)
    assert set(excluded) == needs == {"brain_tumor_mri_segmentation"}
    assert all("torch.jit.script" in reason and "use_trace" in reason for reason in excluded.values())
    readme = (BUNDLES / "brain_tumor_mri_segmentation" / "docs" / "README.md").read_text()
    assert "exclude_verify_torchscript_list" in readme


# ---------------------------------------------------------------------------------------------------------------
# checkpoint any model-zoo bundle: a one-line override turns its MONAI UNet into CheckpointUNet

ZOO_STYLE_TRAIN = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 2, "norm": "batch"},
    "network": "$@network_def.to(@device)",
    "data": "$[{'image': torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(i)), "
            "'label': (torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(10 + i)) > 0.5).float()} "
            "for i in range(2)]",
    "dataloader": {"_target_": "DataLoader", "dataset": "@data", "batch_size": 1, "shuffle": False},
    "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": 0.1},
    "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
    "trainer": {"_target_": "SupervisedTrainer", "max_epochs": 1, "device": "@device",
                "train_data_loader": "@dataloader", "network": "@network", "optimizer": "@optimizer",
                "loss_function": "@loss"},
    "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                         "load_dict": {"model": "@network"}},
    "initialize": ["$monai.utils.set_determinism(seed=0)", "$@checkpointloader(@trainer)"],
    "run": ["$@trainer.run()",
            "$torch.save(@network.state_dict(), @bundle_root + '/models/trained.pt')",
            "$print('NETWORK', type(@network).__name__, @network.checkpoint_policy if hasattr(@network, "
            "'checkpoint_policy') else None)"],
}
# the documented override (README "Checkpoint any model-zoo bundle"): on the command line
# --network_def#_target_ monai_ckpt.CheckpointUNet --network_def#checkpoint_policy all, which fire hands to
# monai.bundle.run as these keyword arguments
OVERRIDE = {"network_def#_target_": "monai_ckpt.CheckpointUNet", "network_def#checkpoint_policy": "all"}


def test_checkpoint_any_zoo_bundle_with_one_override(tmp_path, capsys):
    """A zoo-style bundle's plain weights load into CheckpointUNet as they are, and two training steps with
    checkpointing end in the plain bundle's weights (BatchNorm included)."""
    for run in ("plain", "ckpt"):
        (tmp_path / run / "models").mkdir(parents=True)
        (tmp_path / run / "configs").mkdir()
        (tmp_path / run / "configs" / "train.json").write_text(json.dumps(ZOO_STYLE_TRAIN, indent=4))
    pretrained = UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=2, norm="batch").state_dict()
    for run in ("plain", "ckpt"):
        torch.save(pretrained, tmp_path / run / "models" / "model.pt")
    for run, override in (("plain", {}), ("ckpt", OVERRIDE)):
        bundle_run(config_file=str(tmp_path / run / "configs" / "train.json"), bundle_root=str(tmp_path / run),
                   logging_file=False, **override)
        expected = "NETWORK CheckpointUNet all" if override else "NETWORK UNet None"
        assert expected in capsys.readouterr().out
    plain = torch.load(tmp_path / "plain" / "models" / "trained.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "ckpt" / "models" / "trained.pt", weights_only=True)
    assert list(plain) == list(ckpt)  # the same keys: the result loads back into the plain bundle
    assert any(not torch.equal(plain[k], pretrained[k]) for k in plain)  # it trained
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=2, norm="batch").load_state_dict(ckpt)
    CheckpointUNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=2, norm="batch").load_state_dict(plain)
