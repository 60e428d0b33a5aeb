"""The primitive, CheckpointedSequential and checkpoint_submodules, against plain PyTorch."""

import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from monai_ckpt import CheckpointedSequential, checkpoint, checkpoint_submodules
from helpers import assert_same_training, conv_kernels, count_conv_calls, train_steps


def block(momentum=0.1):
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4, momentum=momentum), nn.ReLU(inplace=True),
        nn.Dropout3d(0.3), nn.Conv3d(4, 2, 3, padding=1), nn.BatchNorm3d(2, momentum=momentum), nn.PReLU(),
    )


class Wrapped(nn.Module):
    def __init__(self, body, mode="full"):
        super().__init__()
        self.body, self.mode = body, mode

    def forward(self, x):
        return checkpoint(self.body, x, mode=self.mode) if self.training else self.body(x)


@pytest.mark.parametrize("mode", ["full", "cheap", "offload"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpoint_matches_plain_with_batchnorm_and_dropout(mode, momentum):
    plain = block(momentum)
    wrapped = Wrapped(copy.deepcopy(plain), mode)
    inputs = [torch.randn(2, 2, 8, 8, 8) for _ in range(3)]
    # exact: same outputs, grads, params, running stats and num_batches_tracked after 3 steps
    ref = copy.deepcopy(plain)
    outs_r, outs_g = train_steps(ref, inputs), train_steps(wrapped, inputs)
    for a, b in zip(outs_r, outs_g):
        assert torch.equal(a, b)
    for (name, a), b in zip(ref.named_parameters(), wrapped.body.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(ref.state_dict().items(), wrapped.body.state_dict().values()):
        assert torch.equal(a, b), name
    assert int(wrapped.body[1].num_batches_tracked) == 3


def test_instance_norm_with_running_stats_is_counted_once():
    body = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.InstanceNorm3d(3, track_running_stats=True), nn.ReLU())
    ref = copy.deepcopy(body)
    x = torch.randn(2, 2, 8, 8, 8)
    for _ in range(2):
        checkpoint(body, x).sum().backward()
        ref(x).sum().backward()
    for (name, a), b in zip(ref.state_dict().items(), body.state_dict().values()):
        assert torch.equal(a, b), name
    assert body[1].running_mean.abs().sum() > 0
    naive = copy.deepcopy(ref)
    torch_checkpoint(naive, x, use_reentrant=False).sum().backward()  # torch's own: updates them twice
    ref(x).sum().backward()
    assert not torch.equal(naive[1].running_mean, ref[1].running_mean)


def test_plain_torch_checkpoint_double_counts_batchnorm():
    """The hazard the primitive removes: torch's own checkpoint updates BatchNorm twice per step."""
    body = block()
    x = torch.randn(2, 2, 8, 8, 8)
    torch_checkpoint(body, x, use_reentrant=False).sum().backward()
    assert int(body[1].num_batches_tracked) == 2
    body2 = block()
    checkpoint(body2, x).sum().backward()
    assert int(body2[1].num_batches_tracked) == 1


def test_each_conv_recomputed_once_and_cheap_recomputes_no_conv():
    body = block()
    x = torch.randn(2, 2, 8, 8, 8, requires_grad=True)

    def run(mode):
        checkpoint(body, x, mode=mode).sum().backward()

    assert set(count_conv_calls(body, lambda: run("full")).values()) == {2}
    assert set(count_conv_calls(body, lambda: run("offload")).values()) == {1}
    # "cheap": the modules run again but the convolution kernels are not: count aten calls
    assert len(conv_kernels(lambda: run("full"))) == 4  # two convs, each recomputed once
    assert len(conv_kernels(lambda: run("cheap"))) == 2  # conv outputs were kept: no conv kernel runs again


def test_plain_call_without_autograd():
    body = block()
    x = torch.randn(1, 2, 8, 8, 8)
    calls = []
    module = sys.modules["monai_ckpt.checkpoint"]
    orig = module._torch_checkpoint
    module._torch_checkpoint = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with torch.no_grad():
            checkpoint(body, x)
        with torch.inference_mode():
            checkpoint(body, x)
        body.eval()
        checkpoint(body, x)  # a module in eval mode: plain call too
        assert calls == []
        body.train()
        checkpoint(body, x)
        assert calls == [1]
    finally:
        module._torch_checkpoint = orig


def test_autocast_bf16_matches_plain():
    body = block()
    x = torch.randn(2, 2, 8, 8, 8)
    ref = copy.deepcopy(body)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        a = ref(x)
        torch.manual_seed(1)
        b = checkpoint(body, x)
    assert b.dtype == torch.bfloat16
    a.float().sum().backward()
    b.float().sum().backward()
    assert torch.equal(a, b)
    for p, q in zip(ref.parameters(), body.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_kwargs_and_tuple_outputs():
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def fn(a, scale=1.0):
        return lin(a) * scale, a.sum()

    y, s = checkpoint(fn, x, scale=2.0)
    (y.sum() + s).backward()
    g = x.grad.clone()
    x.grad = None
    y2, s2 = fn(x, scale=2.0)
    (y2.sum() + s2).backward()
    assert torch.equal(g, x.grad)


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="valid modes are full, cheap, offload"):
        checkpoint(nn.Identity(), torch.ones(1), mode="everything")


@pytest.mark.parametrize("segments", [1, 2, 3, 7])
def test_checkpointed_sequential_matches_sequential(segments):
    mods = list(block())
    plain = nn.Sequential(*copy.deepcopy(mods))
    ck = CheckpointedSequential(*mods, segments=segments)
    assert list(ck.state_dict()) == list(plain.state_dict())
    inputs = [torch.randn(2, 2, 8, 8, 8) for _ in range(2)]
    assert_same_training(plain, ck, inputs)
    counts = count_conv_calls(ck, lambda: ck(torch.randn(1, 2, 8, 8, 8)).sum().backward())
    assert max(counts.values()) <= 2


def test_checkpointed_sequential_errors_and_script():
    with pytest.raises(ValueError, match="segments must be an integer between 1 and the number of modules"):
        CheckpointedSequential(nn.Identity(), nn.Identity(), segments=3)
    ck = CheckpointedSequential(nn.Conv2d(1, 2, 3), nn.ReLU(), segments=2).eval()
    scripted = torch.jit.script(ck)
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(scripted(x), ck(x))


def test_checkpoint_submodules_keeps_state_dict_and_matches():
    from monai.networks.blocks import ResidualUnit
    from monai.networks.nets import UNet

    net = UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=2, norm="batch", dropout=0.1)
    ref = copy.deepcopy(net)
    keys = list(net.state_dict())
    names = checkpoint_submodules(net, predicate=lambda n, m: isinstance(m, ResidualUnit))
    assert names and all("." in n for n in names)
    assert list(net.state_dict()) == keys
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref.named_parameters()]
    inputs = [torch.randn(2, 1, 16, 16, 16) for _ in range(2)]
    assert_same_training(ref, net, inputs)
    counts = count_conv_calls(net, lambda: net(inputs[0]).sum().backward())
    assert max(counts.values()) == 2
    # a child of a chosen module is never chosen too (no nesting); undo restores the plain forward
    with pytest.raises(ValueError, match="would nest"):
        checkpoint_submodules(net, names=["model"])
    assert checkpoint_submodules(net, predicate=lambda n, m: True, mode=None) == names
    assert all("forward" not in m.__dict__ for m in net.modules())
    torch.jit.script(net)


def test_checkpoint_submodules_errors():
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no submodule named 'body'.*its submodules are: 0, 0.0, 1"):
        checkpoint_submodules(net, names=["body"])
    checkpoint_submodules(net, names=["0.0"])
    with pytest.raises(ValueError, match="would nest"):
        checkpoint_submodules(net, names=["0"])
