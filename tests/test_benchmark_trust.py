"""Benchmark figures a user can trust: the memory breakdown at the peak and a note when activations are too small a
share to matter, the time ratios' spread and noise band, at least 3 timed steps, and arguments (output paths, JSON
policies) checked before any work."""

import pytest

from monai_ckpt.benchmark import BenchmarkRow, format_table, main, run_benchmark
from monai_ckpt.networks import presets

TINY_UNET = ("UNet", "CheckpointUNet", lambda dims, c: dict(spatial_dims=dims, in_channels=c, out_channels=2,
                                                            channels=(4, 8, 16), strides=(2, 2), num_res_units=1))


def test_time_ratios_carry_their_spread_and_the_noise_band(monkeypatch):
    """A measured run on a tiny UNet: each ratio is the median of its per-round ratios with their interquartile range;
    the noise band is the plain computation ("none", timed though not asked for) against the plain network; the
    table marks the ratios within it and says what the band is; the breakdown adds up to each peak."""
    monkeypatch.setitem(presets.NETWORKS, "unet", TINY_UNET)
    rows = run_benchmark("unet", (16, 16, 16), 2, policies=["all"], steps=3, with_monai=False, progress=False)
    plain, ckpt = rows
    assert [r.name for r in rows] == ["MONAI UNet (plain)", 'CheckpointUNet "all"']
    assert plain.time_ratio == 1.0 and plain.time_iqr is None and ckpt.time_iqr[0] <= ckpt.time_ratio <= ckpt.time_iqr[1]
    assert plain.time_noise == ckpt.time_noise >= 0
    assert ckpt.within_noise == (abs(ckpt.time_ratio - 1) <= ckpt.time_noise or ckpt.time_iqr[0] <= 1 <= ckpt.time_iqr[1])
    table = format_table(rows)
    assert f"Noise band of this run: +-{ckpt.time_noise:.2f}" in table
    assert (f"{ckpt.time_ratio:.2f} ~ (" in table) == ckpt.within_noise
    for r in rows:
        assert sum(r.by_category_mib.values()) == pytest.approx(r.peak_mib, abs=0.1 * len(r.by_category_mib))
    assert "memory at the peak, MiB" in table and "note: activations" not in table  # activations dominate here


def test_the_table_says_when_activations_are_too_small_to_matter():
    """The issue's UNet at 32^3: the peak is Adam's step, activations 0.8 MiB of 87.6; every policy saves 0.0%."""
    at_peak = {"params": 18.3, "buffers": 0.0, "grads": 18.3, "activations": 0.8, "temporaries": 0.0,
               "optimizer": 50.2, "other": 0.1}
    rows = [BenchmarkRow("MONAI UNet (plain)", 87.7, 1.0, None, None, at_peak),
            BenchmarkRow('CheckpointUNet "all"', 87.7, 1.0, None, None, at_peak)]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[-1] == "saved"  # estimate mode: no time column
    assert lines[lines.index("") + 1].split()[-6:] == ["activations", "temporaries", "params", "grads", "optimizer",
                                                       "input"]
    note = " ".join(table.split("note: ", 1)[1].split())
    assert note.startswith("activations are 0.8 MiB (0.9%) of the plain network's peak of 87.7 MiB; the rest is "
                           "optimizer 50.2, params 18.3, grads 18.3 MiB.")
    assert "cannot lower this peak" in note


def test_fewer_than_three_timed_steps_are_refused(capsys):
    with pytest.raises(ValueError, match="at least 3 timed steps"):
        run_benchmark("unet", (16, 16, 16), steps=2, progress=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--steps", "2"])
    assert exit_.value.code == 2 and "--steps: at least 3 timed steps" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--plot", "{tmp}/missing/x.png"], r"--plot: '.*/missing/x.png': the folder .*/missing does not exist"),
    (["--plot", "{tmp}/x.txt"], r"--plot: '.*/x.txt': give a file name ending in .png or .svg or .pdf"),
    (["--json", "{tmp}"], r"--json: '.*' is a folder: give a file name in it"),
    (["--policies", '{"every": 2'], r"""--policies: '\{"every": 2' is not valid JSON \(Expecting ',' delimiter"""),
])
def test_arguments_are_checked_before_any_work(argv, message, capsys, monkeypatch, tmp_path):
    import re

    monkeypatch.setattr("monai_ckpt.benchmark.run_benchmark", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exit_:
        main(["--estimate", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and re.search(message, last), last
