"""Shared helpers for comparing a checkpoint-aware network with its MONAI parent."""

import copy
import inspect
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def train_steps(model: nn.Module, inputs: list[torch.Tensor], lr: float = 0.1) -> list[torch.Tensor]:
    """SGD steps with the RNG reseeded per step, so two models see the same dropout masks; the last step's gradients
    stay on the parameters (to compare)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    model.train()
    for step, x in enumerate(inputs):
        opt.zero_grad(set_to_none=False)
        torch.manual_seed(1000 + step)
        out = model(x)
        if isinstance(out, (list, tuple)):  # deep supervision heads, possibly of several sizes
            out = torch.cat([o.flatten() for o in out])
        out.float().square().mean().backward()
        outs.append(out.detach())
        opt.step()
    return outs


@dataclass(frozen=True)
class Trained:
    """A network's training run to compare others with: its weights before, and after each step its output, then
    its gradients, parameters and buffers at the end."""

    start: dict
    outs: list
    grads: list
    params: list
    buffers: list


def trained(model: nn.Module, inputs: list[torch.Tensor]) -> Trained:
    """Train a copy of ``model`` on ``inputs`` (`train_steps`) and keep what `assert_trains_like` compares."""
    start = copy.deepcopy(model.state_dict())
    model = copy.deepcopy(model)
    outs = train_steps(model, inputs)
    return Trained(start, outs, [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
                   [(n, p.detach()) for n, p in model.named_parameters()], list(model.named_buffers()))


def assert_trains_like(reference: Trained, child: nn.Module, inputs: list[torch.Tensor], atol: float = 0.0) -> None:
    """Train ``child`` from the reference's weights; outputs, gradients, parameters and buffers must agree."""
    child.load_state_dict(reference.start)
    outs = train_steps(child, inputs)
    rtol = 0 if atol == 0 else 1e-5
    for a, b in zip(reference.outs, outs, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)
    for (name, p), c in zip(reference.grads, child.parameters(), strict=True):
        torch.testing.assert_close(c.grad, p, atol=atol, rtol=rtol, msg=f"grad {name}")
    for (name, p), c in zip(reference.params, child.parameters(), strict=True):
        torch.testing.assert_close(c, p, atol=atol, rtol=rtol, msg=f"param {name}")
    for (name, p), (_, c) in zip(reference.buffers, child.named_buffers(), strict=True):
        torch.testing.assert_close(c, p, atol=atol, rtol=rtol, msg=f"buffer {name}")


def assert_same_training(parent: nn.Module, child: nn.Module, inputs: list[torch.Tensor], atol: float = 0.0) -> None:
    """Train both from the parent's weights; outputs, gradients, parameters and buffers must agree."""
    assert_trains_like(trained(parent, inputs), child, inputs, atol)


def same(a, b) -> bool:  # noqa: ANN001
    """``torch.equal`` for a tensor or a list of them (deep supervision heads)."""
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss with position-dependent weights, so every output element (and every deep-supervision head) matters."""
    if isinstance(out, (list, tuple)):
        return sum(loss_of(o) for o in out)
    return (out.float() * torch.linspace(0, 1, out.numel()).view(out.shape)).square().mean()


def make_pair(parent_cls: type, child_cls: type, kwargs: dict, policy) -> tuple[nn.Module, nn.Module]:  # noqa: ANN001
    """A MONAI parent and its monai_ckpt child with ``policy``, holding the same weights."""
    torch.manual_seed(0)
    parent = parent_cls(**kwargs)
    child = child_cls(**kwargs, checkpoint_policy=policy)
    child.load_state_dict(parent.state_dict())
    return parent, child


def assert_plain_forward_outside_training(
    parent: nn.Module, child: nn.Module, x: torch.Tensor, monkeypatch  # noqa: ANN001
) -> None:
    """In eval(), under no_grad and inference_mode the child never checkpoints and equals the parent; in training
    it makes one checkpoint call per group."""
    import sys

    module = sys.modules["monai_ckpt.checkpoint"]
    calls = []
    orig = module._torch_checkpoint
    monkeypatch.setattr(module, "_torch_checkpoint", lambda *a, **k: calls.append(1) or orig(*a, **k))
    parent.eval(), child.eval()
    assert same(child(x), parent(x))
    child.train()
    with torch.no_grad():
        child(x)
    with torch.inference_mode():
        child(x)
    assert calls == []
    child(x)
    assert len(calls) == len(child.checkpoint_groups()) == len(child.checkpoint_segments())


def assert_scripts_like_parent(parent: nn.Module, child: nn.Module, x: torch.Tensor) -> None:
    """The child scripts, saves and loads as the plain network's graph where the parent scripts, and fails where
    the parent fails (MONAI's DynUNet with deep supervision, SwinUNETR)."""
    import io

    try:
        torch.jit.script(copy.deepcopy(parent))
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            torch.jit.script(child)
        return
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(child), buf)
    buf.seek(0)
    assert same(torch.jit.load(buf).eval()(x), parent.eval()(x))


