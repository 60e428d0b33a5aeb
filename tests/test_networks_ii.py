"""The drop-in contract of DESIGN.md for CheckpointSegResNet, CheckpointSwinUNETR, CheckpointAttentionUnet,
CheckpointBasicUNet, CheckpointBasicUNetPlusPlus and CheckpointSegResNetDS against their MONAI parents
(test_networks_iii.py: what only the last three have; test_networks_monai_cases.py: MONAI's own test grids).

The constructor cases follow MONAI's own tests (tests/networks/nets/test_segresnet.py, test_swin_unetr.py,
test_attentionunet.py; AttentionUnet: 2D and 3D, dropout, kernel sizes, strides of 1):
2D and 3D, group/instance/batch norm, dropout, every upsample mode, ``use_conv_final=False``; Swin with
dropout, attention dropout and stochastic depth, v2 blocks, patch norm, ``normalize=False``, MONAI's own
``use_checkpoint``; BasicUNet/UNet++ in 1D/2D/3D with odd edges (UpCat pads), every upsample mode, UNet++ with and
without deep supervision; SegResNetDS with deep supervision, anisotropic resolution, a preprocess and no
down-sampling at all. Sizes are tiny so the file runs in seconds.
"""

import inspect
import re

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus, SegResNet, SegResNetDS, SwinUNETR
from torch import nn

from monai_ckpt import (
    CheckpointAttentionUnet, CheckpointBasicUNet, CheckpointBasicUNetPlusPlus, CheckpointSegResNet,
    CheckpointSegResNetDS, CheckpointSwinUNETR, InputShapeError,
)
from helpers import (
    assert_plain_forward_outside_training, assert_same_training, assert_same_under_autocast,
    assert_scripts_like_parent, count_conv_calls, loss_of, make_pair,
)


def _seg(**kw):
    base = dict(spatial_dims=3, init_filters=8, in_channels=2, out_channels=3, blocks_down=(1, 2, 2), blocks_up=(1, 1))
    return {**base, **kw}


def _swin(**kw):
    base = dict(in_channels=2, out_channels=3, feature_size=12, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2),
                window_size=4, drop_rate=0.1, attn_drop_rate=0.1, dropout_path_rate=0.2, norm_name="batch")
    return {**base, **kw}


def _bu(**kw):
    return {**dict(spatial_dims=3, in_channels=2, out_channels=3, features=(4, 4, 8, 8, 16, 4)), **kw}


def _ds(**kw):
    return {**dict(spatial_dims=3, init_filters=4, in_channels=2, out_channels=3, blocks_down=(1, 2, 2)), **kw}


