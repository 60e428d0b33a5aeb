"""The drop-in contract of DESIGN.md, for every checkpoint-aware network against its MONAI parent."""

import re

import pytest
import torch
from monai.networks import eval_mode
from monai.networks.nets import DynUNet, UNet, VNet

from monai_ckpt import CheckpointDynUNet, CheckpointUNet, CheckpointVNet, InputShapeError
from helpers import (
    assert_plain_forward_outside_training, assert_same_training, assert_same_under_autocast,
    assert_scripts_like_parent, backward_calls, count_conv_calls, loss_of, make_pair,
)


def _dyn(ds=False, n=1, res=False, dims=3, norm="batch"):
    return dict(spatial_dims=dims, in_channels=2, out_channels=3, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                upsample_kernel_size=[2] * 4, filters=[4, 8, 16, 32, 64], deep_supervision=ds, deep_supr_num=n,
                res_block=res, dropout=0.1, norm_name=norm)


# name -> (parent, child, kwargs, input shape (B, C, *spatial))
CASES = {
    "unet3d": (UNet, CheckpointUNet, dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                                          strides=(2, 2), num_res_units=2, norm="batch", dropout=0.2), (2, 1, 16, 16, 16)),
    "unet2d": (UNet, CheckpointUNet, dict(spatial_dims=2, in_channels=2, out_channels=3, channels=(4, 8, 16, 32),
                                          strides=(2, 2, 1)), (2, 2, 32, 32)),
    "vnet3d": (VNet, CheckpointVNet, dict(spatial_dims=3, in_channels=1, out_channels=2), (2, 1, 16, 16, 16)),
    "vnet2d": (VNet, CheckpointVNet, dict(spatial_dims=2, in_channels=2, out_channels=3, act="prelu",
                                          dropout_prob_down=0.3, dropout_dim=2), (2, 2, 32, 32)),
    "dynunet": (DynUNet, CheckpointDynUNet, _dyn(), (2, 2, 16, 16, 16)),
    "dynunet2d-res": (DynUNet, CheckpointDynUNet, _dyn(res=True, dims=2, norm="instance"), (2, 2, 32, 32)),
    "dynunet-ds1": (DynUNet, CheckpointDynUNet, _dyn(ds=True, n=1), (2, 2, 16, 16, 16)),
    "dynunet-ds3-res": (DynUNet, CheckpointDynUNet, _dyn(ds=True, n=3, res=True), (2, 2, 16, 16, 16)),
    "dynunet-ds2": (DynUNet, CheckpointDynUNet, _dyn(ds=True, n=2, norm="instance"), (2, 2, 32, 32, 32)),
}
POLICIES = ["none", "all", "blocks", "encoder", "decoder", "bottleneck", "head", "sqrt", "cheap", "offload", {"every": 2},
            {"segments": 2}, {"segments": 1}]


def make(case, policy="all"):
    parent_cls, child_cls, kw, shape = CASES[case]
    return (*make_pair(parent_cls, child_cls, kw, policy), shape)


@pytest.mark.parametrize("case", CASES)
def test_same_state_dict_keys_and_parameter_names(case):
    parent, child, shape = make(case)
    assert list(child.state_dict()) == list(parent.state_dict())
    assert [n for n, _ in child.named_parameters()] == [n for n, _ in parent.named_parameters()]
    plain = CASES[case][0](**CASES[case][2])
    plain.load_state_dict(child.state_dict(), strict=True)


# VNet's constructor has no width: in 3D its 45M parameters make each case seconds; its chain is VNet 2D's, which
# runs every policy
_VNET3D_POLICIES = ("none", "all", "blocks", "cheap", "offload")


@pytest.mark.parametrize("case, policy", [pytest.param(c, p, id=f"{c}-{p}") for c in CASES for p in POLICIES
                                          if c != "vnet3d" or p in _VNET3D_POLICIES])
def test_training_parity_is_exact(case, policy):
    """Outputs, gradients, weights and norm buffers after 3 SGD steps with dropout: bit-identical."""
    parent, child, shape = make(case, policy)
    inputs = [torch.randn(*shape) for _ in range(3)]
    assert_same_training(parent, child, inputs)


@pytest.mark.parametrize("case", CASES)
def test_training_parity_with_groups_of_blocks(case):
    """Runs of blocks, within a segment and across segments, as the planner chooses them: bit-identical."""
    parent, child, shape = make(case, "none")
    blocks = [b for s in child.checkpoint_segments() for b in s.blocks]
    assert len(blocks) >= 7
    child.checkpoint_policy = [blocks[0:2], {"names": [blocks[3:6]], "mode": "cheap"}, blocks[-1]]
    assert [(g.names, g.mode) for g in child.checkpoint_groups()] == [
        (tuple(blocks[0:2]), "full"), (tuple(blocks[3:6]), "cheap"), ((blocks[-1],), "full")]
    inputs = [torch.randn(*shape) for _ in range(3)]
    assert_same_training(parent, child, inputs)


