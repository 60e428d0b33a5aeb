"""The planner: plans fit their budget (measured), predictions are accurate, the DP is exact, budget policies."""

import itertools
import re
import time
import json
import math

import pytest
import torch
from helpers import train_steps
from monai.networks.nets import UNet

import monai_ckpt.planner as planner
from monai_ckpt import CheckpointDynUNet, CheckpointUNet, CheckpointVNet, plan
from monai_ckpt.planner.capacity import least_memory_policy, patch_edges, reference_edge
from monai_ckpt.planner.device import headroom_bytes
from monai_ckpt.planner.model import param_grads_after, policy_of, runs_of, segment_options, solve
from monai_ckpt.planner.profile import profile_chain
from monai_ckpt.planner.search import Planner
from monai_ckpt.policies import resolve_policy, validate_policy
from monai_ckpt.profiling import measure_step_memory, replica

GiB = 2**30
UNET = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
            num_res_units=2, norm="batch")
DYNUNET = dict(spatial_dims=3, in_channels=2, out_channels=2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
               upsample_kernel_size=[2, 2, 2], filters=(8, 16, 32, 64), deep_supervision=True, deep_supr_num=1,
               res_block=True)
NETWORKS = {  # network, [(batch, patch, where the budget lies between the smallest and the plain peak)]
    "unet": (lambda: CheckpointUNet(**UNET), [(2, (32, 32, 32), 0.6), (1, (48, 32, 32), 0.85)]),
    "vnet": (lambda: CheckpointVNet(2, 1, 2), [(2, (128, 128), 0.5)]),  # 2D: in 3D its 45M parameters dominate
    "dynunet": (lambda: CheckpointDynUNet(**DYNUNET), [(1, (32, 48, 32), 0.6)]),
}


def _measured(net, policy, input_shape, estimate=False):
    """Live-tensor peak of a training step of ``net`` with ``policy`` (MemTracker; real tensors by default)."""
    return measure_step_memory(lambda: replica(net, policy), input_shape, estimate=estimate).peak


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_plans_fit_and_predictions_are_accurate(name):
    make, cases = NETWORKS[name]
    net = make()
    for batch, shape, fraction in cases:
        input_shape = (batch, net.in_channels, *shape)
        plain = _measured(net, "none", input_shape, estimate=True)
        smallest = _measured(net, "all", input_shape, estimate=True)
        budget = smallest + fraction * (plain - smallest)
        p = plan(net, shape, budget / GiB, batch_size=batch)
        measured = _measured(net, p.policy, input_shape)  # real tensors
        assert p.fits and measured <= p.budget_bytes, (name, shape, fraction, p)
        assert abs(p.predicted_peak_bytes - measured) <= 0.10 * measured, (name, shape, p, measured)
        # something is recomputed; its predicted cost is >= 1, not > 1: times are rounded to 0.2% of a step, and the
        # recomputation a tiny network's plan needs can round to nothing on a loaded host
        assert p.predicted_peak_bytes < plain == p.plain_peak_bytes and p.policy != "none"
        assert p.predicted_time_ratio >= 1.0


def test_a_budget_that_fits_plain_needs_no_checkpointing():
    p = plan(CheckpointUNet(**UNET), (32, 32, 32), 1.0, batch_size=2)
    assert (p.policy, p.checkpointed, p.predicted_time_ratio, p.fits) == ("none", [], 1.0, True)
    assert p.predicted_peak_bytes == p.plain_peak_bytes