# name -> (parent, child, kwargs, input shape (B, C, *spatial))
CASES = {
    "segresnet3d": (SegResNet, CheckpointSegResNet, _seg(dropout_prob=0.2), (2, 2, 8, 8, 12)),
    "segresnet3d-batch-deconv": (SegResNet, CheckpointSegResNet,
                                 _seg(norm="batch", upsample_mode="deconv", act=("leakyrelu", {"inplace": True})),
                                 (2, 2, 8, 8, 8)),
    "segresnet2d-instance-pixelshuffle": (SegResNet, CheckpointSegResNet,
                                          _seg(spatial_dims=2, norm="instance", upsample_mode="pixelshuffle",
                                               blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.1),
                                          (2, 2, 32, 32)),
    "segresnet2d-no-final": (SegResNet, CheckpointSegResNet,
                             _seg(spatial_dims=2, use_conv_final=False, norm_name="group", num_groups=4),
                             (2, 2, 16, 16)),
    "swin3d": (SwinUNETR, CheckpointSwinUNETR, _swin(), (2, 2, 32, 32, 32)),
    "swin3d-own-checkpoint": (SwinUNETR, CheckpointSwinUNETR, _swin(use_checkpoint=True, patch_norm=True),
                              (2, 2, 32, 32, 32)),
    "swin2d-v2-instance": (SwinUNETR, CheckpointSwinUNETR,
                           _swin(spatial_dims=2, use_v2=True, norm_name="instance", downsample="mergingv2"),
                           (2, 2, 64, 64)),
    "swin2d-unnormalized": (SwinUNETR, CheckpointSwinUNETR, _swin(spatial_dims=2, normalize=False, depths=(1, 2, 1, 1),
                                                                  window_size=(4, 8)), (1, 2, 64, 64)),
    "attunet3d": (AttentionUnet, CheckpointAttentionUnet,
                  dict(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                       dropout=0.2), (2, 2, 8, 8, 8)),
    "attunet2d": (AttentionUnet, CheckpointAttentionUnet,
                  dict(spatial_dims=2, in_channels=2, out_channels=3, channels=(4, 8, 16, 16), strides=(2, 2, 1),
                       kernel_size=5, up_kernel_size=5), (2, 2, 16, 16)),
    "basicunet3d": (BasicUNet, CheckpointBasicUNet, _bu(dropout=0.2, norm="batch"), (2, 2, 16, 16, 17)),
    "basicunet2d-pixelshuffle": (BasicUNet, CheckpointBasicUNet,
                                 _bu(spatial_dims=2, upsample="pixelshuffle", dropout=0.1), (2, 2, 33, 40)),
    "basicunet1d-nontrainable": (BasicUNet, CheckpointBasicUNet, _bu(spatial_dims=1, upsample="nontrainable"),
                                 (2, 2, 35)),
    # no norm: the in-place activation overwrites the convolution's output, which "cheap" must then not keep
    "basicunet2d-no-norm": (BasicUNet, CheckpointBasicUNet, _bu(spatial_dims=2, norm=None), (2, 2, 32, 32)),
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
# every policy on one case (the policies know no network), the main ones on the others; a Swin step costs most
SOME = ["all", "blocks", "cheap"]
SWIN3D = ("swin3d", "swin3d-own-checkpoint")  # the contract's other checks run on the 2D Swin cases
SWEPT = ("segresnet3d", "unetpp2d-ds")  # UNet++: its graph of dense skips under every policy
PARITY = ([(c, p) for c in SWEPT for p in POLICIES] + [("attunet3d", {"segments": 1}), ("swin2d-v2-instance", "offload")]
          + [(c, p) for c in CASES if c not in SWEPT + SWIN3D for p in SOME]
          + [("swin3d", "all"), ("swin3d-own-checkpoint", "none"), ("swin3d-own-checkpoint", "all")]
          + [("basicunet1d-nontrainable", "offload"), ("segresnetds3d-ds", "sqrt"), ("segresnetds3d-ds", {"segments": 1})])
LIGHT = [c for c in CASES if c not in SWIN3D]


def make(case, policy="all"):
    parent_cls, child_cls, kw, shape = CASES[case]
    return (*make_pair(parent_cls, child_cls, kw, policy), shape)


@pytest.mark.parametrize("case", CASES)
def test_same_state_dict_keys_and_parameter_names(case):
    parent, child, shape = make(case)
    assert list(child.state_dict()) == list(parent.state_dict())
    assert [n for n, _ in child.named_parameters()] == [n for n, _ in parent.named_parameters()]
    CASES[case][0](**CASES[case][2]).load_state_dict(child.state_dict(), strict=True)


@pytest.mark.parametrize("case, policy", PARITY, ids=str)
def test_training_parity_is_exact(case, policy):
    """Outputs, gradients, weights and norm buffers after 2 SGD steps with dropout (Swin: dropout, attention
    dropout and stochastic depth; BatchNorm in the 3D cases): bit-identical. (SwinUNETR with ``normalize=False``
    too: its skips' CNN encoders run after the Swin stages, as in the parent, so every gradient is summed from its
    users in the parent's order.)"""
    parent, child, shape = make(case, policy)
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


@pytest.mark.parametrize("case", ["segresnet2d-instance-pixelshuffle", "swin2d-v2-instance", "attunet3d",
                                  "unetpp2d-ds"])
def test_training_parity_with_groups_of_blocks(case):
    """Runs of blocks within and across segments, as the planner chooses them: bit-identical."""
    parent, child, shape = make(case, "none")
    blocks = [b for s in child.checkpoint_segments() for b in s.blocks]
    child.checkpoint_policy = [blocks[1:3], {"names": [blocks[4:7]], "mode": "cheap"}, blocks[-1:]]
    assert [g.names for g in child.checkpoint_groups()] == [tuple(blocks[1:3]), tuple(blocks[4:7]), tuple(blocks[-1:])]
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


@pytest.mark.parametrize("case, policy", [
    # AttentionUnet: a decoder's up-convolution, gate, merge convolution and merge norm/activation in groups
    ("attunet3d", [["decoder1.3", "decoder0.0"], {"names": [["decoder0.1", "decoder0.2"]], "mode": "cheap"},
                   "decoder0.3"]),
    # SwinUNETR: a skip's CNN encoder with the decoder before it; a stage's mask-building block on its own; the
    # last stage with the bottleneck's CNN block
    ("swin2d-v2-instance", [["decoder1.1", "skip0"], {"names": ["encoder2.2", "skip1"], "mode": "cheap"},
                            ["bottleneck.1", "bottleneck.2"]]),
], ids=["attunet-decoder-blocks", "swin-skips-and-stages"])
def test_training_parity_with_groups_of_the_new_blocks(case, policy):
    parent, child, shape = make(case, policy)
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


@pytest.mark.parametrize("policy", ["none", "blocks", "all"])
def test_swin_skip_encoders_run_backward_before_the_stages_as_in_the_parent(policy):
    """Each skip's CNN encoder runs where its skip is merged, after the Swin stages as in the parent, so its backward
    comes before theirs. (Run first in the chain, the level-0 skip's gradient, the size of the input times twice
    the feature size, waited through the whole transformer's backward: 6.7 instead of 5.9 GiB with "blocks" for
    the BTCV SwinUNETR at 128^3.)"""
    parent, child, shape = make("swin2d-v2-instance", policy)
    x = torch.randn(*shape)

    def order(net):
        seen = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: seen.append(n)) for n, p in net.named_parameters()
                 if n.startswith(("encoder1.", "encoder2.", "swinViT.layers1.", "swinViT.layers2."))]
        loss_of(net(x)).backward()
        for h in hooks:
            h.remove()
        return seen

    def first(seen, prefix):
        return min(i for i, n in enumerate(seen) if n.startswith(prefix))

    for seen in (order(parent), order(child)):
        assert max(i for i, n in enumerate(seen) if n.startswith(("encoder1.", "encoder2."))) < first(seen, "swinViT.")


