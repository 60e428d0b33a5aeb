"""The drop-in contract of DESIGN.md for CheckpointBasicUNet, CheckpointBasicUNetPlusPlus and CheckpointSegResNetDS
against their MONAI parents (the constructor grids of MONAI's own tests are in test_networks_monai_cases.py).

Cases: 1D/2D/3D, odd edge lengths (UpCat pads), every upsample mode, batch/instance norm, dropout, UNet++ with and
without deep supervision, SegResNetDS with deep supervision, anisotropic resolution, a preprocess and the flat
(no down-sampling) corner case. Sizes are tiny so the file runs in seconds.
"""

import inspect
import re

import pytest
import torch
from monai.networks.nets import BasicUNet, BasicUNetPlusPlus, SegResNetDS
from torch import nn

from monai_ckpt import CheckpointBasicUNet, CheckpointBasicUNetPlusPlus, CheckpointSegResNetDS
from helpers import (
    assert_plain_forward_outside_training, assert_same_training, assert_same_under_autocast,
    assert_scripts_like_parent, count_conv_calls, loss_of, make_pair, train_steps,
)

TINY = (4, 4, 8, 8, 16, 4)


def _bu(**kw):
    return {**dict(spatial_dims=3, in_channels=2, out_channels=3, features=TINY), **kw}


def _ds(**kw):
    return {**dict(spatial_dims=3, init_filters=4, in_channels=2, out_channels=3, blocks_down=(1, 2, 2)), **kw}


# name -> (parent, child, kwargs, input shape (B, C, *spatial))
CASES = {
    "basicunet3d": (BasicUNet, CheckpointBasicUNet, _bu(dropout=0.2, norm="batch"), (2, 2, 16, 16, 17)),
    "basicunet2d-pixelshuffle": (BasicUNet, CheckpointBasicUNet,
                                 _bu(spatial_dims=2, upsample="pixelshuffle", dropout=0.1), (2, 2, 33, 40)),
    "basicunet1d-nontrainable": (BasicUNet, CheckpointBasicUNet, _bu(spatial_dims=1, upsample="nontrainable"),
                                 (2, 2, 35)),
    "unetpp2d-ds": (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus,
                    _bu(spatial_dims=2, deep_supervision=True, norm="batch", dropout=0.2), (2, 2, 33, 40)),
    "unetpp3d": (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus, _bu(upsample="nontrainable", norm="batch"),
                 (2, 2, 16, 17, 16)),
    "segresnetds3d-ds": (SegResNetDS, CheckpointSegResNetDS, _ds(dsdepth=3), (2, 2, 8, 8, 8)),
    "segresnetds3d-aniso": (SegResNetDS, CheckpointSegResNetDS,
                            _ds(blocks_down=(1, 2, 2, 4), dsdepth=4, resolution=(1, 2, 5), norm="instance"),
                            (2, 2, 16, 16, 8)),
    "segresnetds2d-preprocess": (SegResNetDS, CheckpointSegResNetDS,
                                 _ds(spatial_dims=2, preprocess=nn.Tanh(), upsample_mode="nontrainable",
                                     act="leakyrelu", dsdepth=2), (2, 2, 16, 16)),
    "segresnetds2d-flat": (SegResNetDS, CheckpointSegResNetDS, _ds(spatial_dims=2, blocks_down=(1,), norm="instance"),
                           (2, 2, 8, 8)),
}
POLICIES = ["none", "all", "blocks", "encoder", "decoder", "bottleneck", "head", "sqrt", "cheap", "offload",
            {"every": 2}, {"segments": 2}, {"segments": 1}]
SOME = ["all", "blocks", "cheap"]
# every policy on the 2D cases (the policies know no network), the main ones on the others
SWEPT = ("basicunet2d-pixelshuffle", "unetpp2d-ds")
PARITY = ([(c, p) for c in SWEPT for p in POLICIES] + [(c, p) for c in CASES if c not in SWEPT for p in SOME]
          + [("segresnetds3d-ds", "offload"), ("segresnetds3d-ds", "sqrt"), ("segresnetds3d-ds", {"segments": 1})])


def make(case, policy="all"):
    parent_cls, child_cls, kw, shape = CASES[case]
    return (*make_pair(parent_cls, child_cls, kw, policy), shape)


@pytest.mark.parametrize("case", CASES)
def test_same_state_dict_keys_and_parameter_names(case):
    parent, child, _ = make(case)
    assert list(child.state_dict()) == list(parent.state_dict())
    assert [n for n, _ in child.named_parameters()] == [n for n, _ in parent.named_parameters()]
    CASES[case][0](**CASES[case][2]).load_state_dict(child.state_dict(), strict=True)


@pytest.mark.parametrize("case, policy", PARITY, ids=str)
def test_training_parity_is_exact(case, policy):
    """Outputs (every deep-supervision head), gradients, weights and norm buffers after 2 SGD steps with dropout:
    bit-identical."""
    parent, child, shape = make(case, policy)
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


