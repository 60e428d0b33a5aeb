"""The override that checkpoints a model-zoo bundle, as docs/guide/model_zoo.md writes it, parsed by
``python -m monai.bundle run``'s own command line (``fire``, in this process) for every registered network.

A zoo-style config names the MONAI parent in ``network_def``; ``--network_def#_target_ monai_ckpt.Checkpoint<Name>
--network_def#checkpoint_policy all`` must give our class with that policy and the parent's state_dict keys. The
guide's other commands run as written: a dict policy (``"{'budget_gb': 8}"``: fire reads the quoted value as a Python
literal, a dict), and ``network_def`` replaced whole where the zoo config passes an argument the installed MONAI no
longer takes (the Swin bundle's ``img_size``). The zoo's real bundles, trained both ways: docs/scripts/zoo_bundles.py.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import fire
import pytest
from monai.bundle import run as bundle_run

from networks_registry import REGISTRY

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "model_zoo.md"
COMMANDS = [shlex.split(block) for block in re.findall(r"^```bash\n(python -m monai\.bundle run .*?)\n```",
                                                        GUIDE.read_text(), re.S | re.M)]
GENERIC = next(c for c in COMMANDS if "--network_def#_target_" in c and c[c.index("--network_def#checkpoint_policy")
                                                                              + 1] == "all")
SEEN = "$print('NETWORK', type(@network_def).__name__, repr(@network_def.checkpoint_policy), " \
       "list(@network_def.state_dict()) == list(@parent_def.state_dict()))"


def _zoo_style_bundle(root: Path, parent: type, kwargs: dict) -> None:
    """``root/configs/train.json`` as the zoo writes it: ``network_def`` the MONAI class by name (and the same once
    more as ``parent_def``, to compare the state_dict keys with)."""
    network_def = {"_target_": parent.__name__, **json.loads(json.dumps(kwargs))}
    config = {"imports": ["$import torch"], "network_def": network_def, "parent_def": dict(network_def),
              "initialize": [], "run": [SEEN]}
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "train.json").write_text(json.dumps(config, indent=4))


def _run_as_the_cli(argv: list[str], root: Path, monkeypatch) -> None:  # noqa: ANN001
    """``argv`` (``python -m monai.bundle run ...``) run in ``root`` through fire, as monai/bundle/__main__.py does."""
    assert argv[:4] == ["python", "-m", "monai.bundle", "run"], argv
    monkeypatch.chdir(root)
    fire.Fire({"run": bundle_run}, command=argv[3:])


@pytest.mark.parametrize("name", REGISTRY)
def test_the_guides_override_gives_our_class_with_its_policy(name, tmp_path, monkeypatch, capsys):
    network = REGISTRY[name]
    _zoo_style_bundle(tmp_path, network.parent, network.small)
    argv = [a.replace("CheckpointUNet", network.child.__name__) for a in GENERIC]
    _run_as_the_cli(argv, tmp_path, monkeypatch)
    assert f"NETWORK {network.child.__name__} 'all' True" in capsys.readouterr().out


def test_a_dict_policy_on_the_command_line(tmp_path, monkeypatch, capsys):
    """The guide's quoted dict reaches the network as a dict (fire reads it as a Python literal)."""
    argv = next(c for c in COMMANDS if "budget_gb" in " ".join(c))
    target = argv[argv.index("--network_def#_target_") + 1]
    network = next(n for n in REGISTRY.values() if f"monai_ckpt.{n.child.__name__}" == target)
    _zoo_style_bundle(tmp_path, network.parent, network.small)
    _run_as_the_cli(argv, tmp_path, monkeypatch)
    assert f"NETWORK {network.child.__name__} {{'budget_gb': 8}} True" in capsys.readouterr().out


def test_network_def_replaced_whole_where_the_zoo_passes_an_argument_monai_no_longer_takes(tmp_path, monkeypatch,
                                                                                          capsys):
    """The Swin bundle's ``img_size``: MONAI >= 1.5's SwinUNETR refuses it, with our override or without; the guide's
    command replaces ``network_def`` whole (``parent_def`` here: the zoo's arguments less ``img_size``, feature size 12,
    which leaves the state_dict keys as they are)."""
    zoo = {"spatial_dims": 3, "img_size": 96, "in_channels": 1, "out_channels": 14, "feature_size": 48,
           "use_checkpoint": True}
    _zoo_style_bundle(tmp_path, REGISTRY["swinunetr"].parent, zoo)
    config = json.loads((tmp_path / "configs" / "train.json").read_text())
    del config["parent_def"]["img_size"]
    config["parent_def"]["feature_size"] = 12
    (tmp_path / "configs" / "train.json").write_text(json.dumps(config))
    generic = [a.replace("CheckpointUNet", "CheckpointSwinUNETR") for a in GENERIC]
    with pytest.raises(Exception, match="img_size"):
        _run_as_the_cli(generic, tmp_path, monkeypatch)
    argv = next(c for c in COMMANDS if "--network_def" in c)
    _run_as_the_cli(argv, tmp_path, monkeypatch)
    assert "NETWORK CheckpointSwinUNETR 'all' True" in capsys.readouterr().out