def assert_same_under_autocast(parent: nn.Module, child: nn.Module, x: torch.Tensor) -> None:
    """One bf16-autocast training step: outputs (and their dtype) and gradients equal the parent's, bit for bit.

    Both networks run on torch's own CPU kernels (oneDNN off): the contract is that ours runs the parent's operations
    in the parent's dtypes, which any deterministic kernel shows. oneDNN's bf16 Conv3d weight gradient cannot be the
    reference: with torch 2.13 on AVX-512 CPUs it differs from run to run, sometimes garbage, for MONAI's plain
    networks alike, where the first spatial size is 2 and there are 16 or more channels (a small test network's
    deepest level), and not in every run, so no probe of the host tells it reliably."""
    outs = []
    with torch.backends.mkldnn.flags(enabled=False):
        for net in (parent, child):
            torch.manual_seed(3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x)
            loss_of(out).backward()
            outs.append(out)
    assert same(outs[1], outs[0])
    for (name, p), c in zip(parent.named_parameters(), child.parameters()):
        assert torch.equal(p.grad, c.grad), name


def count_conv_calls(model: nn.Module, run, starts: bool = False) -> dict[str, int]:
    """Forward calls of every convolution module of ``model`` while ``run()`` executes. With ``starts``, the calls
    started (a pre-hook): a recomputation that torch stops early, as soon as it has every tensor it needs, may stop
    inside the last module it runs, before that module's forward hook."""
    counts: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            counts[name] = 0
            count = lambda *_, name=name: counts.__setitem__(name, counts[name] + 1)  # noqa: E731
            handles.append(m.register_forward_pre_hook(count) if starts else m.register_forward_hook(count))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


class AtenCalls(TorchDispatchMode):
    """While active: the name of every aten operator called (``names``) and, of each convolution kernel, its
    weight's shape and whether it is transposed (``convolutions``)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.convolutions: list[tuple[tuple[int, ...], bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        if func is torch.ops.aten.convolution.default:
            self.convolutions.append((tuple(args[1].shape), bool(args[6])))
        return func(*args, **(kwargs or {}))


def backward_calls(net: nn.Module, x: torch.Tensor) -> AtenCalls:
    """The aten calls of the backward of one training step of ``net`` on ``x`` (the forward not recorded)."""
    loss = loss_of(net(x))
    with AtenCalls() as calls:
        loss.backward()
    return calls


def conv_kernels(run) -> list[int]:
    """The output channels of every convolution kernel (aten, not module) call while ``run()`` executes: a
    selective checkpoint reruns the modules but not the kernels whose outputs it kept."""
    with AtenCalls() as calls:
        run()
    return [weight[0] for weight, _ in calls.convolutions]


def saved_tensor_shapes(net: nn.Module, x: torch.Tensor) -> set[tuple[int, ...]]:
    """The shapes of every tensor autograd saves for backward in ``net(x)`` (checkpoints save through hooks of their
    own: what they keep inside is not seen, their inputs are)."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        net(x)
    return set(shapes)


def assert_in_place_steps_copy_nothing(parent_cls: type, child_cls: type, kw: dict, shape: tuple[int, ...]) -> None:
    """In-place activations after instance norm (a view of batch norm's output): the parent's backward goes through
    the view's base (CopySlices: new_empty_strided and a clone); the child ("cheap") runs them on the base and
    copies nothing, and training stays bit-identical."""
    parent, child = make_pair(parent_cls, child_cls, kw, "cheap")
    assert_same_training(parent, child, [torch.randn(shape) for _ in range(2)])
    x = torch.randn(shape)
    assert "aten.new_empty_strided.default" in backward_calls(parent, x).names
    assert "aten.new_empty_strided.default" not in backward_calls(child, x).names


def assert_same_signature_plus_keyword_only_policy(parent: type, child: type) -> None:
    """The child's constructor is the parent's, argument for argument and default for default, plus a keyword-only
    ``checkpoint_policy``."""
    parent_params = inspect.signature(parent.__init__).parameters
    child_params = inspect.signature(child.__init__).parameters
    assert list(child_params)[:-1] == list(parent_params)
    assert all(child_params[n].default == p.default for n, p in parent_params.items())
    assert child_params["checkpoint_policy"].kind is inspect.Parameter.KEYWORD_ONLY


def assert_same_constructor_error(parent: type, child: type, kwargs: dict) -> None:
    """The child's constructor refuses ``kwargs`` with the parent's exception and message."""
    with pytest.raises(Exception) as expected:
        parent(**kwargs)
    with pytest.raises(expected.type) as got:
        child(**kwargs)
    assert str(got.value) == str(expected.value)