@pytest.mark.parametrize("case", ["dynunet-ds1", "dynunet-ds2", "dynunet-ds3-res"])
@pytest.mark.parametrize("policy", ["all", "head", "sqrt", {"segments": 1}, "cheap"], ids=str)
def test_deep_supervision_heads_get_their_gradient(case, policy):
    parent, child, shape = make(case, policy)
    x = torch.randn(*shape)
    for net in (parent, child):
        torch.manual_seed(5)
        out = net(x)
        assert out.shape[1] == 1 + net.deep_supr_num
        loss_of(out).backward()
    for p, c in zip(parent.deep_supervision_heads.parameters(), child.deep_supervision_heads.parameters()):
        assert c.grad is not None and c.grad.abs().sum() > 0
        assert torch.equal(c.grad, p.grad)
    for p, c in zip(parent.heads, child.heads):  # the parent's side-effect list is filled the same way
        assert torch.equal(p, c)


def test_reentrant_checkpointing_loses_the_deep_supervision_gradient():
    """The known failure our chain avoids: heads written into a list inside a reentrant checkpoint get no
    gradient at all, silently."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    parent, _, shape = make("dynunet-ds2")
    inner = parent.skip_layers

    class Reentrant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch_checkpoint(self.inner, x, use_reentrant=True)

    parent.skip_layers = Reentrant()
    x = torch.randn(*shape, requires_grad=True)
    loss_of(parent(x)).backward()
    assert all(p.grad is None for p in parent.deep_supervision_heads.parameters())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("policy", ["all", "blocks", "sqrt", {"segments": 1}], ids=str)
def test_each_conv_runs_at_most_twice(case, policy):
    _, child, shape = make(case, policy)
    x = torch.randn(*shape)
    counts = count_conv_calls(child, lambda: loss_of(child(x)).backward())
    assert max(counts.values()) == 2 and min(counts.values()) >= 1
    child.checkpoint_policy = "none"
    assert set(count_conv_calls(child, lambda: loss_of(child(x)).backward()).values()) == {1}


@pytest.mark.parametrize("case", CASES)
def test_eval_no_grad_and_inference_are_the_plain_forward(case, monkeypatch):
    parent, child, shape = make(case)
    assert_plain_forward_outside_training(parent, child, torch.randn(*shape), monkeypatch)


@pytest.mark.parametrize("case", CASES)
def test_torchscript_exports_the_plain_network(case):
    parent, child, shape = make(case, "cheap")
    assert_scripts_like_parent(parent, child, torch.randn(*shape))


# VNet in 2D: its 3D defaults (5x5x5 convolutions, 16-256 channels) took 28-38 s a case under bf16 on a CPU without
# native bf16 (AVX2), the same code paths
@pytest.mark.parametrize("case", ["unet3d", "vnet2d", "dynunet-ds2"])
@pytest.mark.parametrize("policy", ["all", "cheap"])
def test_autocast_bf16_matches_parent(case, policy):
    parent, child, shape = make(case, policy)
    assert_same_under_autocast(parent, child, torch.randn(*shape))


@pytest.mark.parametrize("case", CASES)
def test_segments_have_names_levels_and_kinds(case):
    _, child, _ = make(case)
    segs = child.checkpoint_segments()
    names = [s.name for s in segs]
    assert len(set(names)) == len(names)
    assert names[0] == "encoder0" and "bottleneck" in names
    kinds = [s.kind for s in segs]
    assert kinds.index("bottleneck") == max(i for i, k in enumerate(kinds) if k == "encoder") + 1
    assert all(s.level >= 0 for s in segs)
    if "dynunet-ds" in case:
        heads = [n for n in names if n.startswith("head") and n != "head0"]
        assert len(heads) == child.deep_supr_num
    child.checkpoint_policy = "head"
    assert {g.names[0] for g in child.checkpoint_groups()} <= {n for n in names if n.startswith("head")}


@pytest.mark.parametrize("case", CASES)
def test_bad_policy_and_input_shape_are_clear_errors(case):
    parent_cls, child_cls, kw, shape = CASES[case]
    with pytest.raises(ValueError, match="valid policies are"):
        child_cls(**kw, checkpoint_policy="fastest")
    with pytest.raises(ValueError, match=r"its segments are \['encoder0'"):
        child_cls(**kw, checkpoint_policy=["encoder0", "decoder42"])
    net = child_cls(**kw)
    bad = (shape[0], shape[1] + 1, *shape[2:])
    with pytest.raises(ValueError, match=rf"expects an input of shape \(batch, {shape[1]}, .*got {tuple(bad)}".replace("(", r"\(").replace(")", r"\)").replace(r"\\(", r"\(").replace(r"\\)", r"\)")):
        net(torch.randn(*bad))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", [8, 12, 15, 16, 18, 20, 24, 30, 32])
def test_input_size_check_agrees_with_the_parent(case, size):
    """In training we reject exactly the spatial sizes the parent cannot run, with an error that says what would be
    right and that code written for the parent still catches (a RuntimeError too); outside training the parent's
    forward runs untouched: the same output, or the parent's own error."""
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
        with pytest.raises(InputShapeError, match=r"cannot take spatial size .* must be a multiple of .* e\.g\. pad to") as ours:
            child.train()(x)
        assert isinstance(ours.value, ValueError) and isinstance(ours.value, RuntimeError)
    else:
        torch.testing.assert_close(child(x), expected, atol=0, rtol=0)
        assert child.train()(x).shape == parent.train()(x).shape


