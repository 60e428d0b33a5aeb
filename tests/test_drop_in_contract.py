"""The drop-in contract of DESIGN.md, for every checkpoint-aware network against its MONAI parent, on every case of
`networks_registry.CASES` (each registered network's small configuration, then more configurations of each).

Same constructor (signature, errors), state_dict keys and parameter names; bit-identical training (outputs,
gradients, weights, norm buffers; dropout, attention dropout and stochastic depth included) under every policy, for
groups of blocks and deep-supervision heads; each convolution at most twice per step; the parent's forward outside
training and under TorchScript; bf16 autocast; named segments; clear errors for a bad policy or input; the input
check that refuses exactly what the parent cannot train on. What only one network has: test_<network>.py; MONAI's
own test grids: test_monai_network_cases.py; MetaTensor batches and the parents' default configurations:
test_metatensor_and_defaults.py.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from monai.networks.nets import (
    AttentionUnet, BasicUNet, BasicUNetPlusPlus, DynUNet, SegResNet, SegResNetDS, SwinUNETR, UNet, VNet,
)

from monai_ckpt import (
    CheckpointAttentionUnet, CheckpointBasicUNet, CheckpointBasicUNetPlusPlus, CheckpointDynUNet, CheckpointSegResNet,
    CheckpointSegResNetDS, CheckpointSwinUNETR, CheckpointUNet, CheckpointVNet, InputShapeError,
)
from helpers import (
    assert_plain_forward_outside_training, assert_same_constructor_error,
    assert_same_signature_plus_keyword_only_policy, assert_same_training, assert_same_under_autocast,
    assert_scripts_like_parent, assert_trains_like, count_conv_calls, loss_of, make_pair, train_steps, trained,
)
from networks_registry import CASES, REGISTRY, basic_unet_kwargs, make, segresnet_kwargs, swin_kwargs

POLICIES = ["none", "all", "blocks", "encoder", "decoder", "bottleneck", "head", "sqrt", "cheap", "offload",
            {"every": 2}, {"segments": 2}, {"segments": 1}]
# every policy on UNet, VNet and DynUNet (each case), and on one SegResNet and the UNet++ case (its graph of dense
# skips); the policies know no network: "all", "blocks" and "cheap" on the other cases. A 3D Swin step costs most:
# the contract's other checks run on the 2D Swin cases.
EVERY_POLICY = ("unet3d", "unet2d", "vnet2d", "dynunet", "dynunet2d-res", "dynunet-ds1", "dynunet-ds3-res",
                "dynunet-ds2", "segresnet3d", "unetpp2d-ds")
SWIN3D = ("swin3d", "swin3d-own-checkpoint")
SOME = ["all", "blocks", "cheap"]
PARITY = ([(c, p) for c in EVERY_POLICY for p in POLICIES] + [("attunet3d", {"segments": 1}),
                                                               ("swin2d-v2-instance", "offload")]
          + [(c, p) for c in CASES if c not in EVERY_POLICY + SWIN3D for p in SOME]
          + [("swin3d", "all"), ("swin3d-own-checkpoint", "none"), ("swin3d-own-checkpoint", "all")]
          + [("basicunet1d-nontrainable", "offload"), ("segresnetds3d-ds", "sqrt"), ("segresnetds3d-ds", {"segments": 1})])
LIGHT = [c for c in CASES if c not in SWIN3D]
# the networks whose tests were written first (UNet, VNet, DynUNet) check a few things on more policies and sizes
FIRST = [c for c in CASES if CASES[c].parent in (UNet, VNet, DynUNet)]


@functools.cache
def _inputs(case: str, steps: int = 2) -> tuple[torch.Tensor, ...]:
    shape = CASES[case].shape
    return tuple(torch.randn(*shape, generator=torch.Generator().manual_seed(100 + i)) for i in range(steps))


@functools.cache
def _parent_training(case: str):  # noqa: ANN202
    """The parent's two training steps on the case's inputs, once for every policy compared with it."""
    return trained(make(case, "none")[0], list(_inputs(case)))


@pytest.mark.parametrize("case", CASES)
def test_same_state_dict_keys_and_parameter_names(case):
    parent, child, shape = make(case)
    assert list(child.state_dict()) == list(parent.state_dict())
    assert [n for n, _ in child.named_parameters()] == [n for n, _ in parent.named_parameters()]
    CASES[case].parent(**CASES[case].kwargs).load_state_dict(child.state_dict(), strict=True)


@pytest.mark.parametrize("case, policy", PARITY, ids=str)
def test_training_parity_is_exact(case, policy):
    """Outputs, gradients, weights and norm buffers after 2 SGD steps with dropout (Swin: dropout, attention dropout
    and stochastic depth; BatchNorm in the 3D cases): bit-identical. (SwinUNETR with ``normalize=False`` too: its
    skips' CNN encoders run after the Swin stages, as in the parent, so every gradient is summed from its users in
    the parent's order.)"""
    _, child, _ = make(case, policy)
    assert_trains_like(_parent_training(case), child, list(_inputs(case)))


GROUPS_OF_BLOCKS = [(c, 0) for c in FIRST] + [(c, 1) for c in ("segresnet2d-instance-pixelshuffle",
                                                               "swin2d-v2-instance", "attunet3d", "unetpp2d-ds")]


@pytest.mark.parametrize("case, start", GROUPS_OF_BLOCKS, ids=[c for c, _ in GROUPS_OF_BLOCKS])
def test_training_parity_with_groups_of_blocks(case, start):
    """Runs of blocks, within a segment and across segments, as the planner chooses them: bit-identical."""
    _, child, _ = make(case, "none")
    blocks = [b for s in child.checkpoint_segments() for b in s.blocks]
    assert len(blocks) >= 7
    child.checkpoint_policy = [blocks[start:start + 2], {"names": [blocks[start + 3:start + 6]], "mode": "cheap"},
                               blocks[-1]]
    assert [(g.names, g.mode) for g in child.checkpoint_groups()] == [
        (tuple(blocks[start:start + 2]), "full"), (tuple(blocks[start + 3:start + 6]), "cheap"), ((blocks[-1],), "full")]
    assert_trains_like(_parent_training(case), child, list(_inputs(case)))


@pytest.mark.parametrize("case", ["unetpp2d-ds", "segresnetds3d-ds"])
def test_every_deep_supervision_head_gets_the_parents_gradient(case):
    """Each head of a list output is an output of its checkpoint: with a loss on one head at a time, the weights get
    exactly the parent's gradient (a head computed inside a checkpoint as a side effect would get none). (DynUNet's
    stacked heads: test_dynunet.py.)"""
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


def test_helpers_train_lists_of_heads():
    """train_steps trains every head of a list output (SegResNetDS's are of several sizes)."""
    _, child, shape = make("segresnetds3d-ds")
    outs = train_steps(child, [torch.randn(*shape)])
    assert outs[0].numel() == sum(o.numel() for o in child(torch.randn(*shape)))


def _unused_convolutions(case: str) -> set[str]:
    """Convolutions the parent has but never runs: SegResNet's conv_final without use_conv_final, UNet++'s three
    extra heads without deep supervision (the parent runs them and drops their outputs; we do not run them)."""
    parent_cls, _, kw, _ = CASES[case]
    if parent_cls is SegResNet and not kw.get("use_conv_final", True):
        return {"conv_final.2.conv"}
    if parent_cls is BasicUNetPlusPlus and not kw.get("deep_supervision"):
        return {f"final_conv_0_{j}" for j in (1, 2, 3)}
    return set()


CONV_COUNTS = [(c, p) for c in FIRST for p in ("all", "blocks", "sqrt", {"segments": 1})] + [
    (c, "blocks") for c in LIGHT if c not in FIRST]


@pytest.mark.parametrize("case, policy", CONV_COUNTS, ids=str)
def test_each_conv_runs_at_most_twice(case, policy):
    """Once in the forward, at most once more in backward, and a convolution the parent never runs is not run either.
    A block that ends with its convolution may not rerun it at all: torch's recomputation stops once it has every
    saved tensor back (the convolution's input); SegResNetDS's blocks all end so."""
    _, child, shape = make(case, policy)
    x = torch.randn(*shape)
    counts = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    child.checkpoint_policy = "none"
    plain = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    unused = _unused_convolutions(case)
    assert {n for n, c in plain.items() if c == 0} <= unused and set(plain.values()) <= {0, 1}
    assert all(counts[n] == 0 for n in unused if n in counts)
    assert 2 in counts.values() or case == "segresnet2d-no-final" or CASES[case].parent is SegResNetDS
    assert all(plain[n] <= counts[n] <= 2 * plain[n] for n in plain if n not in unused)
    if case in FIRST:
        assert min(counts.values()) >= 1 and max(counts.values()) == 2 and set(plain.values()) == {1}


@pytest.mark.parametrize("case", LIGHT)
def test_eval_no_grad_and_inference_are_the_plain_forward(case, monkeypatch):
    parent, child, shape = make(case)
    assert_plain_forward_outside_training(parent, child, torch.randn(*shape), monkeypatch)


SCRIPTED = FIRST + ["segresnet3d", "segresnet2d-no-final", "swin2d-v2-instance", "attunet2d", "basicunet2d-pixelshuffle",
                    "unetpp2d-ds", "segresnetds3d-ds"]


@pytest.mark.parametrize("case", SCRIPTED)
def test_torchscript_exports_the_plain_network_where_the_parent_scripts(case):
    parent, child, shape = make(case, "cheap")
    assert_scripts_like_parent(parent, child, torch.randn(*shape))


# VNet in 2D: its 3D defaults (5x5x5 convolutions, 16-256 channels) took 28-38 s a case under bf16 on a CPU without
# native bf16 (AVX2), the same code paths
@pytest.mark.parametrize("case", ["unet3d", "vnet2d", "dynunet-ds2", "segresnet3d", "swin2d-v2-instance", "attunet3d",
                                  "basicunet3d", "unetpp2d-ds", "segresnetds3d-ds"])
@pytest.mark.parametrize("policy", ["all", "cheap"])
def test_autocast_bf16_matches_parent(case, policy):
    parent, child, shape = make(case, policy)
    assert_same_under_autocast(parent, child, torch.randn(*shape))


@pytest.mark.parametrize("case", LIGHT)
def test_segments_have_names_levels_and_kinds(case):
    parent_cls, _, kw, _ = CASES[case]
    _, child, _ = make(case)
    segs = child.checkpoint_segments()
    names = [s.name for s in segs]
    kinds = [s.kind for s in segs]
    assert len(set(names)) == len(names)
    assert set(kinds) <= {"encoder", "bottleneck", "decoder", "head"} and "bottleneck" in kinds
    assert all(s.level >= 0 for s in segs)
    heads = [n for n in names if n.startswith("head")]
    if heads and parent_cls in (UNet, VNet, DynUNet):  # a group per head segment
        child.checkpoint_policy = "head"
        assert {g.names[0] for g in child.checkpoint_groups()} <= set(heads)
    if parent_cls is DynUNet and kw["deep_supervision"]:
        assert len([n for n in heads if n != "head0"]) == child.deep_supr_num
    if parent_cls is BasicUNetPlusPlus:  # the parent's order: each node of the graph as soon as it can run
        assert names[:6] == ["encoder0", "encoder1", "decoder0_1", "encoder2", "decoder1_1", "decoder0_2"]
        assert heads == (["head1", "head2", "head3", "head0"] if kw.get("deep_supervision") else ["head0"])
        return
    decoders = [s.level for s in segs if s.kind == "decoder"]
    assert decoders == sorted(decoders, reverse=True) and decoders[-1] == 0
    if parent_cls is not UNet:  # UNet's last convolution is a block of decoder0
        assert ("head0" in names) == kw.get("use_conv_final", True)
    if parent_cls is SwinUNETR:
        # the patch embedding (level 1) and the Swin stages, then each skip's CNN encoder where its skip is merged
        assert names == ["encoder1", "encoder2", "encoder3", "encoder4", "bottleneck", "decoder4", "skip3", "decoder3",
                         "skip2", "decoder2", "skip1", "decoder1", "skip0", "decoder0", "head0"]
        assert [s.level for s in segs] == [1, 2, 3, 4, 5, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0]
        assert {s.kind for s in segs if s.name.startswith("skip")} == {"encoder"}
        return
    assert names[0] == "encoder0" or (names[0] == "bottleneck" and parent_cls is SegResNetDS)  # no down-sampling
    encoders = [s.level for s in segs if s.kind in ("encoder", "bottleneck")]
    assert encoders == sorted(encoders)
    assert kinds.index("bottleneck") == max([i for i, k in enumerate(kinds) if k == "encoder"], default=-1) + 1


@pytest.mark.parametrize("case", CASES)
def test_bad_policy_and_input_are_clear_errors(case):
    _, child_cls, kw, shape = CASES[case]
    with pytest.raises(ValueError, match="valid policies are"):
        child_cls(**kw, checkpoint_policy="fastest")
    net = child_cls(**kw)
    first = net.checkpoint_segments()[0].name
    with pytest.raises(ValueError, match=rf"its segments are \['{first}'"):
        child_cls(**kw, checkpoint_policy=[first, "decoder42"])
    bad = (shape[0], shape[1] + 1, *shape[2:])
    if kw.get("preprocess") is None:  # with one, the parent checks the preprocessed input: its own error
        with pytest.raises(ValueError, match=re.escape(f"expects an input of shape (batch, {shape[1]}, ") + ".*"
                           + re.escape(f"got {bad}")):
            net(torch.randn(*bad))


SIZES = [(c, s) for c in FIRST for s in (8, 12, 15, 16, 18, 20, 24, 30, 32)] + [
    (c, s) for c in ("segresnet3d", "segresnet2d-instance-pixelshuffle", "swin2d-unnormalized", "attunet2d",
                     "basicunet3d", "unetpp2d-ds", "segresnetds3d-aniso", "segresnetds2d-preprocess")
    for s in (8, 12, 15, 16, 24, 32, 33)]


def _shapes(out) -> list[tuple[int, ...]]:  # noqa: ANN001
    return [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else [tuple(out.shape)]


@pytest.mark.parametrize("case, size", SIZES, ids=str)
def test_input_size_check_agrees_with_the_parent(case, size):
    """Outside training the parent's forward runs untouched: the same output, or the parent's own error. In training
    we reject exactly the spatial sizes the parent cannot run, with an `InputShapeError` that says what would be right
    and that code written for the parent still catches (a ValueError and a RuntimeError; with a SegResNetDS
    preprocess, the parent's own check after it, and its error)."""
    parent_cls, child_cls, kw, shape = CASES[case]
    torch.manual_seed(0)
    parent, child = parent_cls(**kw).eval(), child_cls(**kw).eval()
    child.load_state_dict(parent.state_dict())
    x = torch.randn(2, shape[1], size, *shape[3:])
    try:
        expected = parent(x)
    except (RuntimeError, ValueError) as err:
        with pytest.raises(type(err), match=re.escape(str(err))):
            child(x)
    else:
        assert all(map(torch.equal, child(x) if isinstance(expected, list) else [child(x)],
                       expected if isinstance(expected, list) else [expected]))
    parent.train(), child.train()
    try:
        expected = parent(x)
    except (RuntimeError, ValueError) as err:
        if kw.get("preprocess") is not None:
            with pytest.raises(ValueError, match=re.escape(str(err))):
                child(x)
            return
        refused = r"cannot take spatial size .* must be (a multiple of|at least) .* e\.g\. pad to"
        with pytest.raises(InputShapeError, match=refused) as ours:
            child(x)
        assert isinstance(ours.value, ValueError) and isinstance(ours.value, RuntimeError)
    else:
        assert _shapes(child(x)) == _shapes(expected)


@pytest.mark.parametrize("parent_cls, child_cls, bad", [
    (UNet, CheckpointUNet, dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4,), strides=())),
    (UNet, CheckpointUNet, dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2,))),
    (UNet, CheckpointUNet, dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                                kernel_size=(3, 3))),
    (DynUNet, CheckpointDynUNet, dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 2,
                                      strides=[1, 2], upsample_kernel_size=[2])),
    (DynUNet, CheckpointDynUNet, dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 4,
                                      strides=[1, 2, 2], upsample_kernel_size=[2] * 3)),
    (DynUNet, CheckpointDynUNet, dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 4,
                                      strides=[1, 2, 2, 2], upsample_kernel_size=[2] * 3, deep_supervision=True,
                                      deep_supr_num=3)),
    (VNet, CheckpointVNet, dict(spatial_dims=3, in_channels=3, out_channels=2)),
    (SegResNet, CheckpointSegResNet, dict(spatial_dims=1)),
    (SegResNet, CheckpointSegResNet, dict(norm_name="batch")),
    (SwinUNETR, CheckpointSwinUNETR, dict(in_channels=1, out_channels=2, feature_size=16)),
    (SwinUNETR, CheckpointSwinUNETR, dict(in_channels=1, out_channels=2, drop_rate=1.5)),
    (SwinUNETR, CheckpointSwinUNETR, dict(in_channels=1, out_channels=2, spatial_dims=4)),
    (SegResNetDS, CheckpointSegResNetDS, dict(resolution=(1, -1, 2))),
    (SegResNetDS, CheckpointSegResNetDS, dict(resolution=5)),
    (BasicUNet, CheckpointBasicUNet, dict(features=(4, 4, 8))),
    (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus, dict(spatial_dims=4)),
], ids=str)
def test_constructor_errors_match_parent(parent_cls, child_cls, bad):
    assert_same_constructor_error(parent_cls, child_cls, bad)


