"""Profiling and the benchmark CLI: estimates agree with real measurement; the CLI prints the table."""

import functools
import json

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from monai_ckpt import CheckpointUNet
from monai_ckpt.benchmark import main, run_benchmark
from monai_ckpt.profiling import measure_step_memory

CFG = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)


def test_hand_count_on_a_single_conv():
    """Conv3d(1->2, k=1) on (1,1,8,8,8), SGD: params 2*1+2 floats; at the peak of backward the live tensors
    are the input (512 floats, 'other'), the output (1024, kept by the loss) and the loss-backward temporaries:
    mean's grad / N, then pow's grad * 2 * out**1, up to four output-sized tensors."""
    torch.manual_seed(0)
    mem = measure_step_memory(lambda: nn.Conv3d(1, 2, 1), (1, 1, 8, 8, 8), optimizer="sgd")
    cat = mem.by_category
    assert cat["params"] == 4 * 4
    assert cat["other"] == 512 * 4  # the input batch
    assert cat["optimizer"] == 0
    out = 1024 * 4
    assert out <= cat["activations"] <= out + 16  # + the loss scalars
    assert out <= cat["temporaries"] <= 4 * out
    assert mem.peak == sum(cat.values())


@pytest.mark.parametrize("policy", ["none", "all", "cheap"])
def test_estimate_equals_real_measurement(policy):
    real = measure_step_memory(lambda: CheckpointUNet(**CFG, checkpoint_policy=policy), (2, 1, 32, 32, 32))
    fake = measure_step_memory(lambda: CheckpointUNet(**CFG, checkpoint_policy=policy), (2, 1, 32, 32, 32),
                               estimate=True)
    assert abs(fake.peak - real.peak) <= 0.05 * real.peak


def test_checkpointing_lowers_the_measured_peak():
    plain = measure_step_memory(lambda: UNet(**CFG), (2, 1, 32, 32, 32)).peak
    none = measure_step_memory(lambda: CheckpointUNet(**CFG, checkpoint_policy="none"), (2, 1, 32, 32, 32)).peak
    full = measure_step_memory(lambda: CheckpointUNet(**CFG, checkpoint_policy="all"), (2, 1, 32, 32, 32)).peak
    assert none == plain
    assert full < 0.8 * plain