@pytest.mark.parametrize("case", ["unetpp2d-ds", "segresnetds3d-ds"])
def test_every_deep_supervision_head_gets_the_parents_gradient(case):
    """Each head's output is an output of its checkpoint: with a loss on one head at a time, the head's weights get
    exactly the parent's gradient (a head computed inside a checkpoint as a side effect would get none)."""
    parent, child, shape = make(case, "all")
    x = torch.randn(*shape)
    n_heads = len(parent.train()(x))
    assert n_heads > 1
    for k in range(n_heads):
        grads = []
        for net in (parent, child):
            net.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            out = net(x)
            assert len(out) == n_heads and all(o.requires_grad for o in out)
            loss_of(out[k]).backward()
            grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            assert torch.equal(grads[0][name], grads[1][name]), (k, name)


def test_unetplusplus_dense_skips_as_chain_steps():
    """The dense graph as chain steps: a node pops down to the deepest tensor it reads and pushes back what later
    nodes read; a head that reads another tensor than the one before it is preceded by a move (no operator)."""
    _, child, shape = make("unetpp2d-ds", "none")
    steps = child._chain_steps()
    assert [s.block for s in steps if s.emit] == ["head1", "head2.1", "head3.1"]
    assert max(s.pops for s in steps) > 1 and steps[0].pops == 0
    x = torch.randn(*shape)
    counts = count_conv_calls(child, lambda: steps[[s.block for s in steps].index("head2.0")].fn(x, x, x, x))
    assert set(counts.values()) == {0}


@pytest.mark.parametrize("case", ["unetpp2d-ds", "basicunet3d"])
def test_training_parity_with_groups_of_blocks(case):
    """Runs of blocks within and across segments, as the planner chooses them: bit-identical."""
    parent, child, shape = make(case, "none")
    blocks = [b for s in child.checkpoint_segments() for b in s.blocks]
    child.checkpoint_policy = [blocks[1:4], {"names": [blocks[5:9]], "mode": "cheap"}, blocks[-3:]]
    assert [g.names for g in child.checkpoint_groups()] == [tuple(blocks[1:4]), tuple(blocks[5:9]),
                                                           tuple(blocks[-3:])]
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


@pytest.mark.parametrize("case", CASES)
def test_each_conv_runs_at_most_twice(case):
    _, child, shape = make(case, "blocks")
    x = torch.randn(*shape)
    counts = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    child.checkpoint_policy = "none"
    plain = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    # once in the forward, at most once more in backward. SegResNetDS's blocks end with their convolution, whose
    # input is saved before it runs: torch's recomputation stops there, so they may never rerun it
    assert set(plain.values()) <= {0, 1}
    assert 2 in counts.values() or CASES[case][0] is SegResNetDS
    # UNet++ without deep supervision: the parent runs three heads whose outputs it drops; we do not run them
    unused = {f"final_conv_0_{j}" for j in (1, 2, 3)} if CASES[case][0] is BasicUNetPlusPlus else set()
    if not CASES[case][2].get("deep_supervision"):
        assert all(counts[n] == 0 for n in unused)
        plain = {n: c for n, c in plain.items() if n not in unused}
    assert all(plain[n] <= counts[n] <= 2 * plain[n] for n in plain)


@pytest.mark.parametrize("case", CASES)
def test_eval_no_grad_and_inference_are_the_plain_forward(case, monkeypatch):
    parent, child, shape = make(case)
    assert_plain_forward_outside_training(parent, child, torch.randn(*shape), monkeypatch)


@pytest.mark.parametrize("case", ["basicunet2d-pixelshuffle", "unetpp2d-ds", "segresnetds3d-ds"])
def test_torchscript_where_the_parent_scripts(case):
    parent, child, shape = make(case, "cheap")
    assert_scripts_like_parent(parent, child, torch.randn(*shape))


@pytest.mark.parametrize("case", ["basicunet3d", "unetpp2d-ds", "segresnetds3d-ds"])
@pytest.mark.parametrize("policy", ["all", "cheap"])
def test_autocast_bf16_matches_parent(case, policy):
    parent, child, shape = make(case, policy)
    assert_same_under_autocast(parent, child, torch.randn(*shape))


@pytest.mark.parametrize("case", CASES)
def test_segments_have_names_levels_and_kinds(case):
    _, child, _ = make(case)
    segs = child.checkpoint_segments()
    names = [s.name for s in segs]
    assert len(set(names)) == len(names) and names[0] in ("encoder0", "bottleneck") and names[-1] == "head0"
    assert {s.kind for s in segs} <= {"encoder", "bottleneck", "decoder", "head"}
    encoders = [s.level for s in segs if s.kind in ("encoder", "bottleneck")]
    assert encoders == sorted(encoders)
    if CASES[case][0] is BasicUNetPlusPlus:  # the parent's order: each column of nodes as soon as it can run
        assert names[:6] == ["encoder0", "encoder1", "decoder0_1", "encoder2", "decoder1_1", "decoder0_2"]
        heads = ["head1", "head2", "head3", "head0"] if CASES[case][2].get("deep_supervision") else ["head0"]
        assert [n for n in names if n.startswith("head")] == heads
    else:
        decoders = [s.level for s in segs if s.kind == "decoder"]
        assert decoders == sorted(decoders, reverse=True) and decoders[-1] == 0


