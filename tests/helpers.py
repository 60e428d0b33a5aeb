"""Shared helpers for comparing a checkpoint-aware network with its MONAI parent."""

import copy

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def train_steps(model: nn.Module, inputs: list[torch.Tensor], lr: float = 0.1) -> list[torch.Tensor]:
    """SGD steps with the RNG reseeded per step, so two models see the same dropout masks."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    model.train()
    for step, x in enumerate(inputs):
        torch.manual_seed(1000 + step)
        out = model(x)
        if isinstance(out, (list, tuple)):
            out = torch.stack(list(out))
        out.float().square().mean().backward()
        outs.append(out.detach())
        opt.step()
        opt.zero_grad(set_to_none=False)
    return outs


def assert_same_training(parent: nn.Module, child: nn.Module, inputs: list[torch.Tensor], atol: float = 0.0) -> None:
    """Train both from the same weights; outputs, gradients, parameters and buffers must agree."""
    child.load_state_dict(parent.state_dict())
    parent = copy.deepcopy(parent)
    outs_p = train_steps(parent, inputs)
    outs_c = train_steps(child, inputs)
    for a, b in zip(outs_p, outs_c, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=0 if atol == 0 else 1e-5)
    for (name, p), (_, c) in zip(parent.named_parameters(), child.named_parameters(), strict=True):
        torch.testing.assert_close(c.grad, p.grad, atol=atol, rtol=0 if atol == 0 else 1e-5, msg=f"grad {name}")
        torch.testing.assert_close(c, p, atol=atol, rtol=0 if atol == 0 else 1e-5, msg=f"param {name}")
    for (name, p), (_, c) in zip(parent.named_buffers(), child.named_buffers(), strict=True):
        torch.testing.assert_close(c, p, atol=atol, rtol=0 if atol == 0 else 1e-5, msg=f"buffer {name}")


def count_conv_calls(model: nn.Module, run) -> dict[str, int]:
    """Forward calls of every convolution module of ``model`` while ``run()`` executes."""
    counts: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            counts[name] = 0
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: counts.__setitem__(name, counts[name] + 1)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


def conv_kernels(run) -> list[int]:
    """The output channels of every convolution kernel (aten, not module) call while ``run()`` executes: a
    selective checkpoint reruns the modules but not the kernels whose outputs it kept."""

    class ConvKernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                calls.append(args[1].shape[0])
            return func(*args, **(kwargs or {}))

    calls: list[int] = []
    with ConvKernels():
        run()
    return calls