def test_swin_own_checkpoint_is_kept_outside_our_checkpoints_and_never_nested():
    """MONAI's use_checkpoint: in force where our policy leaves the Swin blocks alone (policy "none" is the parent
    itself), off inside our checkpoints, so every Swin linear layer runs at most twice per step."""
    _, child, shape = make("swin3d-own-checkpoint", "none")
    assert child.builtin_checkpoint == "swin blocks"
    assert CheckpointSwinUNETR(**_swin()).builtin_checkpoint == "none"
    x = torch.randn(*shape)

    def linear_calls():
        counts = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
                 for n, m in child.named_modules() if isinstance(m, torch.nn.Linear)]
        loss_of(child(x)).backward()
        for h in hooks:
            h.remove()
        return counts

    stage1 = "swinViT.layers1.0.blocks.0.attn.qkv"
    assert linear_calls()[stage1] == 2  # MONAI's own checkpoint recomputes it
    child.checkpoint_policy = "all"
    assert max(linear_calls().values()) == 2  # ours instead, not both (that would be 3)
    child.checkpoint_policy = ["encoder3"]  # ours on stage 2 only: MONAI's still on stage 1
    counts = linear_calls()
    assert counts[stage1] == 2 and counts["swinViT.layers2.0.blocks.0.attn.qkv"] == 2


