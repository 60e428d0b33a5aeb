"""The drop-in contract of DESIGN.md for CheckpointPlainConvUNet and CheckpointResidualEncoderUNet against their
parents, nnU-Net's networks from ``dynamic_network_architectures`` (skipped where it is not installed: ``pip install
monai-ckpt[nnunet]``; CI installs it).

The constructor cases are those nnU-Net's planners write into plans files, shrunk (fewer stages and features, the
same block types, stride patterns and deep supervision): the default planner's PlainConvUNet (3D with an anisotropic
first stage, and 2D), the ResEnc M/L/XL planners' ResidualEncoderUNet (they differ only in patch size: 3D with the
(1, 2, 2) last stride nnU-Net plans for abdominal CT, and 2D), and what nnU-Net's trainer variants and the
constructor also build: batch norm, dropout, ``nonlin_first``, no deep supervision, bottleneck blocks with a stem of
its own width.
"""

import copy
import re

import pytest
import torch

pytestmark = pytest.mark.nnunet  # CI runs these where the optional extra is installed (.ci/run)
pytest.importorskip("dynamic_network_architectures")

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402
from dynamic_network_architectures.building_blocks.residual import BottleneckD  # noqa: E402
from torch import nn  # noqa: E402

from helpers import (  # noqa: E402
    assert_plain_forward_outside_training, assert_same_constructor_error,
    assert_same_signature_plus_keyword_only_policy, assert_same_training, assert_same_under_autocast, backward_calls,
    count_conv_calls, loss_of, make_pair, train_steps,
)
from monai_ckpt.nnunet import CheckpointPlainConvUNet, CheckpointResidualEncoderUNet  # noqa: E402

# what nnU-Net's planners write for every network: conv bias, instance norm, in-place leaky ReLU
NNUNET = dict(conv_bias=True, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
              nonlin_kwargs={"inplace": True}, deep_supervision=True)


def _plain(dims=3, **kw):
    base = dict(input_channels=2, n_stages=4, features_per_stage=(4, 8, 16, 16), conv_op=nn.Conv3d if dims == 3 else
                nn.Conv2d, kernel_sizes=3, strides=(1, 2, 2, 2), n_conv_per_stage=2, num_classes=3,
                n_conv_per_stage_decoder=2, norm_op=nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d, **NNUNET)
    return {**base, **kw}


def _resenc(dims=3, **kw):
    base = _plain(dims, n_conv_per_stage_decoder=1)
    del base["n_conv_per_stage"]
    return {**base, "input_channels": 1, "n_blocks_per_stage": (1, 2, 2, 2), **kw}


# name -> (parent, child, kwargs, input shape (B, C, *spatial))
CASES = {
    "default3d-aniso": (PlainConvUNet, CheckpointPlainConvUNet,
                        _plain(kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                               strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]), (2, 2, 8, 16, 16)),
    "default2d": (PlainConvUNet, CheckpointPlainConvUNet, _plain(2), (2, 2, 16, 16)),
    "resencL3d": (ResidualEncoderUNet, CheckpointResidualEncoderUNet,
                  _resenc(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]), (2, 1, 8, 16, 16)),
    "resencM2d": (ResidualEncoderUNet, CheckpointResidualEncoderUNet, _resenc(2), (2, 1, 16, 16)),
    "plain3d-bn-dropout-nonlin-first": (PlainConvUNet, CheckpointPlainConvUNet,
                                        _plain(n_stages=3, features_per_stage=(4, 8, 8), strides=(1, 2, 2),
                                               norm_op=nn.BatchNorm3d, norm_op_kwargs=None, dropout_op=nn.Dropout3d,
                                               dropout_op_kwargs={"p": 0.2}, nonlin_first=True,
                                               deep_supervision=False), (2, 2, 8, 8, 8)),
    "resenc3d-bottleneck-bn-dropout": (ResidualEncoderUNet, CheckpointResidualEncoderUNet,
                                       _resenc(n_stages=3, features_per_stage=(8, 8, 16), strides=(1, 2, 2),
                                               n_blocks_per_stage=(1, 2, 2), block=BottleneckD, bottleneck_channels=4,
                                               stem_channels=6, norm_op=nn.BatchNorm3d, norm_op_kwargs=None,
                                               dropout_op=nn.Dropout3d, dropout_op_kwargs={"p": 0.2},
                                               deep_supervision=False), (2, 1, 8, 8, 8)),
}
# the policies know no network (tests/test_policies.py): here what the chain of these networks must carry, a group
# per segment, per block (residuals carried across checkpoint boundaries), selective, offloaded, heads alone, groups
# that span the skips' stack, nested recomputation
POLICIES = ["all", "blocks", "cheap", "offload", {"segments": 2}, {"segments": 1, "mode": "nested"}]
PARITY = ([("resencL3d", p) for p in POLICIES] + [("default3d-aniso", p) for p in ("all", "cheap")]
          + [("default2d", "cheap"), ("resencM2d", "all")]
          + [(c, p) for c in ("plain3d-bn-dropout-nonlin-first", "resenc3d-bottleneck-bn-dropout") for p in ("blocks",
                                                                                                            "cheap")])
