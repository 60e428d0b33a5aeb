"""CheckpointUNet specifics, and the anchor it must beat: MONAI's own CheckpointUNet."""

import pytest
import torch
from monai.networks import eval_mode
from monai.networks.nets import UNet
from monai.networks.nets.unet import CheckpointUNet as MonaiCheckpointUNet

from monai_ckpt import CheckpointUNet
from helpers import assert_same_training, conv_kernels, count_conv_calls

CFG = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2,
           norm="batch", dropout=0.2)


def test_weights_load_both_ways_and_give_the_same_outputs():
    torch.manual_seed(0)
    parent, child, other = UNet(**CFG), CheckpointUNet(**CFG), UNet(**CFG)
    child.load_state_dict(parent.state_dict(), strict=True)
    other.load_state_dict(child.state_dict(), strict=True)  # trained with checkpointing, exported plain
    x = torch.randn(2, 1, 16, 16, 16)
    parent.eval(), child.eval(), other.eval()
    assert torch.equal(child(x), parent(x)) and torch.equal(other(x), parent(x))


def test_three_steps_with_mixed_mode_policy_are_exact():
    torch.manual_seed(0)
    parent = UNet(**CFG)
    child = CheckpointUNet(**CFG, checkpoint_policy=[{"kind": "encoder"}, {"names": ["decoder0"], "mode": "cheap"}])
    assert_same_training(parent, child, [torch.randn(2, 1, 16, 16, 16) for _ in range(3)])
    assert all(int(b) == 3 for n, b in child.named_buffers() if n.endswith("num_batches_tracked"))


def test_anisotropic_strides():
    cfg = dict(CFG, channels=(4, 8, 8), strides=((2, 2, 1), 2), num_res_units=1, act="relu")
    torch.manual_seed(0)
    parent, child = UNet(**cfg), CheckpointUNet(**cfg, checkpoint_policy="sqrt")
    assert_same_training(parent, child, [torch.randn(2, 1, 16, 16, 8) for _ in range(2)])
    with pytest.raises(ValueError, match=r"multiple of \(4, 4, 2\)"):
        child(torch.randn(1, 1, 16, 16, 5))


def test_monai_checkpoint_unet_changes_keys():
    """The anchor: MONAI's own CheckpointUNet cannot load plain UNet weights."""
    assert list(MonaiCheckpointUNet(**CFG).state_dict()) != list(UNet(**CFG).state_dict())


def test_monai_checkpoint_unet_nests_recomputation():
    """The anchor fails our check: deeper convs run 3+ times and BatchNorm counts a step twice or more."""
    net = MonaiCheckpointUNet(**CFG)
    x = torch.randn(2, 1, 16, 16, 16)
    counts = count_conv_calls(net, lambda: net(x).square().mean().backward())
    assert max(counts.values()) >= 3
    assert max(int(b) for n, b in net.named_buffers() if n.endswith("num_batches_tracked")) >= 2


def test_segments_and_runtime_policy_switch():
    child = CheckpointUNet(**CFG, checkpoint_policy="none")
    assert [(s.name, s.level, s.kind) for s in child.checkpoint_segments()] == [
        ("encoder0", 0, "encoder"), ("encoder1", 1, "encoder"), ("bottleneck", 2, "bottleneck"),
        ("decoder1", 1, "decoder"), ("decoder0", 0, "decoder"),
    ]
    assert child.checkpoint_groups() == []
    child.checkpoint_policy = {"every": 2}
    assert child.checkpoint_policy == {"every": 2}
    assert [s.parts for s in child.checkpoint_segments()] == [
        ("encoder0.0", "encoder0.1"), ("encoder1.0", "encoder1.1"), ("bottleneck.0", "bottleneck.1"),
        ("decoder1.0", "decoder1.1", "decoder1.2"), ("decoder0.0", "decoder0.1", "decoder0.2")]
    assert [g.names for g in child.checkpoint_groups()] == [
        ("encoder0.0", "encoder0.1", "encoder1.0", "encoder1.1"),
        ("bottleneck.0", "bottleneck.1", "decoder1.0", "decoder1.1", "decoder1.2"),
        ("decoder0.0", "decoder0.1", "decoder0.2")]
    child.checkpoint_policy = "blocks"
    assert len(child.checkpoint_groups()) == 12
    child.checkpoint_policy = "cheap"
    assert {g.mode for g in child.checkpoint_groups()} == {"cheap"}
    with pytest.raises(ValueError, match="'every' must be a positive integer"):
        child.checkpoint_policy = {"every": 0}
    assert child.checkpoint_policy == "cheap"  # a rejected policy leaves the current one in place


def test_cheap_keeps_the_unit_convolutions_not_the_residual_branch():
    """encoder0 of the tiny UNet (ResidualUnit 1->4, stride 2, two subunits) under a cheap checkpoint: at the
    end of the forward it keeps the outputs of its two subunit convolutions (4 x 16^3 floats each) beyond what
    a full checkpoint keeps, not the residual branch's (only the addition reads it, and its backward needs
    neither input); in backward that residual conv is the only convolution run again, and training stays
    bit-identical to the parent."""
    from monai_ckpt.profiling import memory_timeline

    cfg = dict(CFG, norm="instance", dropout=0.0)
    shape = (1, 1, 32, 32, 32)

    def forward_end(mode):
        points = memory_timeline(lambda: CheckpointUNet(**cfg, checkpoint_policy={"names": ["encoder0"], "mode": mode}),
                                 shape, optimizer="sgd")
        return [live for _, live, phase in points if phase == "forward"][-1]

    assert forward_end("cheap") - forward_end("full") == 2 * 4 * 16**3 * 4

    policy = {"names": ["encoder0"], "mode": "cheap"}
    loss = CheckpointUNet(**cfg, checkpoint_policy=policy)(torch.randn(*shape)).sum()
    assert conv_kernels(loss.backward) == [4]  # the residual conv (1 -> 4) alone
    torch.manual_seed(0)
    parent, child = UNet(**cfg), CheckpointUNet(**cfg, checkpoint_policy=policy)
    child.load_state_dict(parent.state_dict())
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


def test_eval_error_of_an_ill_shaped_input_is_the_parents():
    """MONAI's tests/networks/nets/test_unet.py (test_ill_input_shape), on the subclass: eval mode raises the
    parent's RuntimeError; training raises ours, which the same except clause catches."""
    net = CheckpointUNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(16, 32, 64), strides=(2, 2))
    with eval_mode(net):
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            net.forward(torch.randn(2, 1, 16, 5))
    with pytest.raises(RuntimeError, match=r"cannot take spatial size \(16, 5\).*pad to \(16, 8\)"):
        net.train().forward(torch.randn(2, 1, 16, 5))
