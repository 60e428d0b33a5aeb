"""Peak memory and step time of one training step, measured the same way everywhere.

- ``measure_step_memory(factory, shape)``: exact live-tensor peak of a training step (forward, loss,
  backward, optimizer step) with torch's ``MemTracker``, by category. With ``estimate=True`` the network and
  batch are fake tensors (``FakeTensorMode``): clinical sizes cost seconds and no memory. On a CUDA device
  it also reports ``torch.cuda.max_memory_allocated``.
- ``step_time_ratios(factories, shape)``: step time of several networks relative to the first, measured
  interleaved in one process (A B A B ...), median after warm-up.

A training step here is ``loss = mean(out**2)``, ``loss.backward()``, ``Adam.step()``, ``zero_grad()``,
measured on the second step so that optimizer state exists, as in steady-state training.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["StepMemory", "measure_step_memory", "step_time_ratios", "training_step", "make_optimizer"]

MiB = 2**20
CATEGORIES = ("params", "buffers", "grads", "activations", "temporaries", "optimizer", "other")
_MEMTRACKER_NAMES = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer",
    "Other": "other",
}


@dataclass
class StepMemory:
    """Peak memory of one training step, in bytes.

    Attributes:
        peak: total live-tensor bytes at the peak.
        by_category: bytes per category at that peak (params, grads, activations, temporaries, optimizer...).
        cuda_max_allocated: ``torch.cuda.max_memory_allocated`` for the step, when run on CUDA.
    """

    peak: int
    by_category: dict[str, int] = field(default_factory=dict)
    cuda_max_allocated: int | None = None

    @property
    def peak_mib(self) -> float:
        return self.peak / MiB


def make_optimizer(model: nn.Module, optimizer: str = "adam") -> torch.optim.Optimizer | None:
    """The optimizer a step uses: ``"adam"`` (two states per parameter), ``"sgd"`` (none) or ``"none"``."""
    if optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-4)
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-4)
    if optimizer == "none":
        return None
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: 'adam', 'sgd', 'none'.")


def training_step(
    model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer | None, amp: bool = False
) -> None:
    """One training step: forward, ``mean(out**2)`` loss, backward, optimizer step, ``zero_grad``."""
    dtype = torch.bfloat16 if x.device.type == "cpu" else torch.float16
    with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
        out = model(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        loss = out.float().square().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def measure_step_memory(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    device: str | torch.device = "cpu",
    optimizer: str = "adam",
    amp: bool = False,
) -> StepMemory:
    """Peak memory of one training step of ``factory()`` on a batch of ``input_shape`` (B, C, *spatial).

    Args:
        factory: builds the network (called once, inside ``FakeTensorMode`` when ``estimate``).
        input_shape: full input shape, batch and channels included.
        estimate: use fake tensors: no memory is allocated and no arithmetic is done.
        device: where to run; on CUDA the result also has ``cuda_max_allocated``.
        optimizer: ``"adam"``, ``"sgd"`` or ``"none"``; its state counts towards the peak.
        amp: run the forward under autocast (bf16 on CPU, fp16 on CUDA).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device(device)
    mode = _fake_mode() if estimate else None
    with mode if mode is not None else _null():
        model = factory().train()
        if device.type != "cpu":
            model.to(device)
        opt = make_optimizer(model, optimizer)
        x = torch.randn(*input_shape, device=device)
        training_step(model, x, opt, amp)  # optimizer state exists from here on, as in steady state
        cuda = device.type == "cuda" and not estimate
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        tracker = MemTracker()
        tracker.track_external(model, opt, x)
        with tracker:
            training_step(model, x, opt, amp)
        snapshot = tracker.get_tracker_snapshot("peak")
    per_device = snapshot.get(device) or next(iter(snapshot.values()))
    by_category = {_MEMTRACKER_NAMES.get(str(k.value) if hasattr(k, "value") else str(k), str(k)): int(v)
                   for k, v in per_device.items() if k != "Total"}
    result = StepMemory(peak=int(per_device["Total"]), by_category=by_category)
    if cuda:
        torch.cuda.synchronize(device)
        result.cuda_max_allocated = torch.cuda.max_memory_allocated(device)
    return result


def step_time_ratios(
    factories: Sequence[Callable[[], nn.Module]],
    input_shape: Sequence[int],
    *,
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    amp: bool = False,
    optimizer: str = "adam",
) -> tuple[list[float], list[float]]:
    """Median step time of each network, and its ratio to the first, interleaved in one process.

    All networks get the same weights-independent input; each round runs one step of every network in
    turn (A B C A B C ...), so load on a shared machine affects them alike.

    Returns:
        (median seconds per network, ratio of each median to the first network's).
    """
    device = torch.device(device)
    models = [f().to(device).train() for f in factories]
    opts = [make_optimizer(m, optimizer) for m in models]
    x = torch.randn(*input_shape, device=device)
    times: list[list[float]] = [[] for _ in models]
    for round_ in range(warmup + steps):
        for i, (m, o) in enumerate(zip(models, opts)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            training_step(m, x, o, amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                times[i].append(time.perf_counter() - t0)
    medians = [statistics.median(t) for t in times]
    return medians, [t / medians[0] for t in medians]


def _fake_mode():  # noqa: ANN202
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