@pytest.mark.parametrize("case", LIGHT)
@pytest.mark.parametrize("policy", ["blocks"], ids=str)
def test_each_conv_runs_at_most_twice(case, policy):
    _, child, shape = make(case, policy)
    x = torch.randn(*shape)
    counts = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    child.checkpoint_policy = "none"
    plain = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    # once in the forward, at most once more in backward; a conv the parent never runs (SegResNet's conv_final
    # with use_conv_final=False) is not run either. A block that ends with its conv may not rerun it at all:
    # torch's recomputation stops once it has every saved tensor back (the conv's input); SegResNetDS's blocks
    # all end so.
    assert set(plain.values()) <= {0, 1}
    assert 2 in counts.values() or case == "segresnet2d-no-final" or CASES[case][0] is SegResNetDS
    if CASES[case][0] is BasicUNetPlusPlus and not CASES[case][2].get("deep_supervision"):
        # the parent runs three heads whose outputs it drops; we do not run them
        unused = {f"final_conv_0_{j}" for j in (1, 2, 3)}
        assert all(counts[n] == 0 for n in unused)
        plain = {n: c for n, c in plain.items() if n not in unused}
    assert all(plain[n] <= counts[n] <= 2 * plain[n] for n in plain)


@pytest.mark.parametrize("case", LIGHT)
def test_eval_no_grad_and_inference_are_the_plain_forward(case, monkeypatch):
    parent, child, shape = make(case)
    assert_plain_forward_outside_training(parent, child, torch.randn(*shape), monkeypatch)


@pytest.mark.parametrize("case", ["segresnet3d", "segresnet2d-no-final", "swin2d-v2-instance", "attunet2d",
                                  "basicunet2d-pixelshuffle", "unetpp2d-ds", "segresnetds3d-ds"])
def test_torchscript_where_the_parent_scripts(case):
    parent, child, shape = make(case, "cheap")
    assert_scripts_like_parent(parent, child, torch.randn(*shape))


@pytest.mark.parametrize("case", ["segresnet3d", "swin2d-v2-instance", "attunet3d", "basicunet3d", "unetpp2d-ds",
                                  "segresnetds3d-ds"])
@pytest.mark.parametrize("policy", ["all", "cheap"])
def test_autocast_bf16_matches_parent(case, policy):
    parent, child, shape = make(case, policy)
    assert_same_under_autocast(parent, child, torch.randn(*shape))


@pytest.mark.parametrize("case", LIGHT)
def test_segments_have_names_levels_and_kinds(case):
    _, child, _ = make(case)
    segs = child.checkpoint_segments()
    names = [s.name for s in segs]
    assert len(set(names)) == len(names)
    assert {s.kind for s in segs} <= {"encoder", "bottleneck", "decoder", "head"}
    kinds = [s.kind for s in segs]
    if CASES[case][0] is BasicUNetPlusPlus:  # the parent's order: each node of the graph as soon as it can run
        assert names[:6] == ["encoder0", "encoder1", "decoder0_1", "encoder2", "decoder1_1", "decoder0_2"]
        heads = ["head1", "head2", "head3", "head0"] if CASES[case][2].get("deep_supervision") else ["head0"]
        assert [n for n in names if n.startswith("head")] == heads
        return
    decoders = [s.level for s in segs if s.kind == "decoder"]
    assert decoders == sorted(decoders, reverse=True) and decoders[-1] == 0
    assert ("head0" in names) == CASES[case][2].get("use_conv_final", True)
    if CASES[case][0] is SwinUNETR:
        # the patch embedding (level 1) and the Swin stages, then each skip's CNN encoder where its skip is merged
        assert names == ["encoder1", "encoder2", "encoder3", "encoder4", "bottleneck", "decoder4", "skip3", "decoder3",
                         "skip2", "decoder2", "skip1", "decoder1", "skip0", "decoder0", "head0"]
        assert [s.level for s in segs] == [1, 2, 3, 4, 5, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0]
        assert {s.kind for s in segs if s.name.startswith("skip")} == {"encoder"}
        return
    assert names[0] in ("encoder0", "bottleneck")  # bottleneck: no down-sampling
    encoders = [s.level for s in segs if s.kind in ("encoder", "bottleneck")]
    assert encoders == sorted(encoders)
    assert kinds.index("bottleneck") == max([i for i, k in enumerate(kinds) if k == "encoder"], default=-1) + 1


