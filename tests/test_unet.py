"""CheckpointUNet against MONAI's UNet: the drop-in contract of DESIGN.md."""

import copy
import io
import sys

import pytest
import torch
from monai.networks.nets import UNet
from monai.networks.nets.unet import CheckpointUNet as MonaiCheckpointUNet

from monai_ckpt import CheckpointUNet
from helpers import assert_same_training, count_conv_calls

POLICIES = ["none", "all", "encoder", "decoder", "bottleneck", "sqrt", "cheap", "offload",
            {"every": 2}, {"segments": 2}, {"segments": 1}, ["encoder0", "decoder0"],
            {"kind": "decoder", "mode": "cheap"}]
CONFIGS = {
    "3d-res-batchnorm-dropout": dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                                     strides=(2, 2), num_res_units=2, norm="batch", dropout=0.2),
    "2d-plain-instance": dict(spatial_dims=2, in_channels=2, out_channels=3, channels=(4, 8, 16, 32),
                              strides=(2, 2, 1), num_res_units=0),
    "3d-aniso-strides": dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 8),
                             strides=((2, 2, 1), 2), num_res_units=1, norm="batch", act="relu"),
}


def make(cfg, policy="all", seed=0):
    torch.manual_seed(seed)
    parent = UNet(**CONFIGS[cfg])
    child = CheckpointUNet(**CONFIGS[cfg], checkpoint_policy=policy)
    return parent, child


def batch(cfg, n=2, size=16):
    c = CONFIGS[cfg]
    return torch.randn(n, c["in_channels"], *([size] * c["spatial_dims"]))


def test_same_names_and_weights_load_both_ways():
    parent, child = make("3d-res-batchnorm-dropout")
    assert list(child.state_dict()) == list(parent.state_dict())
    assert [n for n, _ in child.named_parameters()] == [n for n, _ in parent.named_parameters()]
    assert [n for n, _ in child.named_buffers()] == [n for n, _ in parent.named_buffers()]
    child.load_state_dict(parent.state_dict(), strict=True)
    other = UNet(**CONFIGS["3d-res-batchnorm-dropout"])
    other.load_state_dict(child.state_dict(), strict=True)  # trained with checkpointing, exported plain
    x = batch("3d-res-batchnorm-dropout")
    parent.eval(), child.eval(), other.eval()
    assert torch.equal(child(x), parent(x)) and torch.equal(other(x), parent(x))


def test_monai_checkpoint_unet_changes_keys():
    """The anchor: MONAI's own CheckpointUNet cannot load plain UNet weights."""
    cfg = CONFIGS["3d-res-batchnorm-dropout"]
    assert list(MonaiCheckpointUNet(**cfg).state_dict()) != list(UNet(**cfg).state_dict())


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_training_parity_exact(policy):
    """Outputs, grads, weights and BatchNorm buffers after 3 SGD steps with dropout: bit-identical."""
    parent, child = make("3d-res-batchnorm-dropout", policy)
    inputs = [batch("3d-res-batchnorm-dropout") for _ in range(3)]
    assert_same_training(parent, child, inputs)
    assert all(int(b) == 3 for n, b in child.named_buffers() if n.endswith("num_batches_tracked"))


@pytest.mark.parametrize("cfg", ["2d-plain-instance", "3d-aniso-strides"])
@pytest.mark.parametrize("policy", ["all", "cheap", {"every": 3}])
def test_training_parity_other_configs(cfg, policy):
    parent, child = make(cfg, policy)
    inputs = [batch(cfg) for _ in range(2)]
    assert_same_training(parent, child, inputs)


@pytest.mark.parametrize("policy", ["all", "sqrt", {"segments": 1}, "cheap", "decoder"])
def test_each_conv_runs_at_most_twice(policy):
    _, child = make("3d-res-batchnorm-dropout", policy)
    x = batch("3d-res-batchnorm-dropout")
    counts = count_conv_calls(child, lambda: child(x).square().mean().backward())
    assert max(counts.values()) == 2 and min(counts.values()) >= 1
    child.checkpoint_policy = "none"
    counts = count_conv_calls(child, lambda: child(x).square().mean().backward())
    assert set(counts.values()) == {1}


def test_monai_checkpoint_unet_nests_recomputation():
    """The anchor fails the same check: deeper convs run 3+ times and BatchNorm counts double."""
    cfg = CONFIGS["3d-res-batchnorm-dropout"]
    net = MonaiCheckpointUNet(**cfg)
    x = batch("3d-res-batchnorm-dropout")
    counts = count_conv_calls(net, lambda: net(x).square().mean().backward())
    assert max(counts.values()) >= 3
    assert max(int(b) for n, b in net.named_buffers() if n.endswith("num_batches_tracked")) >= 2