@pytest.mark.parametrize("bad, match", [
    (dict(budget_gb=0), "budget_gb must be a positive"),
    (dict(budget_gb="8"), "budget_gb must be a positive"),
    (dict(spatial_shape=(32, 32)), "must have 3 sizes"),
    (dict(spatial_shape=(30, 32, 32)), "multiple of"),
    (dict(batch_size=0), "batch_size must be a positive"),
    (dict(optimizer="lbfgs"), "unknown optimizer"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    args = dict(spatial_shape=(32, 32, 32), budget_gb=1.0) | bad
    with pytest.raises(ValueError, match=match):
        plan(CheckpointUNet(**UNET), args.pop("spatial_shape"), args.pop("budget_gb"), **args)
    with pytest.raises(TypeError, match="needs a checkpoint-aware network"):
        plan(UNet(**UNET), (32, 32, 32), 1.0)


def test_dynamic_program_is_exact_against_brute_force():
    """Every combination of segment options of a small network: the DP's pick is the fastest that fits."""
    net = CheckpointUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                         num_res_units=1)
    prof = profile_chain(net, (1, 1, 32, 32, 32), False, "adam", timing=False)
    full = [0.01 * (1 + i % 3) for i in range(len(prof.costs))]  # distinct, known recompute costs
    prof.recompute_s = {"full": full, "cheap": [t / 4 for t in full]}
    prof.tail_s = {"full": [t / 2 if i % 2 else 0.0 for i, t in enumerate(full)],  # a run's time depends on its
                   "cheap": [t / 12 for t in full]}  # last block: a checkpoint stops before the tail
    grads = param_grads_after(prof)
    options = [segment_options(prof, blocks, grads) for _, blocks in prof.segments]
    combos = list(itertools.product(*options))
    assert len(combos) > 50
    peaks = sorted({prof.fixed_bytes + _chain_peak(c, prof.loss_bytes) for c in combos})
    for limit in peaks[:: max(1, len(peaks) // 12)]:
        feasible = [sum(o.time for o in c) for c in combos if _fits(prof, c, limit)]
        solved = solve(prof, limit, options)
        if not feasible:
            assert solved is None
            continue
        assert solved is not None and math.isclose(solved[2], min(feasible), abs_tol=1e-12)
        assert _fits(prof, solved[0], limit)


def _fits(prof, combo, limit):
    kept = 0
    for opt in combo:
        if prof.fixed_bytes + kept + opt.peak > limit:
            return False
        kept += opt.kept
    return prof.fixed_bytes + kept + prof.loss_bytes <= limit  # the loss runs on top of all the forward kept


def _chain_peak(combo, loss_bytes=0):
    kept, peak = 0, 0
    for opt in combo:
        peak = max(peak, kept + opt.peak)
        kept += opt.kept
    return max(peak, kept + loss_bytes)


def test_plan_is_never_slower_than_the_fastest_fixed_policy_that_fits():
    net = CheckpointUNet(**UNET)
    input_shape = (2, 1, 32, 32, 32)
    p0 = Planner(net, input_shape, False, "adam")
    plain, smallest = p0.peak("none"), p0.smallest()[1]
    for fraction in (0.9, 0.7, 0.5, 0.3):
        budget = int(smallest + fraction * (plain - smallest))
        p = p0.plan(budget)
        fixed = [f for f in planner.FIXED_POLICIES if f != "none" and p0.peak(f) <= budget]
        assert fixed, "some fixed policy fits each of these budgets"
        assert p.predicted_time_ratio <= min(p0.time_ratio(f) for f in fixed) + 1e-9
        assert p.predicted_peak_bytes == p0.peak(p.policy) <= budget


def test_budget_policy_plans_per_shape_and_trains_like_the_parent():
    parent = UNet(**UNET)
    net = CheckpointUNet(**UNET)
    plain = _measured(net, "none", (2, 1, 32, 32, 32), estimate=True)
    smallest = _measured(net, "all", (2, 1, 32, 32, 32), estimate=True)
    budget = (smallest + 0.5 * (plain - smallest)) / GiB
    net.checkpoint_policy = {"budget_gb": budget}
    assert net.checkpoint_groups() == [] and net.checkpoint_plan is None  # planned on the first training forward
    net.load_state_dict(parent.state_dict())
    inputs = [torch.randn(2, 1, 32, 32, 32) for _ in range(2)]
    outs_c = train_steps(net, inputs)
    outs_p = train_steps(parent, inputs)
    for a, b in zip(outs_p, outs_c, strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    for (name, p), (_, c) in zip(parent.named_parameters(), net.named_parameters(), strict=True):
        torch.testing.assert_close(c, p, atol=0, rtol=0, msg=name)
    first = net.checkpoint_plan
    assert first.input_shape == (2, 1, 32, 32, 32) and first.policy != "none"
    assert net.checkpoint_groups() == resolve_policy(first.policy, net.checkpoint_segments())
    assert _measured(net, first.policy, (2, 1, 32, 32, 32)) <= budget * GiB
    # a smaller input fits without checkpointing: a new plan for the new shape, the old one is kept
    net(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    assert net.checkpoint_plan.input_shape == (1, 1, 32, 32, 32) and net.checkpoint_plan.policy == "none"
    assert net.checkpoint_groups() == []
    net(torch.randn(2, 1, 32, 32, 32)).mean().backward()
    assert net.checkpoint_plan is first
    # eval and no_grad never plan
    net.eval()
    net(torch.randn(1, 1, 48, 48, 48))
    assert len(net._checkpoint_plans) == 2
    torch.jit.script(net)


def test_budget_policy_replans_a_deep_supervision_dynunet_after_training_forwards():
    """Each new shape is planned on a copy of the network, which by then keeps its last heads (non-leaf tensors)."""
    net = CheckpointDynUNet(**DYNUNET, checkpoint_policy={"budget_gb": 1.0})
    for shape in ((1, 2, 32, 32, 32), (1, 2, 32, 48, 32)):
        out = net(torch.randn(shape))
        out.mean().backward()
        assert net.heads[0].grad_fn is not None and net.checkpoint_plan.input_shape == shape
    assert len(net._checkpoint_plans) == 2


def test_budget_policy_spec_validation():
    assert validate_policy({"budget_gb": 8}) == {"budget_gb": 8}
    assert validate_policy({"budget_gb": 8.5, "optimizer": "sgd"}) == {"budget_gb": 8.5, "optimizer": "sgd"}
    for bad, match in [({"budget_gb": -1}, "positive"), ({"budget_gb": True}, "positive"),
                       ({"budget_gb": 8, "mode": "cheap"}, "takes only"), ({"budget_gb": 8, "optimizer": "x"}, "one of")]:
        with pytest.raises(ValueError, match=match):
            CheckpointUNet(**UNET, checkpoint_policy=bad)
    with pytest.raises(ValueError, match="chosen by the planner"):
        resolve_policy({"budget_gb": 8}, CheckpointUNet(**UNET).checkpoint_segments())


def test_nothing_fits_is_a_clear_error_in_training():
    net = CheckpointUNet(**UNET, checkpoint_policy={"budget_gb": 1e-4})
    with pytest.raises(ValueError, match=r"smallest peak reachable is [\d.]+ MiB, with checkpoint_policy=") as err:
        net(torch.randn(1, 1, 32, 32, 32))
    reachable = float(str(err.value).split("reachable is ")[1].split(" MiB")[0]) * 2**20
    plain = _measured(net, "none", (1, 1, 32, 32, 32), estimate=True)
    assert 0.1 * 2**20 < reachable < plain  # checkpointing lowers the peak, just not to 0.1 MiB


def test_capacity_search_finds_the_boundary():
    # three levels, one residual unit each: the searches estimate many sizes, and a deeper UNet only runs more ops
    net = CheckpointUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                         num_res_units=1, norm="batch")
    step = 4  # the sizes it takes
    assert net.size_multiple() == (step,) * 3
    budget = 0.05
    (row,) = planner.capacity_table(net, (budget,))
    assert 32 <= row["plain"] < row["checkpointed"] and row["plain"] <= row["plain_amp"] <= row["checkpointed_amp"]
    cube = lambda edge: (1, 1, edge, edge, edge)
    assert _measured(net, "none", cube(row["plain"])) <= budget * GiB  # real tensors
    assert _measured(net, "none", cube(row["plain"] + step), estimate=True) > budget * GiB
    policy = least_memory_policy(net, cube(reference_edge(patch_edges(net, 1024))), False, "adam")
    assert _measured(net, policy, cube(row["checkpointed"]), estimate=True) <= budget * GiB
    assert _measured(net, policy, cube(row["checkpointed"] + step), estimate=True) > budget * GiB
    batch = planner.max_batch_size(net, (32, 32, 32), budget, checkpointing=False)
    assert _measured(net, "none", (batch, 1, 32, 32, 32)) <= budget * GiB
    assert _measured(net, "none", (batch + 1, 1, 32, 32, 32), estimate=True) > budget * GiB
    assert planner.format_capacity_table([row]).splitlines()[2] == (
        f"| {budget} | {row['plain']}x{row['plain']}x{row['plain']} | " + "x".join([str(row["checkpointed"])] * 3)
        + " | " + "x".join([str(row["plain_amp"])] * 3) + " | " + "x".join([str(row["checkpointed_amp"])] * 3) + " |")


def test_plan_stays_callable_after_the_cli_module_is_imported():
    """`import monai_ckpt.plan` (the CLI) rebinds the package's `plan` to the module: it still plans, as the function."""
    import monai_ckpt
    import monai_ckpt.plan  # noqa: F401 - the import is the point

    net = CheckpointUNet(**UNET)
    assert monai_ckpt.plan(net, (32, 32, 32), 1.0) == planner.plan(net, (32, 32, 32), 1.0)


def test_cli(capsys, tmp_path, monkeypatch):
    import monai_ckpt.plan
    from monai_ckpt.plan import main

    monkeypatch.setattr(monai_ckpt.plan, "network_factory", lambda *a: lambda: CheckpointUNet(**UNET))  # small
    plain = _measured(CheckpointUNet(**UNET), "none", (2, 1, 32, 32, 32), estimate=True)
    assert main(["--network", "unet", "--budget-gb", str(0.8 * plain / GiB), "--shape", "32", "32", "32", "--batch", "2",
                 "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_policy = " in out and "largest batch of 32x32x32" in out
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["fits"] is True and written["policy"] != "none" and written["max_batch_size"] >= 2
    assert main(["--network", "unet", "--budget-gb", "0.0001", "--shape", "32", "32", "32"]) == 2
    assert "smallest peak reachable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # checked up front, before any search
        main(["--network", "unet", "--table", "--budgets", "-1"])
    assert exit_.value.code == 2 and "--budgets: must be a positive number" in capsys.readouterr().err


def test_segment_options_cut_segments_into_runs():
    """A segment of n blocks is cut every possible way (2^(n-1) cuts), each run plain, full or cheap; the
    policy of a cut names whole segments, single blocks and runs (inner lists) and resolves to those units."""
    assert runs_of((0, 1, 2)) == [((0,), (1,), (2,)), ((0,), (1, 2)), ((0, 1), (2,)), ((0, 1, 2),)]
    assert len(runs_of(tuple(range(5)))) == 16
    net = CheckpointUNet(**UNET)
    prof = profile_chain(net, (1, 1, 32, 32, 32), False, "adam", timing=False)
    grads = param_grads_after(prof)
    name, blocks = next((n, b) for n, b in prof.segments if len(b) == 3)
    units = {o.units for o in segment_options(prof, blocks, grads)}
    b0, b1, b2 = blocks
    assert (((b0, b1), "full"), ((b2,), "cheap")) in units and (((b0,), "plain"), ((b1, b2), "full")) in units
    chosen = [next(o for o in segment_options(prof, bl, grads)
                   if o.units == ((((b0, b1), "full"), ((b2,), "cheap")) if n == name else (((bl[0],), "plain"),)
                                  if len(bl) == 1 else tuple(((b,), "plain") for b in bl)))
              for n, bl in prof.segments]
    policy, labels = policy_of(prof, chosen)
    names = [prof.costs[b].block for b in blocks]
    assert policy == [{"names": [names[:2]]}, {"names": [names[2]], "mode": "cheap"}]
    assert labels == ["+".join(names[:2]), names[2]]
    groups = resolve_policy(json.loads(json.dumps(policy)), net.checkpoint_segments())
    assert [(g.names, g.mode) for g in groups] == [(tuple(names[:2]), "full"), ((names[2],), "cheap")]


# --- the user's loss, one search, reproducibility, devices -------------------------------------------------------

MANY = dict(spatial_dims=3, in_channels=1, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def _loss(name):
    from monai.losses import DiceCELoss, DiceLoss

    return {
        "dicece": (DiceCELoss(to_onehot_y=True, softmax=True), "index"),
        "dice_sigmoid": (DiceLoss(sigmoid=True), "channels"),
    }[name]  # a deep-supervision loss on a list of heads: tests/test_planner_speed.py


@pytest.mark.parametrize("name, classes", [("dicece", 14), ("dice_sigmoid", 104)])
def test_plans_with_the_users_loss_fit_and_predict_within_5_percent(name, classes):
    """The step planned is the user's: their loss on a label batch of the right shape and dtype. The plan's real
    peak (MemTracker, real tensors, the real loss) fits the budget and is within 5% of the prediction; a plan made
    for the default loss at the same budget is checked against the same measurement."""
    from monai_ckpt.profiling import LabelBatch

    loss, label = _loss(name)
    net, shape = CheckpointUNet(**MANY, out_channels=classes), (1, 1, 16, 16, 16)
    labels = LabelBatch((shape[0], 1 if label == "index" else classes, *shape[2:]),
                        torch.int64 if label == "index" else torch.float32)
    real = lambda policy: measure_step_memory(lambda: replica(net, policy), shape, loss=loss,
                                              label=labels).peak
    plain, least = real("none"), real("all")
    budget = least + 0.6 * (plain - least)
    p = plan(net, shape[2:], budget / GiB, batch_size=shape[0], loss=loss, label=label)
    measured = real(p.policy)
    assert p.fits and measured <= p.budget_bytes and p.label_shape == labels.shape, (p, measured)
    assert abs(p.predicted_peak_bytes - measured) <= 0.05 * measured and abs(p.plain_peak_bytes - plain) <= 64
    if classes == 104:  # outputs (and the loss's temporaries) grow with the classes: they dominate the step
        assert plain > 4 * measure_step_memory(lambda: CheckpointUNet(**MANY, out_channels=2), shape, loss=loss,
                                               label=LabelBatch((1, 2, *shape[2:]), torch.float32)).peak


def test_bad_losses_and_labels_are_clear_errors():
    from monai.losses import DiceLoss

    net = CheckpointUNet(**MANY, out_channels=3)
    for kwargs, match in [
        (dict(loss=DiceLoss(sigmoid=True)), r"fails on the network's output of shape \(1, 3, 32, 32, 32\) and a label"),
        (dict(loss=DiceLoss(sigmoid=True), label=torch.zeros(1, 5, 32, 32, 32)), "5 channels but the network outputs 3"),
        (dict(loss=DiceLoss(sigmoid=True), label=torch.zeros(1, 3, 16, 32, 32)), r"should be \(batch 1, 1 or 3"),
        (dict(loss=DiceLoss(sigmoid=True), label="onehot"), "label must be 'index'"),
        (dict(loss="dice"), "loss must be a callable"),
        (dict(headroom_gb=0), "headroom_gb must be a positive"),
        (dict(headroom_gb=-1.0), "headroom_gb must be a positive"),
        (dict(headroom_gb=2.0), "leaves nothing of the 1 GiB budget"),
        (dict(device="cuda"), "parameters are on cpu, not cuda"),
        (dict(device="tpu:x"), "is not a torch device"),
    ]:
        with pytest.raises(ValueError, match=match):
            plan(net, (32, 32, 32), 1.0, **kwargs)


def test_one_search_every_budget_above_the_exhaustive_least_peak_is_planned():
    """A small UNet: every way to cut its chain into consecutive runs, each plain or fully recomputed, measured. plan() refuses no budget at or above the least of them, and every plan fits its budget."""
    net = CheckpointUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                         num_res_units=1)
    shape = (1, 1, 16, 16, 16)
    names = [step.block for step in net._chain_steps()]
    peaks = {}
    for cuts in itertools.product((False, True), repeat=len(names) - 1):
        runs, run = [], [names[0]]
        for name, cut in zip(names[1:], cuts):
            if cut:
                runs.append(run)
                run = []
            run.append(name)
        runs.append(run)
        for modes in itertools.product((False, True), repeat=len(runs)):
            policy = [r for r, full in zip(runs, modes) if full] or "none"
            peaks[json.dumps(policy)] = _measured(net, policy, shape)  # real tensors: faster than fake ones here
    least, plain = min(peaks.values()), peaks['"none"']
    assert len(peaks) > 50 and least < plain
    for fraction in (0.0, 0.1, 0.3, 0.6):
        budget = least + fraction * (plain - least)
        p = plan(net, shape[2:], budget / GiB)
        assert p.fits and _measured(net, p.policy, shape) <= budget, (fraction, p)
    with pytest.raises(ValueError, match="smallest peak reachable") as refused:
        plan(net, shape[2:], 0.8 * least / GiB)
    assert "checkpoint_policy=" in str(refused.value)
    # plan() reaches the patch the capacity search finds (it used to refuse the README's 464^3 in 8 GiB)
    budget = _measured(net, "none", (1, 1, 32, 32, 32), estimate=True) / GiB
    edge = planner.max_patch_edge(net, budget, max_edge=64)
    assert edge > 32 and plan(net, (edge,) * 3, budget).fits


def test_the_same_question_gets_the_same_plan_and_plans_keep_headroom():
    net = CheckpointUNet(**MANY, out_channels=2)
    plain = _measured(net, "none", (2, 1, 16, 16, 16), estimate=True)
    budget = 0.8 * plain / GiB
    first = plan(net, (16, 16, 16), budget, batch_size=2)
    again = plan(CheckpointUNet(**MANY, out_channels=2), (16, 16, 16), budget, batch_size=2)  # a new, equal network
    assert again.policy == first.policy and again.predicted_time_ratio == first.predicted_time_ratio
    # headroom: the tensors are planned into budget - headroom, and the plan says what to expect on the device
    roomy = plan(net, (16, 16, 16), budget, batch_size=2, headroom_gb=0.1 * budget)
    assert roomy.predicted_peak_bytes <= roomy.budget_bytes - roomy.headroom_bytes
    assert roomy.expected_reserved_bytes == roomy.predicted_peak_bytes + roomy.headroom_bytes
    assert roomy.expected_allocated_bytes == roomy.predicted_peak_bytes
    # the CUDA default (a stand-in device: the rule, not a GPU): 10% of the budget, at least 0.25 GiB
    assert headroom_bytes(None, 8 * GiB, torch.device("cuda")) == int(0.8 * GiB)
    assert headroom_bytes(None, 1 * GiB, torch.device("cuda")) == int(0.25 * GiB)
    assert headroom_bytes(None, 8 * GiB, torch.device("cpu")) == 0


def test_block_times_use_the_devices_clock():
    """Times come from the clock of the network's device (a stand-in clock here: each reading advances 1 s)."""
    from monai_ckpt.profiling import block_costs, device_clock

    ticks = itertools.count()
    costs = block_costs(lambda: CheckpointUNet(**MANY, out_channels=2), (1, 1, 16, 16, 16), repeats=1,
                        clock=lambda: float(next(ticks)))
    assert all(c.forward_s >= 1 and float(c.forward_s).is_integer() for c in costs)
    assert device_clock("cpu") is time.process_time
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        device_clock("meta")


@pytest.mark.parametrize("cli, argv, message", [
    ("benchmark", ["--batch", "-1", "--estimate"], "--batch: must be a positive integer"),
    ("benchmark", ["--batch", "0"], "--batch: must be a positive integer"),
    ("benchmark", ["--steps", "0"], "--steps: must be a positive integer"),
    ("benchmark", ["--in-channels", "0"], "--in-channels: must be a positive integer"),
    ("benchmark", ["--shape", "60", "60", "60"], r"pad to \(64, 64, 64\)"),
    ("plan", ["--budget-gb", "8", "--in-channels", "0"], "--in-channels: must be a positive integer"),
    ("plan", ["--spatial-dims", "2", "--shape", "64", "64", "64", "--budget-gb", "1"], "contradicts --shape"),
    ("plan", ["--budget-gb", "-2"], "--budget-gb: must be a positive number"),
    ("plan", ["--shape", "60", "60", "60", "--budget-gb", "1"], r"pad to \(64, 64, 64\)"),
    ("plan", ["--budget-gb", "1", "--loss", "dicece"], "give --shape"),
])
def test_cli_arguments_are_checked_up_front(capsys, cli, argv, message):
    import monai_ckpt.benchmark
    import monai_ckpt.plan

    with pytest.raises(SystemExit) as exit_:
        {"benchmark": monai_ckpt.benchmark.main, "plan": monai_ckpt.plan.main}[cli](argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()[-1]) > 20
    assert re.search(message, err.strip().splitlines()[-1]), err


# tiny configurations of the newer presets: the plan CLI runs each network's chain through the whole search
TINY_PRESETS = {  # name -> (constructor kwargs for (spatial_dims, in_channels), --shape)
    "segresnet": (lambda dims, c: dict(spatial_dims=dims, init_filters=8, in_channels=c, out_channels=2,
                                       blocks_down=(1, 2), blocks_up=(1,)), ["16", "16", "16"]),
    "attentionunet": (lambda dims, c: dict(spatial_dims=dims, in_channels=c, out_channels=2, channels=(4, 8, 16),
                                           strides=(2, 2)), ["16", "16", "16"]),
    "swinunetr": (lambda dims, c: dict(in_channels=c, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                                       num_heads=(1, 1, 1, 1), window_size=4, spatial_dims=dims), ["128", "128"]),
}


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_plan_cli_runs_for_each_network(name, capsys, tmp_path, monkeypatch):
    """`python -m monai_ckpt.plan --network X --shape ... --budget-gb ...` on a tiny configuration of each preset
    (the largest-batch search is stubbed: `test_capacity_search_finds_the_boundary` covers it): the plan fits, and
    its predicted peak is the real network's measured peak with that policy."""
    import monai_ckpt.plan
    from monai_ckpt.networks import presets

    parent, child, _ = presets.NETWORKS[name]
    make_kwargs, shape = TINY_PRESETS[name]
    monkeypatch.setitem(presets.NETWORKS, name, (parent, child, make_kwargs))
    monkeypatch.setattr(monai_ckpt.plan, "max_batch_size", lambda *a, **k: 1)
    net = presets.network_factory(name, len(shape), 1)()
    input_shape = (1, 1, *map(int, shape))
    budget = 0.9 * _measured(net, "none", input_shape, estimate=True) / GiB  # below the plain peak: a plan is needed
    assert monai_ckpt.plan.main(["--network", name, "--budget-gb", str(budget), "--shape", *shape, "--json",
                                 str(tmp_path / "plan.json")]) == 0
    assert "plan: peak" in capsys.readouterr().out
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["fits"] is True and written["policy"] != "none" and written["predicted_peak_bytes"] <= budget * GiB
    assert written["predicted_peak_bytes"] == _measured(net, written["policy"], input_shape)
