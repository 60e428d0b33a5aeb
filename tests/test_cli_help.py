"""The command lines' ``--help``: every default shown, and no torch or MONAI import for it (which took ~10 s: importing
the package imported both); the package's public names all still import."""

import subprocess
import sys

import pytest

HELP = """
import sys
for module in ("monai_ckpt.benchmark", "monai_ckpt.plan", "monai_ckpt.data.cli"):
    try:
        __import__(module, fromlist=["main"]).main(["--help"])
    except SystemExit as e:
        assert e.code == 0, (module, e.code)
heavy = sorted(m for m in ("torch", "monai", "numpy", "nibabel", "matplotlib") if m in sys.modules)
assert not heavy, f"--help imported {heavy}"
"""


def test_help_imports_neither_torch_nor_monai():
    done = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "--steps STEPS" in out and "at least 3 (default: 5)" in out and "(default: 96 96 96)" in out
    assert "(default: none all cheap sqrt encoder decoder)" in out
    assert "budgets of --table, GiB (default: 8 10 12 16 24 32 40 48 80)" in out
    assert "unet, vnet, dynunet, segresnet, swinunetr, attentionunet, basicunet, basicunetplusplus, segresnetds" in out


@pytest.mark.parametrize("command", ["synthetic", "brain-tissue", "check"])
def test_data_subcommands_show_their_defaults(command, capsys):
    from monai_ckpt.data.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    expected = {"synthetic": ["spatial size (default: 32 32 32)", "classes, background included (default: 4)"],
                "brain-tissue": ["voxel size, mm (default: 2.0)", "labelled subjects (default: 6)"],
                "check": ["(training, test...) (default: training)", "(default: the labels dataset.json declares)"]}
    assert all(e in out for e in expected[command]), out


def test_the_plan_help_budgets_are_the_planners():
    import importlib

    from monai_ckpt.planner import DEFAULT_BUDGETS_GB

    cli = importlib.import_module("monai_ckpt.plan")

    assert cli._TABLE_BUDGETS_GB == DEFAULT_BUDGETS_GB


def test_every_public_name_still_imports():
    import monai_ckpt
    import monai_ckpt.data
    import monai_ckpt.networks

    for module in (monai_ckpt, monai_ckpt.networks, monai_ckpt.data):
        assert all(getattr(module, name) is not None for name in module.__all__)
        assert set(module.__all__) <= set(dir(module))
    assert callable(monai_ckpt.plan)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        monai_ckpt.nope  # noqa: B018


def test_a_name_defined_by_its_namesake_submodule_survives_that_submodule_s_import():
    # `checkpoint` is a function of monai_ckpt/checkpoint.py: importing the networks (which import that module before
    # anyone asked for the name) must not leave the package's `checkpoint` bound to the module
    code = ("import monai_ckpt.networks, monai_ckpt\nfrom monai_ckpt import checkpoint\n"
            "import monai_ckpt.checkpoint as m\nprint(type(checkpoint).__name__, m is checkpoint)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["function", "True"]