@pytest.mark.parametrize("name", REGISTRY)
def test_same_signature_plus_keyword_only_policy(name):
    """Same constructor, argument for argument and default for default, plus keyword-only checkpoint_policy."""
    assert_same_signature_plus_keyword_only_policy(REGISTRY[name].parent, REGISTRY[name].child)


_SINGLE_VOXEL = {
    # the parent fails halfway through the forward with torch's message; ours says which norm and what trains
    "swinunetr-instance": (SwinUNETR, CheckpointSwinUNETR,
                           swin_kwargs(norm_name="instance", drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0),
                           (1, 2, 32, 32, 32), "instance norm"),
    "basicunet-instance": (BasicUNet, CheckpointBasicUNet, basic_unet_kwargs(), (2, 2, 16, 16, 16), "instance norm"),
    "attunet-batch-of-one": (AttentionUnet, CheckpointAttentionUnet,
                             dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2)),
                             (1, 1, 4, 4, 4), "batch norm with a batch of 1"),
}


@pytest.mark.parametrize("case", list(_SINGLE_VOXEL), ids=list(_SINGLE_VOXEL))
def test_a_single_voxel_deepest_level_is_refused_with_a_size_that_trains(case):
    """A size the strides allow but whose deepest level is one voxel: instance norm there (or batch norm at batch
    1) cannot normalise it in training. The parent raises torch's "Expected more than 1 ..." partway through; ours
    raises an InputShapeError (a ValueError too) before the forward that names the norm and a size that trains,
    and that size trains in both."""
    parent_cls, child_cls, kw, shape, norm = _SINGLE_VOXEL[case]
    parent, child = parent_cls(**kw).train(), child_cls(**kw).train()
    with pytest.raises(ValueError, match="Expected more than 1"):
        parent(torch.randn(shape))
    with pytest.raises(InputShapeError, match=f"deepest level is a single voxel .* and {norm} cannot") as refused:
        child(torch.randn(shape))
    suggested = tuple(int(s) for s in re.search(r"such as \(([\d, ]+)\)", str(refused.value)).group(1).split(","))
    assert suggested != shape[2:]
    for net in (parent, child):
        loss_of(net(torch.randn(*shape[:2], *suggested))).backward()


@pytest.mark.parametrize("parent_cls, child_cls, kw, shape", [
    (AttentionUnet, CheckpointAttentionUnet,  # batch norm with a batch of 2: two values per channel
     dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2)), (2, 1, 4, 4, 4)),
    (SegResNet, CheckpointSegResNet, segresnet_kwargs(), (1, 2, 4, 4, 4)),
], ids=["attunet-batch-of-two", "segresnet-group-norm"])
def test_a_single_voxel_deepest_level_that_trains_in_the_parent_trains_in_ours(parent_cls, child_cls, kw, shape):
    x = torch.randn(shape)
    parent, child = make_pair(parent_cls, child_cls, kw, "all")
    assert_same_training(parent, child, [x, x])


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
