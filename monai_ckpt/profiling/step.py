"""The training step every measurement runs, and the network and batch it runs on.

A training step here is ``loss = mean(out**2)`` (or the user's ``loss(out, label)`` on a label batch of the shape
and dtype given, see `LabelBatch`), ``loss.backward()``, ``Adam.step()``, ``zero_grad()``, measured on the second
step so that optimizer state exists, as in steady-state training (`steady_state`). With ``estimate`` the network
and batch are fake tensors (`fake_mode`): clinical sizes cost seconds and no memory.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MiB", "LabelBatch", "autocast_dtype", "build_network", "fake_mode", "make_optimizer", "mean_square",
           "parameter_device", "reads_tensor_values", "replica", "steady_state", "training_step"]

MiB = 2**20


def autocast_dtype(device: torch.device | str) -> torch.dtype:
    """Autocast's lower precision on ``device``: bf16 on the CPU, fp16 on CUDA (the same bytes either way)."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16


def parameter_device(network: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the network's first parameter; ``default`` (the CPU if None) for a network without any."""
    return next((p.device for p in network.parameters()), default if default is not None else torch.device("cpu"))


def make_optimizer(model: nn.Module, optimizer: str = "adam") -> torch.optim.Optimizer | None:
    """The optimizer a step uses: ``"adam"`` (two states per parameter), ``"sgd"`` (none) or ``"none"``."""
    if optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-4)
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-4)
    if optimizer == "none":
        return None
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: 'adam', 'sgd', 'none'.")


@dataclass(frozen=True)
class LabelBatch:
    """The label batch a training step's loss takes: its shape (batch and spatial sizes as the input's) and dtype.
    Its values never change the memory a loss uses, so measurements use zeros (a valid class index and a valid
    one-hot/sigmoid target)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.int64

    def make(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


def mean_square(out: torch.Tensor | Sequence[torch.Tensor], label: Any = None) -> torch.Tensor:
    """The default loss of a measured step: ``mean(out**2)``, summed over the outputs of a list (deep supervision
    heads: every head is trained). ``label`` is ignored."""
    if isinstance(out, (list, tuple)):
        return sum(o.float().square().mean() for o in out)
    return out.float().square().mean()


def training_step(
    model: nn.Module,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    amp: bool | torch.dtype = False,
    on_phase: Callable[[str], None] | None = None,
    loss: Callable[..., torch.Tensor] | None = None,
    label: torch.Tensor | None = None,
) -> None:
    """One training step: forward, loss, backward, optimizer step, ``zero_grad``.
    ``loss``: None for ``mean(out**2)`` (summed over the outputs of a list, such as UNet++'s or SegResNetDS's deep
    supervision heads), else ``loss(out, label).mean()`` on the network's
    whole output (a DynUNet's stacked deep-supervision output included), as MONAI's trainers call it. The output
    stays alive until the step ends, as a trainer keeps it (``engine.state.output``).
    ``amp``: autocast, bf16 on CPU and fp16 on CUDA, or the dtype given.
    ``on_phase("backward")`` and ``on_phase("optimizer")`` are called as those phases start."""
    dtype = amp if isinstance(amp, torch.dtype) else autocast_dtype(x.device)
    with torch.autocast(x.device.type, dtype=dtype, enabled=bool(amp)):
        out = model(x)
        value = mean_square(out) if loss is None else loss(out, label).mean()
    if on_phase is not None:
        on_phase("backward")
    value.backward()
    if on_phase is not None:
        on_phase("optimizer")
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def steady_state(factory, input_shape, estimate, device, optimizer, amp, label=None):  # noqa: ANN001, ANN202
    """Network, optimizer and batch (and label batch, when given) as in steady-state training: the optimizer has
    its state (made by one optimizer step on zero gradients, which costs no forward), all fake tensors when
    ``estimate``."""
    with fake_mode() if estimate else contextlib.nullcontext():
        model = build_network(factory, estimate).train()
        if device.type != "cpu":
            model.to(device)
        opt = make_optimizer(model, optimizer)
        if opt is not None:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            model.zero_grad(set_to_none=True)
        x = torch.randn(*input_shape, device=device)
        if label is None:
            yield model, opt, x, None
        else:
            yield model, opt, x, label.make(device)


def build_network(factory: Callable[[], nn.Module], estimate: bool) -> nn.Module:
    """``factory()``; in estimate mode (inside ``FakeTensorMode``), a network whose constructor reads tensor
    values (SwinUNETR's stochastic-depth rates, ``.item()``) is built for real, outside fake mode, and measured
    as a fake `replica`. That holds also where the factory wraps the error (MONAI's config parser raises a
    ``RuntimeError`` from it: ``ConfigParser.get_parsed_content("network_def")``)."""
    if not estimate:
        return factory()
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        return factory()
    except Exception as error:  # noqa: BLE001 - re-raised unless a tensor's value was read
        if not reads_tensor_values(error):
            raise
    with unset_fake_temporarily():
        network = factory()
    return replica(network)


def reads_tensor_values(error: BaseException) -> bool:
    """Whether ``error``, or an exception it was raised from (``raise ... from``, or while handling), is fake mode's
    ``DataDependentOutputException``: code that needs a tensor's value, which a fake tensor does not have."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, DataDependentOutputException):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def replica(network: nn.Module, policy: Any = None) -> nn.Module:
    """A copy of ``network`` to measure, with ``policy`` when given: its tensors are fakes of the network's when
    a ``FakeTensorMode`` is active (nothing allocated), else CPU copies; the network's own tensors are never
    copied on their device. Tensors a module keeps outside its parameters and buffers (DynUNet's last
    deep-supervision heads, which a forward overwrites) are converted the same way, detached."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    fake = isinstance(mode, FakeTensorMode)
    with unset_fake_temporarily():
        memo: dict[int, Any] = {}
        for t in itertools.chain(network.parameters(), network.buffers()):
            c = mode.from_tensor(t) if fake else t.detach().to("cpu", copy=True)
            memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
        for m in network.modules():
            for value in vars(m).values():
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(t, torch.Tensor) and id(t) not in memo:
                        memo[id(t)] = mode.from_tensor(t.detach()) if fake else t.detach().to("cpu", copy=True)
        model = copy.deepcopy(network, memo)
    if policy is not None:
        model.checkpoint_policy = policy
    return model


def fake_mode():  # noqa: ANN202
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()
