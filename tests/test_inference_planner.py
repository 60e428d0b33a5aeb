"""Inference that fits: ``plan_inference`` and ``PlannedSlidingWindowInferer`` against MONAI's own
``sliding_window_inference`` on a tiny UNet and 32^3-sized images.

- the measurement (fake tensors, with its shortcut) equals the real call on real tensors, byte for byte, on both
  devices (the host's tensors as ``meta`` tensors);
- a plan's predicted peaks are what the real call with its settings measures, and fit;
- every setting the planner chooses gives MONAI's default results;
- bad input is one clear error, and nothing is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import UNet

from monai_ckpt import CheckpointUNet, plan_inference
from monai_ckpt.inferers import PlannedSlidingWindowInferer
from monai_ckpt.plan import main as plan_main
from monai_ckpt.profiling import sliding_window_memory

IMAGE = (1, 1, 32, 32, 40)  # 27 windows of 16^3 at overlap 0.25: the shortcut keeps 2-8 of them
ROI = (16, 16, 16)
MiB = 2**20


@pytest.fixture(scope="module")
def net() -> CheckpointUNet:
    return CheckpointUNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1).eval()


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    """Tiny convolutions on a shared 2-core host: one thread is 10-50x faster than two waiting for each other
    (the bytes measured do not depend on it); window batches of 1 and 2 only."""
    import monai_ckpt.planner.inference as planning

    monkeypatch.setattr(planning, "SW_BATCH_SIZES", (1, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _real_peaks(net, image_shape, sw_device="cpu", device="cpu", **kw) -> dict[str, int]:
    """The real call on real tensors (the host's as ``meta`` tensors) under MemTracker."""
    return sliding_window_memory(net, image_shape, ROI, estimate=False, sw_device=sw_device, device=device,
                                 **kw).peaks


@pytest.mark.parametrize("kw", [
    dict(sw_batch_size=2, device="cpu", amp=True, mode="gaussian", batch=2),  # host stitching, window by window
    dict(sw_batch_size=2, device="cpu", buffer_steps=2, buffer_dim=0),  # through buffers of two rows
])
def test_the_fake_measurement_with_its_shortcut_is_the_real_call(net, kw):
    kw = dict(kw)
    image = (kw.pop("batch", 1), *IMAGE[1:])
    fake = sliding_window_memory(net, image, ROI, sw_device="cuda", **kw)
    assert fake.measured_calls < len(fake.calls)  # the shortcut left window batches out
    real = _real_peaks(net, image, device="meta" if kw.pop("device") == "cpu" else "cpu", **kw)
    assert fake.peaks["cuda"] == real["cpu"]
    assert fake.peaks.get("cpu", 0) == real.get("meta", 0)
    assert fake.peaks["cuda"] > 0


def test_predicted_peaks_are_measured_and_fit(net):
    image = (1, 1, 28, 28, 32)  # 12 windows
    # a GPU budget below MONAI's defaults (the whole output on the GPU): the plan stitches on the host
    default = sliding_window_memory(net, image, ROI, sw_device="cuda")
    p = plan_inference(net, image, ROI, (default.peaks["cuda"] - 1) / 2**30, device="cuda", headroom_gb=1e-9)
    assert p.device == "cpu" and p.peak_bytes <= p.budget_bytes - p.headroom_bytes < p.default_peak_bytes
    measured = _real_peaks(net, image, device="meta", sw_batch_size=p.sw_batch_size, buffer_steps=p.buffer_steps,
                           buffer_dim=p.buffer_dim)
    assert (p.peak_bytes, p.host_peak_bytes) == (measured["cpu"], measured["meta"])
    assert "stitched on cuda" in p.reason and "on the host" in str(p)
    # on the CPU alone: a budget only autocast meets
    least = sliding_window_memory(net, image, ROI, amp=True).peaks["cpu"]
    p = plan_inference(net, image, ROI, least / 2**30, amp=True)
    assert p.amp and p.host_peak_bytes is None
    assert p.peak_bytes == _real_peaks(net, image, sw_batch_size=p.sw_batch_size, amp=True)["cpu"] <= p.budget_bytes


def test_every_setting_the_planner_chooses_gives_monai_defaults_results(net):
    x = torch.randn(IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in ("constant", "gaussian"):
            reference = sliding_window_inference(x, ROI, 1, net, mode=mode)
            for kw in (dict(sw_batch_size=4, device="cpu"), dict(sw_batch_size=3, buffer_steps=1, buffer_dim=0),
                       dict(sw_batch_size=2, buffer_steps=2, buffer_dim=-1)):
                out = sliding_window_inference(x, ROI, predictor=net, mode=mode, **kw)
                torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5, msg=f"{mode} {kw}")
        plain = SlidingWindowInferer(ROI, overlap=0.5, mode="gaussian")(x, net)
        planned = PlannedSlidingWindowInferer(ROI, overlap=0.5, mode="gaussian", budget_gb=0.004)(x, net)
    torch.testing.assert_close(planned, plain, rtol=1e-5, atol=1e-5)


def test_the_inferer_plans_once_per_shape_and_is_monais_without_a_budget(net, monkeypatch):
    import monai_ckpt.inferers as inferers

    calls = []
    monkeypatch.setattr(inferers, "plan_inference", lambda *a, **k: calls.append(a[1]) or plan_inference(*a, **k))
    inferer = PlannedSlidingWindowInferer(ROI, sw_batch_size=4, budget_gb=0.05)
    with torch.no_grad():
        for shape in (IMAGE, IMAGE, (1, 1, 32, 32, 32)):
            inferer(torch.randn(shape), net)
    assert calls == [IMAGE, (1, 1, 32, 32, 32)] and len(inferer.plans) == 2
    unplanned = PlannedSlidingWindowInferer(ROI, sw_batch_size=4)
    with torch.no_grad():
        unplanned(torch.randn(IMAGE), net)
    assert len(calls) == 2 and not unplanned.plans


def test_bundle_inference_config_takes_a_budget(net):
    parser = ConfigParser()
    parser.read_config("bundles/brain_tissue_segmentation/configs/inference.json")
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, PlannedSlidingWindowInferer) and inferer.budget_gb is None
    assert (inferer.sw_batch_size, inferer.overlap, inferer.mode) == (4, 0.5, "gaussian")  # as before
    parser["inference_budget_gb"] = 0.05
    parser["patch_size"] = list(ROI)
    inferer = parser.get_parsed_content("inferer", lazy=False)
    with torch.no_grad():
        out = inferer(torch.randn(IMAGE), net)
    assert inferer.budget_gb == 0.05 and out.shape == (1, 3, *IMAGE[2:]) and len(inferer.plans) == 1