def test_budget_policy_plans_and_trains_like_the_parent():
    from monai_ckpt.profiling import measure_step_memory

    case = "basicunet1d-nontrainable"  # instance norm: the planner times a batch of one
    parent, child, shape = make(case, "none")
    kw = CASES[case][2]
    plain = measure_step_memory(lambda: CheckpointBasicUNet(**kw, checkpoint_policy="none"), shape, estimate=True).peak
    least = measure_step_memory(lambda: CheckpointBasicUNet(**kw, checkpoint_policy="all"), shape, estimate=True).peak
    child.checkpoint_policy = {"budget_gb": (least + 0.5 * (plain - least)) / 2**30}
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])
    plan = child.checkpoint_plan
    assert plan.input_shape == shape and plan.policy != "none" and plan.predicted_peak_bytes < plain


@pytest.mark.parametrize("case", CASES)
def test_bad_policy_and_input_are_clear_errors(case):
    _, child_cls, kw, shape = CASES[case]
    with pytest.raises(ValueError, match="valid policies are"):
        child_cls(**kw, checkpoint_policy="fastest")
    net = child_cls(**kw)
    bad = (shape[0], shape[1] + 1, *shape[2:])
    if kw.get("preprocess") is None:  # with one, the parent's check after it: the convolution's own error
        with pytest.raises(ValueError, match=r"expects an input of shape \(batch, 2, "):
            net(torch.randn(*bad))


@pytest.mark.parametrize("case", ["basicunet3d", "unetpp2d-ds", "segresnetds3d-aniso", "segresnetds2d-preprocess"])
@pytest.mark.parametrize("size", [8, 12, 15, 16, 24, 33])
def test_input_size_check_agrees_with_the_parent(case, size):
    """In training we reject exactly the spatial sizes the parent cannot run, saying what would be right."""
    parent_cls, child_cls, kw, shape = CASES[case]
    parent, child = parent_cls(**kw), child_cls(**kw)
    x = torch.randn(2, shape[1], size, *shape[3:])
    try:
        expected = parent(x)
    except (RuntimeError, ValueError) as error:
        # with a preprocess the parent's own check runs after it: the same error; else ours, which says more
        message = re.escape(str(error)) if kw.get("preprocess") is not None else r"cannot take spatial size .* pad to"
        with pytest.raises(ValueError, match=message):
            child(x)
    else:
        got = child(x)
        assert [o.shape for o in got] == [o.shape for o in expected] if isinstance(got, list) else \
            got.shape == expected.shape


def test_basic_unet_size_error_says_at_least_16():
    net = CheckpointBasicUNet(**_bu())
    with pytest.raises(ValueError, match=r"at least 16 .* e\.g\. pad to \(16, 16, 33\)"):
        net(torch.randn(1, 2, 12, 15, 33))


@pytest.mark.parametrize("parent_cls, child_cls, bad", [
    (SegResNetDS, CheckpointSegResNetDS, dict(spatial_dims=4)),
    (SegResNetDS, CheckpointSegResNetDS, dict(resolution=(1, -1, 2))),
    (SegResNetDS, CheckpointSegResNetDS, dict(resolution=5)),
    (BasicUNet, CheckpointBasicUNet, dict(features=(4, 4, 8))),
], ids=str)
def test_constructor_errors_match_parent(parent_cls, child_cls, bad):
    with pytest.raises(Exception) as expected:
        parent_cls(**bad)
    with pytest.raises(expected.type) as got:
        child_cls(**bad)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("parent, child", [(BasicUNet, CheckpointBasicUNet),
                                           (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus),
                                           (SegResNetDS, CheckpointSegResNetDS)])
def test_same_signature_plus_keyword_only_policy(parent, child):
    parent_params = inspect.signature(parent.__init__).parameters
    child_params = inspect.signature(child.__init__).parameters
    assert list(child_params)[:-1] == list(parent_params)
    assert all(child_params[n].default == p.default for n, p in parent_params.items())
    assert child_params["checkpoint_policy"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("case", ["unetpp3d", "segresnetds3d-aniso"])
def test_estimate_mode(case):
    """Fake tensors at a larger size: every segment checkpointed, the peak is well below the parent's (UNet++: the
    tensors its dense skips share pass through the checkpoints as themselves, never copied)."""
    from monai_ckpt.profiling import measure_step_memory

    parent_cls, child_cls, kw, shape = CASES[case]
    big = (1, shape[1], *[2 * s for s in shape[2:]])
    plain = measure_step_memory(lambda: parent_cls(**kw), big, estimate=True)
    ours = measure_step_memory(lambda: child_cls(**kw, checkpoint_policy="all"), big, estimate=True)
    assert 0 < ours.peak < 0.8 * plain.peak


def test_helpers_train_lists_of_heads():
    """train_steps trains every head of a list output (SegResNetDS's are of several sizes)."""
    _, child, shape = make("segresnetds3d-ds")
    outs = train_steps(child, [torch.randn(*shape)])
    assert outs[0].numel() == sum(o.numel() for o in child(torch.randn(*shape)))