@pytest.mark.parametrize("case", CASES)
def test_bad_policy_and_input_are_clear_errors(case):
    _, child_cls, kw, shape = CASES[case]
    with pytest.raises(ValueError, match="valid policies are"):
        child_cls(**kw, checkpoint_policy="fastest")
    net = child_cls(**kw)
    bad = (shape[0], shape[1] + 1, *shape[2:])
    if kw.get("preprocess") is None:  # with one, the parent checks the preprocessed input: its own error
        with pytest.raises(ValueError, match=r"expects an input of shape \(batch, 2, "):
            net(torch.randn(*bad))


@pytest.mark.parametrize("case", ["segresnet3d", "segresnet2d-instance-pixelshuffle", "swin2d-unnormalized",
                                  "attunet2d", "basicunet3d", "unetpp2d-ds", "segresnetds3d-aniso",
                                  "segresnetds2d-preprocess"])
@pytest.mark.parametrize("size", [8, 12, 15, 16, 24, 32, 33])
def test_input_size_check_agrees_with_the_parent(case, size):
    """In training we reject exactly the spatial sizes the parent cannot run, saying what would be right (with a
    SegResNetDS preprocess, the parent's own check after it, and its error)."""
    parent_cls, child_cls, kw, shape = CASES[case]
    parent, child = parent_cls(**kw), child_cls(**kw)
    x = torch.randn(2, shape[1], size, *shape[3:])
    try:
        expected = parent(x)
    except (RuntimeError, ValueError) as error:
        message = re.escape(str(error)) if kw.get("preprocess") is not None else r"cannot take spatial size .* pad to"
        with pytest.raises(ValueError, match=message):
            child(x)
    else:
        got = child(x)
        shapes = [o.shape for o in got] if isinstance(got, list) else [got.shape]
        assert shapes == ([o.shape for o in expected] if isinstance(expected, list) else [expected.shape])


@pytest.mark.parametrize("parent_cls, child_cls, bad", [
    (SegResNet, CheckpointSegResNet, dict(spatial_dims=1)),
    (SegResNet, CheckpointSegResNet, dict(norm_name="batch")),
    (SwinUNETR, CheckpointSwinUNETR, dict(in_channels=1, out_channels=2, feature_size=16)),
    (SwinUNETR, CheckpointSwinUNETR, dict(in_channels=1, out_channels=2, drop_rate=1.5)),
    (SwinUNETR, CheckpointSwinUNETR, dict(in_channels=1, out_channels=2, spatial_dims=4)),
    (SegResNetDS, CheckpointSegResNetDS, dict(spatial_dims=4)),
    (SegResNetDS, CheckpointSegResNetDS, dict(resolution=(1, -1, 2))),
    (SegResNetDS, CheckpointSegResNetDS, dict(resolution=5)),
    (BasicUNet, CheckpointBasicUNet, dict(features=(4, 4, 8))),
    (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus, dict(spatial_dims=4)),
], ids=str)
def test_constructor_errors_match_parent(parent_cls, child_cls, bad):
    with pytest.raises(Exception) as expected:
        parent_cls(**bad)
    with pytest.raises(expected.type) as got:
        child_cls(**bad)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("parent, child", [(SwinUNETR, CheckpointSwinUNETR), (SegResNet, CheckpointSegResNet),
                                           (AttentionUnet, CheckpointAttentionUnet), (BasicUNet, CheckpointBasicUNet),
                                           (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus),
                                           (SegResNetDS, CheckpointSegResNetDS)])