def test_bad_input_is_one_clear_error_and_nothing_is_written(net, tmp_path):
    with pytest.raises(ValueError, match=r"roi_size \(16, 16, 16\) is larger than the image \(32, 32, 12\).*Spatial"):
        plan_inference(net, (1, 1, 32, 32, 12), ROI, 1)
    with pytest.raises(ValueError, match=r"the image has 2 channel\(s\) but the network takes 1.*\(1, 1, 32, 32, 40\)"):
        plan_inference(net, (1, 2, 32, 32, 40), ROI, 1)
    with pytest.raises(ValueError, match=r"nothing fits: the least memory on cuda is .* MiB \(sw_batch_size=1, "
                                         r"stitched on the host"):
        plan_inference(net, IMAGE, ROI, 1e-4, device="cuda", headroom_gb=1e-6)
    with pytest.raises(ValueError, match=r"the budget of 0.1 GiB is all headroom on cuda \(256.0 MiB"):
        plan_inference(net, IMAGE, ROI, 0.1, device="cuda")
    out = tmp_path / "plan.json"
    args = ["--inference", "--network", "unet", "--image-shape", "64", "64", "48", "--roi", "32", "32", "32",
            "--device", "cuda", "--json", str(out)]
    assert plan_main([*args, "--budget-gb", "0.01"]) == 2 and not out.exists()
    assert plan_main([*args, "--budget-gb", "1"]) == 0
    saved = json.loads(out.read_text())
    assert saved["sw_batch_size"] == 1 and saved["device"] == "cuda" and saved["peak_bytes"] < 2**30


def test_networks_of_any_kind_plan(net):
    """A plain MONAI network plans as well as a Checkpoint* one (inference runs the plain forward)."""
    plain = UNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1).eval()
    plain.load_state_dict(net.state_dict())
    a = plan_inference(plain, IMAGE, ROI, 0.01, device="cuda", headroom_gb=0.001)
    b = plan_inference(net, IMAGE, ROI, 0.01, device="cuda", headroom_gb=0.001)
    assert (a.peak_bytes, a.host_peak_bytes, a.sliding_window_kwargs()) == (b.peak_bytes, b.host_peak_bytes,
                                                                            b.sliding_window_kwargs())
    assert a.peak_bytes > 0 and a.default_peak_bytes / MiB < 10