TWO = ["default3d-aniso", "resenc3d-bottleneck-bn-dropout"]  # both classes, both residual blocks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Feature maps of a few hundred voxels: a second thread only adds its synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(case, policy="all"):
    parent_cls, child_cls, kw, shape = CASES[case]
    return (*make_pair(parent_cls, child_cls, kw, policy), shape)


_PARENT_RUNS: dict = {}


def parent_run(case):
    """The parent's two SGD steps on a case (its initial weights, inputs, outputs, final weights and buffers), run
    once and compared with every policy."""
    if case not in _PARENT_RUNS:
        parent, _, shape = make(case, "none")
        state = copy.deepcopy(parent.state_dict())
        inputs = [torch.randn(*shape) for _ in range(2)]
        outs = train_steps(parent, inputs)
        _PARENT_RUNS[case] = (state, inputs, outs, dict(parent.named_parameters()), dict(parent.named_buffers()))
    return _PARENT_RUNS[case]


@pytest.mark.parametrize("case", CASES)
def test_same_state_dict_keys_and_parameter_names(case):
    """nnU-Net's duplicate keys included (``conv`` and ``all_modules.0``, ``decoder.encoder.*``): checkpoints of
    nnU-Net's plain trainer load into ours and back."""
    parent, child, _ = make(case)
    assert list(child.state_dict()) == list(parent.state_dict())
    assert [n for n, _ in child.named_parameters()] == [n for n, _ in parent.named_parameters()]
    CASES[case][0](**CASES[case][2]).load_state_dict(child.state_dict(), strict=True)


@pytest.mark.parametrize("case, policy", PARITY, ids=str)
def test_training_parity_is_exact(case, policy):
    """Outputs (every deep-supervision head), gradients, weights and norm buffers after 2 SGD steps: bit-identical
    (with dropout, batch norm and nested recomputation where the case has them)."""
    state, inputs, outs, params, buffers = parent_run(case)
    _, child, _ = make(case, policy)
    child.load_state_dict(state)
    for a, b in zip(outs, train_steps(child, inputs), strict=True):
        assert torch.equal(b, a)
    assert all(torch.equal(c, params[n]) for n, c in child.named_parameters())
    assert all(torch.equal(c, buffers[n]) for n, c in child.named_buffers())


@pytest.mark.parametrize("case", ["default2d"])
def test_every_deep_supervision_head_gets_the_parents_gradient(case):
    """Each head is an output of its checkpoint: a loss on one head at a time gives the parent's gradients."""
    parent, child, shape = make(case, "all")
    x = torch.randn(*shape)
    n_heads = len(parent.train()(x))
    assert n_heads == 3
    for k in range(n_heads):
        grads = []
        for net in (parent, child):
            net.zero_grad(set_to_none=True)
            out = net(x)
            assert len(out) == n_heads and [o.shape for o in out] == [o.shape for o in parent(x)]
            loss_of(out[k]).backward()
            grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]), k


def test_deep_supervision_switched_as_nnunet_does_it():
    """nnU-Net sets ``network.decoder.deep_supervision`` between training and validation: the segments and the
    groups of the policy follow, and training stays exact either way."""
    parent, child, shape = make("default2d", "head")
    assert [g.names for g in child.checkpoint_groups()] == [("head2",), ("head1",), ("head0",)]
    for net in (parent, child):
        net.decoder.deep_supervision = False
    assert_same_training(parent, child, [torch.randn(*shape)])
    assert [g.names for g in child.checkpoint_groups()] == [("head0",)]
    for net in (parent, child):
        net.decoder.deep_supervision = True
    assert_same_training(parent, child, [torch.randn(*shape)])
    assert len(child.checkpoint_groups()) == 3


@pytest.mark.parametrize("case", TWO)
def test_each_conv_runs_at_most_twice(case):
    _, child, shape = make(case, "blocks")
    x = torch.randn(*shape)
    counts = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    child.checkpoint_policy = "none"
    plain = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    assert set(plain.values()) <= {0, 1} and 2 in counts.values()
    assert all(plain[n] <= counts[n] <= 2 * plain[n] for n in plain)


@pytest.mark.parametrize("case", TWO)
def test_eval_no_grad_and_inference_are_the_plain_forward(case, monkeypatch):
    parent, child, shape = make(case)
    assert_plain_forward_outside_training(parent, child, torch.randn(*shape), monkeypatch)