def test_same_signature_plus_keyword_only_policy(parent, child):
    """Same constructor, argument for argument and default for default, plus keyword-only checkpoint_policy."""
    parent_params = inspect.signature(parent.__init__).parameters
    child_params = inspect.signature(child.__init__).parameters
    assert list(child_params)[:-1] == list(parent_params)
    assert all(child_params[n].default == p.default for n, p in parent_params.items())
    assert child_params["checkpoint_policy"].kind is inspect.Parameter.KEYWORD_ONLY


def test_estimate_mode_builds_swin_outside_fake_mode():
    """SwinUNETR's constructor calls .item(): estimate mode builds it for real and measures a fake replica."""
    from monai_ckpt.profiling import measure_step_memory

    kw = _swin(norm_name="instance")
    plain = measure_step_memory(lambda: SwinUNETR(**kw), (1, 2, 64, 64, 64), estimate=True)
    ours = measure_step_memory(lambda: CheckpointSwinUNETR(**kw, checkpoint_policy="all"), (1, 2, 64, 64, 64),
                               estimate=True)
    assert 0 < ours.peak < 0.8 * plain.peak


_SINGLE_VOXEL = {
    # the parent fails halfway through the forward with torch's message; ours says which norm and what trains
    "swinunetr-instance": (SwinUNETR, CheckpointSwinUNETR, _swin(norm_name="instance", drop_rate=0.0,
                                                                 attn_drop_rate=0.0, dropout_path_rate=0.0),
                           (1, 2, 32, 32, 32), "instance norm"),
    "basicunet-instance": (BasicUNet, CheckpointBasicUNet, _bu(), (2, 2, 16, 16, 16), "instance norm"),
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
    (SegResNet, CheckpointSegResNet, _seg(), (1, 2, 4, 4, 4)),  # group norm normalises over the group's channels
], ids=["attunet-batch-of-two", "segresnet-group-norm"])
def test_a_single_voxel_deepest_level_that_trains_in_the_parent_trains_in_ours(parent_cls, child_cls, kw, shape):
    x = torch.randn(shape)
    parent, child = make_pair(parent_cls, child_cls, kw, "all")
    assert_same_training(parent, child, [x, x])


@pytest.mark.parametrize("parent_cls, child_cls, kw, shape", [
    (SegResNet, CheckpointSegResNet, _seg(norm="instance"), (2, 2, 8, 8, 8)),
    (SwinUNETR, CheckpointSwinUNETR, _swin(norm_name="instance"), (2, 2, 64, 32, 32)),
], ids=["segresnet-instance", "swinunetr-instance"])
def test_in_place_activations_after_instance_norm_copy_nothing(parent_cls, child_cls, kw, shape):
    """SegResNet's in-place ReLU, and the in-place LeakyReLU of SwinUNETR's CNN blocks (DynUNet's blocks), after
    instance norm (a view of batch norm's output): the parent's backward goes through the view's base (CopySlices:
    new_empty_strided and a clone); ours runs them on the base and copies nothing. Training stays bit-identical."""
    from helpers import backward_calls

    parent, child = make_pair(parent_cls, child_cls, kw, "cheap")
    assert_same_training(parent, child, [torch.randn(shape) for _ in range(2)])
    x = torch.randn(shape)
    assert "aten.new_empty_strided.default" in backward_calls(parent, x).names
    assert "aten.new_empty_strided.default" not in backward_calls(child, x).names