def test_segments_and_runtime_policy_switch():
    _, child = make("3d-res-batchnorm-dropout", "none")
    segs = child.checkpoint_segments()
    assert [(s.name, s.level, s.kind) for s in segs] == [
        ("encoder0", 0, "encoder"), ("encoder1", 1, "encoder"), ("bottleneck", 2, "bottleneck"),
        ("decoder1", 1, "decoder"), ("decoder0", 0, "decoder"),
    ]
    assert child.checkpoint_groups() == []
    child.checkpoint_policy = {"every": 2}
    assert child.checkpoint_policy == {"every": 2}
    assert [g.names for g in child.checkpoint_groups()] == [("encoder0", "encoder1"), ("bottleneck", "decoder1"),
                                                             ("decoder0",)]
    child.checkpoint_policy = "cheap"
    assert {g.mode for g in child.checkpoint_groups()} == {"cheap"}


def _count_checkpoint_calls(monkeypatch):
    module = sys.modules["monai_ckpt.checkpoint"]
    calls = []
    orig = module._torch_checkpoint
    monkeypatch.setattr(module, "_torch_checkpoint", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


def test_eval_and_no_grad_are_the_plain_forward(monkeypatch):
    parent, child = make("3d-res-batchnorm-dropout", "all")
    child.load_state_dict(parent.state_dict())
    calls = _count_checkpoint_calls(monkeypatch)
    x = batch("3d-res-batchnorm-dropout")
    parent.eval(), child.eval()
    assert torch.equal(child(x), parent(x))
    child.train()
    with torch.no_grad():
        child(x)
    with torch.inference_mode():
        child(x)
    assert calls == []
    child(x)
    assert len(calls) == len(child.checkpoint_groups()) == 5


def test_torchscript_and_export_roundtrip():
    parent, child = make("3d-res-batchnorm-dropout", "cheap")
    child.load_state_dict(parent.state_dict())
    scripted = torch.jit.script(child)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf).eval()
    parent.eval()
    x = batch("3d-res-batchnorm-dropout")
    assert torch.equal(loaded(x), parent(x))


@pytest.mark.parametrize("policy", ["all", "cheap"])
def test_autocast_bf16_matches_parent(policy):
    parent, child = make("3d-res-batchnorm-dropout", policy)
    child.load_state_dict(parent.state_dict())
    x = batch("3d-res-batchnorm-dropout")
    outs = []
    for net in (parent, child):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().square().mean().backward()
        outs.append(out)
    assert outs[1].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])
    for p, c in zip(parent.parameters(), child.parameters()):
        assert torch.equal(p.grad, c.grad)


def test_bad_policy_and_segment_name_are_clear_errors():
    cfg = CONFIGS["3d-res-batchnorm-dropout"]
    with pytest.raises(ValueError, match=r"unknown checkpoint_policy 'everything'; valid policies are 'none', 'all'"):
        CheckpointUNet(**cfg, checkpoint_policy="everything")
    with pytest.raises(ValueError, match=r"segment\(s\) \['encoder7'\].*its segments are \['encoder0'"):
        CheckpointUNet(**cfg, checkpoint_policy=["encoder7"])
    net = CheckpointUNet(**cfg)
    with pytest.raises(ValueError, match="'every' must be a positive integer"):
        net.checkpoint_policy = {"every": 0}
    assert net.checkpoint_policy == "all"  # a rejected policy leaves the current one in place


@pytest.mark.parametrize("size", [16, 20, 24, 15, 18, 30, 6])
def test_spatial_size_check_agrees_with_monai(size):
    """Our input check accepts exactly the sizes the parent can run, and says what would be right."""
    cfg = CONFIGS["3d-res-batchnorm-dropout"]
    parent, child = UNet(**cfg).eval(), CheckpointUNet(**cfg).eval()
    x = torch.randn(1, 1, size, 16, 16)
    try:
        parent(x)
        parent_ok = True
    except RuntimeError:
        parent_ok = False
    assert parent_ok == ((-(-size // 2)) % 2 == 0)  # MONAI runs it iff the size after one stride is even
    if parent_ok:
        assert child(x).shape == parent(x).shape
    else:
        with pytest.raises(ValueError, match=r"must be a multiple of \(4, 4, 4\).*e\.g\. pad to \((\d+), 16, 16\)"):
            child(x)


def test_wrong_channels_or_dims_are_clear_errors():
    net = CheckpointUNet(**CONFIGS["3d-res-batchnorm-dropout"])
    with pytest.raises(ValueError, match=r"expects an input of shape \(batch, 1, k\*4, k\*4, k\*4\), got \(1, 3, 16, 16, 16\)"):
        net(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="got \\(1, 1, 16, 16\\)"):
        net(torch.randn(1, 1, 16, 16))


def test_constructor_errors_match_parent():
    for bad in [dict(channels=(4,), strides=()), dict(channels=(4, 8, 16), strides=(2,)),
                dict(channels=(4, 8), strides=(2,), kernel_size=(3, 3))]:
        kw = dict(spatial_dims=3, in_channels=1, out_channels=2, **bad)
        with pytest.raises(ValueError) as expected:
            UNet(**kw)
        with pytest.raises(ValueError, match=str(expected.value).replace("(", r"\(").replace(")", r"\)")):
            CheckpointUNet(**kw)