@pytest.mark.parametrize("case, policy", [("resencM2d", "cheap"), ("default2d", "all")])
def test_autocast_bf16_matches_parent(case, policy):
    """nnU-Net trains under autocast (fp16 on CUDA; bf16 is the CPU's). In 2D: on this CPU build torch's bf16 Conv3d
    returns garbage weight gradients at tiny sizes (16 channels on 2x2x2, the parent's too)."""
    parent, child, shape = make(case, policy)
    assert_same_under_autocast(parent, child, torch.randn(*shape))


@pytest.mark.parametrize("case", CASES)
def test_segments_have_names_levels_and_kinds(case):
    _, child, _ = make(case)
    segs = child.checkpoint_segments()
    n = child.encoder.stages.__len__()
    heads = [f"head{s}" for s in range(n - 2, 0, -1)] if child.decoder.deep_supervision else []
    decoders = [name for s in range(n - 2, -1, -1) for name in (f"decoder{s}", f"head{s}") if name in heads
                or name.startswith("decoder")]
    assert [s.name for s in segs] == [f"encoder{s}" for s in range(n - 1)] + ["bottleneck", *decoders, "head0"]
    assert [s.level for s in segs if s.kind != "head"] == [*range(n), *range(n - 2, -1, -1)]
    if CASES[case][0] is ResidualEncoderUNet:  # the stem, then each convolution of each residual block
        blocks = CASES[case][2]["n_blocks_per_stage"]
        convs = 3 if CASES[case][2].get("block") is BottleneckD else 2
        assert [len(s.blocks) for s in segs[:n]] == [1 + convs * blocks[0], *[convs * b for b in blocks[1:]]]


@pytest.mark.parametrize("parent, child", [(PlainConvUNet, CheckpointPlainConvUNet),
                                           (ResidualEncoderUNet, CheckpointResidualEncoderUNet)])
def test_same_signature_plus_keyword_only_policy(parent, child):
    assert_same_signature_plus_keyword_only_policy(parent, child)


@pytest.mark.parametrize("parent, child, kw", [
    (PlainConvUNet, CheckpointPlainConvUNet, _plain(n_conv_per_stage=(2, 2))),
    (ResidualEncoderUNet, CheckpointResidualEncoderUNet, _resenc(n_conv_per_stage_decoder=(1, 1))),
], ids=["plain", "resenc"])
def test_constructor_errors_match_parent(parent, child, kw):
    assert_same_constructor_error(parent, child, kw)


def test_bad_policy_and_input_channels_are_clear_errors():
    _, child_cls, kw, shape = CASES["default2d"]
    with pytest.raises(ValueError, match="valid policies are"):
        child_cls(**kw, checkpoint_policy="fastest")
    with pytest.raises(ValueError, match=r"expects an input of shape \(batch, 2, k\*8, k\*8\)"):
        child_cls(**kw)(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("case", ["default3d-aniso", "resencL3d"])
@pytest.mark.parametrize("size", [6, 8])
def test_input_size_check_agrees_with_the_parent(case, size):
    """In training we refuse exactly the sizes the parent cannot run (strides (1, 2, 2) then (2, 2, 2): the first
    spatial size must be a multiple of 4 or 8), saying what would be right."""
    parent_cls, child_cls, kw, shape = CASES[case]
    parent, child = parent_cls(**kw), child_cls(**kw)
    x = torch.randn(2, shape[1], size, *shape[3:])
    try:
        expected = parent(x)
    except (RuntimeError, ValueError):
        with pytest.raises(ValueError, match=r"cannot (take|train on) spatial size .*(pad to|such as)"):
            child(x)
    else:
        assert [o.shape for o in child(x)] == [o.shape for o in expected]


def test_budget_policy_plans_and_trains_like_the_parent():
    """``{"budget_gb": X}`` between the peaks of "all" and of no checkpointing: planned on the first training
    forward, it checkpoints, fits and trains exactly as the parent."""
    from monai_ckpt.profiling import measure_step_memory

    parent, child, shape = make("default2d", "none")
    kw = CASES["default2d"][2]
    peaks = {p: measure_step_memory(lambda p=p: CheckpointPlainConvUNet(**kw, checkpoint_policy=p), shape,
                                    estimate=True).peak for p in ("all", "none")}
    child.checkpoint_policy = {"budget_gb": (peaks["all"] + 0.5 * (peaks["none"] - peaks["all"])) / 2**30}
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])
    plan = child.checkpoint_plan
    assert plan is not None and child.checkpoint_groups() and plan.predicted_peak_bytes < peaks["none"]