def test_eval_error_of_an_ill_shaped_input_is_the_parents():
    """MONAI's tests/networks/nets/test_unet.py (test_ill_input_shape), on the subclass: eval mode raises the
    parent's RuntimeError; training raises ours, which the same except clause catches."""
    net = CheckpointUNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(16, 32, 64), strides=(2, 2))
    with eval_mode(net):
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            net.forward(torch.randn(2, 1, 16, 5))
    with pytest.raises(RuntimeError, match=r"cannot take spatial size \(16, 5\).*pad to \(16, 8\)"):
        net.train().forward(torch.randn(2, 1, 16, 5))


def test_vnet_deprecated_dropout_prob_behaves_like_the_parent():
    """MONAI maps the deprecated float `dropout_prob` onto the tuple `dropout_prob_up` and fails: so do we."""
    outcomes = []
    for cls in (VNet, CheckpointVNet):
        with pytest.warns(FutureWarning, match="dropout_prob"), pytest.raises(TypeError) as e:
            cls(spatial_dims=2, dropout_prob=0.2)
        outcomes.append(str(e.value))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("parent_cls, child_cls, bad", [
    (UNet, CheckpointUNet, dict(channels=(4,), strides=())),
    (UNet, CheckpointUNet, dict(channels=(4, 8, 16), strides=(2,))),
    (UNet, CheckpointUNet, dict(channels=(4, 8), strides=(2,), kernel_size=(3, 3))),
    (DynUNet, CheckpointDynUNet, dict(kernel_size=[3] * 2, strides=[1, 2], upsample_kernel_size=[2])),
    (DynUNet, CheckpointDynUNet, dict(kernel_size=[3] * 4, strides=[1, 2, 2], upsample_kernel_size=[2] * 3)),
    (DynUNet, CheckpointDynUNet, dict(kernel_size=[3] * 4, strides=[1, 2, 2, 2], upsample_kernel_size=[2] * 3,
                                      deep_supervision=True, deep_supr_num=3)),
    (VNet, CheckpointVNet, dict(in_channels=3)),
], ids=str)
def test_constructor_errors_match_parent(parent_cls, child_cls, bad):
    kw = dict(spatial_dims=3, in_channels=1, out_channels=2)
    kw.update(bad)
    with pytest.raises(ValueError) as expected:
        parent_cls(**kw)
    with pytest.raises(ValueError) as got:
        child_cls(**kw)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("res", [False, True], ids=["basic-blocks", "residual-blocks"])
def test_dynunet_instance_norm_in_place_steps_copy_nothing(res):
    """With instance norm (a view of batch norm's output) the parent's in-place leaky ReLU, and a residual block's
    ``out += residual``, take their backward through the view's base (CopySlices: new_empty_strided and a clone,
    two tensors of the activation's size); ours run on the base and copy nothing, and training stays bit-identical."""
    kw = _dyn(res=res, norm="instance")
    x = torch.randn(2, 2, 32, 32, 32)  # 16^3 would leave the deepest level one voxel
    for policy in ("all", "cheap"):
        parent, child = make_pair(DynUNet, CheckpointDynUNet, kw, policy)
        assert_same_training(parent, child, [torch.randn(2, 2, 32, 32, 32) for _ in range(2)])
        assert backward_calls(parent, x).names.count("aten.new_empty_strided.default") >= 2 * (2 + res)
        assert "aten.new_empty_strided.default" not in backward_calls(child, x).names