def test_benchmark_rows_and_cli(tmp_path, capsys):
    # MONAI's own CheckpointUNet row runs in the estimate below (and timed in notebook 02's quick mode)
    rows = run_benchmark("unet", (64, 64, 64), 1, policies=["none", "all"], steps=3, with_monai=False, progress=False)
    assert [r.name for r in rows] == ["MONAI UNet (plain)", 'CheckpointUNet "none"', 'CheckpointUNet "all"']
    assert rows[1].peak_mib == rows[0].peak_mib and rows[2].peak_mib < rows[0].peak_mib
    assert all(r.time_ratio > 0 for r in rows)
    out = tmp_path / "rows.json"
    assert main(["--shape", "64", "64", "64", "--batch", "2", "--estimate", "--policies", "all", '{"every": 2}',
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'CheckpointUNet {"every": 2}' in printed and "estimate" in printed and "MONAI CheckpointUNet" in printed
    data = json.loads(out.read_text())
    assert data[0]["peak_vs_plain"] == 1.0 and data[1]["peak_vs_plain"] < 1.0
    assert main(["--shape", "64", "64", "64", "--estimate", "--no-monai", "--policies", "all", "--peak-tensors"]) == 0
    printed = capsys.readouterr().out
    assert '"all": tensors alive at the peak' in printed and '"none": tensors alive at the peak' in printed
    assert "| aten.convolution.default |" in printed and "| input batch |" in printed


def test_cli_bad_input_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--policies", "fastest", "--estimate"])
    assert "unknown checkpoint_policy 'fastest'" in capsys.readouterr().err


def test_block_costs_hand_count():
    """encoder0.0 of a tiny UNet is the residual conv (1->4, stride 2) and the first subunit (conv, instance
    norm, PReLU) on a 1x1x32^3 input: its forward keeps the conv output and the norm output (4 x 16^3 floats
    each) plus the norm's mean and inverse std (4 floats each), and passes on the subunit output and the
    residual (4 x 16^3 floats each)."""
    from monai_ckpt.profiling import block_costs

    costs = {c.block: c for c in block_costs(lambda: CheckpointUNet(**CFG), (1, 1, 32, 32, 32), repeats=1)}
    vol = 4 * 16**3 * 4
    assert costs["encoder0.0"].saved_bytes == 2 * vol + 2 * 4 * 4
    assert costs["encoder0.0"].output_bytes == 2 * vol
    assert costs["encoder0.1"].output_bytes == vol  # the residual add
    assert costs["decoder0.2"].saved_bytes == 0  # the last conv keeps only its input, the previous output
    assert all(c.forward_s > 0 for c in costs.values())
    assert list(costs)[0] == "encoder0.0" and list(costs)[-1] == "decoder0.2"
    fake = block_costs(lambda: CheckpointUNet(**CFG), (1, 1, 32, 32, 32), estimate=True)
    assert [(c.block, c.saved_bytes, c.output_bytes) for c in fake] == [
        (c.block, c.saved_bytes, c.output_bytes) for c in costs.values()]


def test_timing_the_blocks_keeps_no_network_alive():
    """DynUNet's in-place leaky ReLU saves its own output: a forward timed for the planner (which has no backward)
    held its graph through that saved tensor, a cycle Python's gc cannot see, and with it the network's parameters:
    planning in a loop grew by a network per plan (nnU-Net's ResEnc L, the docs' planner script ran out of memory).
    None stays alive."""
    import gc
    import weakref

    from networks_registry import dynunet_kwargs

    from monai_ckpt import CheckpointDynUNet
    from monai_ckpt.profiling import block_costs

    made = []

    def factory() -> nn.Module:
        net = CheckpointDynUNet(**dynunet_kwargs())
        made.extend(weakref.ref(p) for p in net.parameters())  # autograd's graph holds parameters, not modules
        return net

    block_costs(factory, (2, 2, 16, 16, 16), repeats=1)
    gc.collect()
    assert made and [ref() for ref in made] == [None] * len(made)


def test_block_costs_tail_hand_count(monkeypatch):
    """What a checkpoint ending with a block does not rerun: torch stops a recomputation once every saved
    tensor is back, and an operator saves its inputs before it runs. With a clock that advances one unit per
    reading every operator takes one unit: the top decoder's last block (conv only, then the identity residual
    add) has both operators after its last saved tensor, the cheap recompute only the add (cheap keeps conv
    outputs); the merge block (cat, transposed conv) none: it keeps the concatenation's parts rather than the
    concatenation, saved when its autograd Function returns, after the conv; a subunit block ending with PReLU and
    the residual add both of those."""
    import itertools

    from monai_ckpt.profiling import block_costs, timing

    class CountingClock:
        def __init__(self):
            self.ticks = itertools.count()

        def process_time(self):
            return float(next(self.ticks))

    monkeypatch.setattr(timing, "time", CountingClock())  # the clock block_costs times operators with
    costs = {c.block: c for c in block_costs(lambda: CheckpointUNet(**CFG), (1, 1, 32, 32, 32), repeats=1)}
    assert (costs["decoder0.2"].tail_s, costs["decoder0.2"].cheap_tail_s) == (2, 1)
    assert (costs["decoder0.0"].tail_s, costs["decoder0.0"].cheap_tail_s) == (0, 0)
    assert (costs["encoder0.1"].tail_s, costs["encoder0.1"].cheap_tail_s) == (2, 2)
    assert all(0 <= c.cheap_tail_s <= c.tail_s < c.forward_s for c in costs.values())


def test_peak_tensors_hand_count_and_total():
    """The single conv of the hand count: at the peak (the loss backward's last multiply) the output, the four
    loss temporaries, the batch, the weights and Adam's state, each named by what made it."""
    from monai_ckpt.profiling import peak_tensors

    live = peak_tensors(lambda: nn.Conv3d(1, 2, 1), (1, 1, 8, 8, 8))
    assert live.operator == "aten.mul.Tensor" and live.phase == "backward"
    assert live.peak == sum(t.nbytes for t in live.tensors) == measure_step_memory(
        lambda: nn.Conv3d(1, 2, 1), (1, 1, 8, 8, 8)).peak
    big = [(t.nbytes, t.category, t.made_by, t.phase) for t in live.tensors if t.nbytes >= 2048]
    assert big == [(4096, "activations", "aten.convolution.default", "forward"),
                   *[(4096, "temporaries", op, "backward") for op in
                     ("aten.div.Scalar", "aten.pow.Tensor_Scalar", "aten.mul.Scalar", "aten.mul.Tensor")],
                   (2048, "other", "input batch", "setup")]
    named = {(t.made_by, t.module) for t in live.tensors if t.phase == "setup"}
    assert {("parameter", "weight"), ("parameter", "bias"), ("optimizer state exp_avg", "")} <= named
    assert "| 0.003906 | activations | aten.convolution.default | Conv3d | forward | 1x2x8x8x8 | float32 |" in \
        live.format(min_bytes=4096)


def test_peak_tensors_of_a_checkpointed_network():
    from monai_ckpt.profiling import peak_tensors

    for policy in ("none", "all"):
        factory = functools.partial(CheckpointUNet, **CFG, checkpoint_policy=policy)
        live = peak_tensors(factory, (2, 1, 32, 32, 32), estimate=True)
        assert sum(t.nbytes for t in live.tensors) == live.peak == measure_step_memory(
            factory, (2, 1, 32, 32, 32), estimate=True).peak
    assert any(t.phase == "backward" and t.category == "activations" for t in live.tensors)  # "all" recomputes


def test_memory_timeline_matches_the_peak():
    from monai_ckpt.profiling import memory_timeline

    points = memory_timeline(lambda: CheckpointUNet(**CFG, checkpoint_policy="all"), (2, 1, 32, 32, 32))
    assert [p for _, _, p in points][0] == "forward" and [p for _, _, p in points][-1] == "optimizer"
    assert "backward" in {p for _, _, p in points}
    peak = measure_step_memory(lambda: CheckpointUNet(**CFG, checkpoint_policy="all"), (2, 1, 32, 32, 32)).peak
    assert max(b for _, b, _ in points) == peak


def test_cli_plot_and_scenarios(tmp_path, capsys, monkeypatch):
    import monai_ckpt.benchmark as bench

    png = tmp_path / "bench.png"
    assert main(["--shape", "32", "32", "32", "--estimate", "--policies", "all", "cheap", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    monkeypatch.setattr(bench, "SCENARIOS", [("tiny CT", (40, 33, 16), 1, 1), ("tiny BraTS", (24, 24, 20), 4, 1)])
    assert main(["--scenarios", "--policies", "all"]) == 0
    out = capsys.readouterr().out
    assert "tiny CT" in out and "1x48x48x16" in out and "4x32x32x32" in out  # padded to multiples of 16


@pytest.mark.parametrize("name", ["dicece", "focal"])
def test_a_loss_measured_at_small_sizes_replays_exactly_in_a_fake_step(name):
    """MONAI's DiceCE reads data (.tolist() of its reduction axes): loss_memory measures it for real at small outputs
    and scales by voxels; FocalLoss runs on fake tensors. Either way the fake step with LossStandIn has the peak of the
    real step with the real loss, to the byte (14 classes: the loss dominates the output-sized terms)."""
    from monai.losses import DiceCELoss, FocalLoss

    from monai_ckpt.profiling import LabelBatch, LossStandIn, loss_memory

    loss = {"dicece": DiceCELoss(to_onehot_y=True, softmax=True),
            "focal": FocalLoss(to_onehot_y=True, use_softmax=True)}[name]
    make = lambda: CheckpointUNet(3, 1, 14, (4, 8, 16), (2, 2), num_res_units=1, checkpoint_policy="all")
    shape, label = (1, 1, 32, 32, 32), LabelBatch((1, 1, 32, 32, 32), torch.int64)
    memory = loss_memory(loss, (1, 14, 32, 32, 32), label, spatial_dims=3)
    assert memory.method.startswith("real at output sizes" if name == "dicece" else "fake tensors")
    real = measure_step_memory(make, shape, loss=loss, label=label).peak
    fake = measure_step_memory(make, shape, estimate=True, loss=LossStandIn(memory), label=label).peak
    default = measure_step_memory(make, shape).peak
    assert abs(fake - real) <= 64 and real > default  # the loss value itself: a few bytes


class _TwoBranches(nn.Module):
    """h's gradient is the sum of two branches' gradients, each held by autograd alone: added in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 8, 1)

    def forward(self, x):
        h = self.conv(x)
        return h.sin() + h.cos()


class _SharedGradient(nn.Module):
    """h's first gradient is the one an addition also hands to k's branch, still waiting there when h's second
    gradient arrives: autograd adds out of place."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv3d(1, 8, 1), nn.Conv3d(1, 8, 1)

    def forward(self, x):
        k = self.conv2(x)
        h = self.conv(x)
        t = h * 2
        s = h + k
        return t.cos() + s.sin()


@pytest.mark.parametrize("net, in_place", [(_TwoBranches, True), (_SharedGradient, False)])
def test_a_gradient_addition_counts_as_autograd_does_it_without_a_dispatch_mode(net, in_place):
    """Under a dispatch mode autograd adds a second gradient out of place; without one, into the first when it holds
    that alone. The tracker counts what training allocates: the addition's live bytes grow by the sum only where
    autograd, run without a mode (read from the CPU allocator by torch's profiler), adds out of place."""
    from monai_ckpt.profiling.allocator import allocator_step
    from monai_ckpt.profiling.step import steady_state, training_step
    from monai_ckpt.profiling.tracker import step_tracker

    shape = (1, 1, 16, 16, 16)
    _, _, adds_in_place, adds_out_of_place = allocator_step(net, shape)
    assert (adds_in_place, adds_out_of_place) == ((1, 0) if in_place else (0, 1))  # the reference is what it says

    class Additions(step_tracker()):
        starts, grown = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._settle()
            self.starts.append(self.live_bytes())
            return super().__torch_dispatch__(func, types, args, kwargs)

        def after_operator(self, func, out):
            start = self.starts.pop(0)
            if func is torch.ops.aten.add.Tensor and not torch.is_grad_enabled():
                self.grown.append(self.live_bytes() - start)

    with steady_state(net, shape, False, torch.device("cpu"), "adam", False) as (model, opt, x, _):
        tracker = Additions()
        tracker.track_external(model, opt, x)
        with tracker:
            training_step(model, x, opt)
    assert tracker.grown == [0 if in_place else 8 * 16**3 * 4]


def test_the_live_tensor_peak_is_what_training_allocates_where_it_falls_on_a_gradient_addition():
    """AttentionUnet with the planner's 60% policy peaks at the skip's two gradients being added (the attention
    gate's and the merge's): the figure, measured and estimated, equals the CPU allocator's bytes at operator ends
    without a dispatch mode (up to the checkpoints' RNG states, which are not dispatched), not one gradient more."""
    from monai_ckpt.networks.presets import network_factory
    from monai_ckpt.profiling.allocator import allocator_step

    policy = [{"names": ["encoder0", ["decoder2.0", "decoder2.1"], "decoder1", ["decoder0.0", "decoder0.1"]]},
              {"names": ["encoder1", "encoder2", "encoder3", "bottleneck", ["decoder3.2", "decoder3.3"],
                         ["decoder2.2", "decoder2.3"]], "mode": "cheap"}]
    factory = network_factory("attentionunet", 3, 1, policy)
    shape = (1, 1, 48, 48, 48)
    measured = measure_step_memory(factory, shape).peak
    assert measure_step_memory(factory, shape, estimate=True).peak == measured
    allocated = allocator_step(factory, shape)[1]
    assert abs(measured - allocated) <= 256 * 1024  # a 16-channel gradient here is 6.75 MiB


def test_the_tracker_keeps_memtrackers_peaks_without_its_per_module_walk_at_every_operator(monkeypatch):
    """MemTracker updates every module's own peak at every operator (a walk over all modules it has seen);
    nothing here reads those, and the walk made estimates 2.7-3.8x slower. The tracker skips it, and its peaks,
    by category and timeline, are the ones it gives with the walk put back."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from monai_ckpt.profiling import memory_timeline
    from monai_ckpt.profiling.tracker import step_tracker

    tracker = step_tracker()
    own, walk = tracker._update_peak_stats, MemTracker._update_peak_stats
    walks = []

    def counted_walk(self, state):
        walks.append(state)
        return walk(self, state)

    monkeypatch.setattr(MemTracker, "_update_peak_stats", counted_walk)
    factory = lambda: CheckpointUNet(**CFG, checkpoint_policy="cheap")  # noqa: E731
    shape = (2, 1, 32, 32, 32)
    figures = [(m.peak, m.by_category) for m in (measure_step_memory(factory, shape, estimate=estimate)
                                                for estimate in (False, True))]
    timeline = memory_timeline(factory, shape, estimate=True)
    assert walks == []

    monkeypatch.setattr(tracker, "_update_peak_stats", lambda self, state: (own(self, state),
                                                                           counted_walk(self, state))[0])
    walked = [(m.peak, m.by_category) for m in (measure_step_memory(factory, shape, estimate=estimate)
                                               for estimate in (False, True))]
    assert walks and walked == figures
    assert memory_timeline(factory, shape, estimate=True) == timeline


def test_step_time_ratios_by_user_time_and_a_bad_clock():
    """clock="user" times the same networks by user CPU time alone: the first is the reference, a network four
    times as deep takes longer; an unknown clock is refused before anything is built."""
    from monai_ckpt.profiling import step_time_ratios

    def stack(depth):
        return lambda: nn.Sequential(*(nn.Conv3d(4 if i else 1, 4, 3, padding=1) for i in range(depth)))

    medians, ratios = step_time_ratios([stack(2), stack(8)], (1, 1, 24, 24, 24), steps=3, clock="user")
    assert ratios[0] == 1.0 and ratios[1] > 1.5 and all(m > 0 for m in medians)
    with pytest.raises(ValueError, match="clock must be 'process' or 'user'"):
        step_time_ratios([stack(1)], (1, 1, 8, 8, 8), clock="wall")