def test_in_place_activations_after_instance_norm_copy_nothing():
    """nnU-Net's in-place leaky ReLU and ``out += residual`` after instance norm (a view of batch norm's output): the
    parent's backward goes through the view's base (CopySlices: new_empty_strided and a clone of a feature map); ours
    runs them on the base and copies nothing."""
    parent, child, shape = make("resencL3d", "cheap")
    x = torch.randn(*shape)
    assert "aten.new_empty_strided.default" in backward_calls(parent, x).names
    assert "aten.new_empty_strided.default" not in backward_calls(child, x).names


def test_checkpointing_lowers_the_estimated_peak():
    """Estimate mode (fake tensors) builds nnU-Net's networks and measures them: "all" keeps well under the plain
    peak of the ResEnc network at a patch where activations dominate."""
    from monai_ckpt.profiling import measure_step_memory

    kw = _resenc(features_per_stage=(8, 16, 32, 32), deep_supervision=True)
    peaks = {p: measure_step_memory(lambda p=p: CheckpointResidualEncoderUNet(**kw, checkpoint_policy=p),
                                    (2, 1, 32, 32, 32), estimate=True).peak for p in ("none", "all")}
    assert peaks["all"] < 0.6 * peaks["none"], peaks


def test_compiled_training_equals_the_eager_parent():
    """torch.compile(fullgraph=True) of the ResEnc network with its deep-supervision heads under "cheap" (the merge
    and the in-place steps traced as plain expressions): two SGD steps equal the eager parent's."""
    from test_compile import _FAST, assert_close_training

    kw = _resenc(2, n_stages=3, features_per_stage=(4, 8, 8), strides=(1, 2, 2), n_blocks_per_stage=(1, 2, 2))
    parent, child = make_pair(ResidualEncoderUNet, CheckpointResidualEncoderUNet, kw, "cheap")
    shape = (2, 1, 8, 8)
    torch._dynamo.reset()
    assert_close_training(parent, child, torch.compile(child, fullgraph=True, backend=_FAST), shape)


def test_size_multiple_names_a_size_that_trains():
    _, child, _ = make("default3d-aniso")
    assert child.size_multiple() == (4, 8, 8)
    with pytest.raises(ValueError, match=re.escape("pad to (8, 16, 16)")):
        child(torch.randn(2, 2, 6, 16, 16))


def _nnunet_default(parent: type) -> dict:
    """What nnU-Net's default planners write into a plans file for a 3D network on the smallest patch they plan for
    (32^3: downsampled to 4 voxels a side, four stages): features from 32 doubling, 3^3 kernels, stride 2 from the
    second stage, two convolutions per stage (ResEnc M: its blocks per stage, one convolution per decoder stage),
    deep supervision on. (The parents have no defaults of their own; six stages up to 320 features, the planners'
    configuration for a clinical patch, take 20-45 s a step here: the same code.)"""
    base = dict(input_channels=1, n_stages=4, features_per_stage=(32, 64, 128, 256), conv_op=nn.Conv3d,
                kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, num_classes=2,
                norm_op=nn.InstanceNorm3d, **NNUNET)
    if parent is PlainConvUNet:
        return dict(base, n_conv_per_stage=(2,) * 4, n_conv_per_stage_decoder=(2,) * 3)
    return dict(base, n_blocks_per_stage=(1, 3, 4, 6), n_conv_per_stage_decoder=(1,) * 3)


def _nnunet_network(case: str, shape: tuple[int, ...]):  # noqa: ANN202
    from networks_registry import Network

    parent, child, small, small_shape = CASES[case]
    return Network(parent, child, case, small, small_shape, _nnunet_default(parent), shape)


# the registry's entries for nnU-Net's networks (tests/networks_registry.py holds MONAI's): the default configuration
# at the smallest size it trains on (at 8^3 the deepest level is one voxel, which instance norm cannot normalise)
NNUNET_NETWORKS = {"plainconvunet": _nnunet_network("default3d-aniso", (1, 1, 16, 8, 8)),
                   "residualencoderunet": _nnunet_network("resencL3d", (1, 1, 16, 8, 8))}


@pytest.mark.parametrize("config", ["small", "default"])
@pytest.mark.parametrize("name", NNUNET_NETWORKS)
def test_trains_and_evaluates_on_a_metatensor_batch_as_the_parent(name, config):
    """MONAI's MetaTensor batches (nnU-Net's pipeline hands a plain tensor; a MONAI pipeline around the network a
    MetaTensor): tests/test_metatensor_and_defaults.py's check, on nnU-Net's networks."""
    from test_metatensor_and_defaults import assert_trains_and_evaluates_on_a_metatensor_batch_as_the_parent

    assert_trains_and_evaluates_on_a_metatensor_batch_as_the_parent(NNUNET_NETWORKS[name], config)
