"""The training step a plan is for: its input shape, its loss and label batch (`make_step`), and the exact peak of
that step under a policy (`measured_peak`: MemTracker on fake tensors, nothing allocated; `FakeStep`: the same
figure for many policies of one question, the network, optimizer state and batch built once)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..policies import PolicySpec
from ..profiling import (
    LabelBatch,
    LossMemory,
    LossStandIn,
    loss_memory,
    mean_square,
    measure_step_memory,
    replica,
    training_step,
)
from ..profiling.step import autocast_dtype, parameter_device, steady_state
from ..profiling.tracker import step_tracker

__all__ = ["FakeStep", "PlannedStep", "input_shape_of", "label_batch", "make_step", "measured_peak",
           "parameter_device", "training_output"]

@dataclass
class PlannedStep:
    """The training step planned: the loss a measured step runs (None: ``mean(out**2)``; a `LossStandIn` for a
    loss that cannot run on fake tensors), the user's own loss (timed on real tensors), the label batch, the
    loss's memory (for the model) and a description."""

    loss: Callable | None
    user_loss: Callable | None
    label: LabelBatch | None
    memory: LossMemory
    description: str

    @property
    def key(self) -> tuple:
        return (id(self.user_loss), self.label)


def training_output(network: nn.Module, input_shape: tuple[int, ...], amp: bool) -> Any:
    """The network's training output for ``input_shape``, as fake tensors (shapes and dtypes only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = parameter_device(network)
    with FakeTensorMode(), torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp):
        return replica(network, "none").train()(torch.randn(input_shape, device=device))


def label_batch(label: Any, input_shape: tuple[int, ...], channels: int, dims: int) -> LabelBatch:
    """The label batch a description stands for: ``"index"``, ``"channels"``, or an example (tensor or
    `LabelBatch`) whose batch and spatial sizes are the input's and whose channels are 1 or the output's."""
    batch, spatial = input_shape[0], tuple(input_shape[2:])
    if isinstance(label, str) and label in ("index", "channels"):
        if label == "index":
            return LabelBatch((batch, 1, *spatial), torch.int64)
        return LabelBatch((batch, channels, *spatial), torch.float32)
    if not isinstance(label, (torch.Tensor, LabelBatch)):
        raise ValueError(f"label must be 'index' (class indices, (B, 1, *spatial), int64), 'channels' (one channel per "
                         f"class, (B, {channels}, *spatial), float32) or an example tensor, got {label!r}.")
    shape, dtype = tuple(int(n) for n in label.shape), label.dtype
    want = f"(batch {batch}, 1 or {channels} channels, {', '.join(map(str, spatial))})"
    if len(shape) != dims + 2 or shape[0] != batch or shape[2:] != spatial:
        raise ValueError(f"the label batch has shape {shape} but the input is {input_shape}: it should be {want}.")
    if shape[1] not in (1, channels):
        raise ValueError(f"the label batch has {shape[1]} channels but the network outputs {channels} classes: give "
                         f"1 channel (class indices) or {channels} (one per class), shape {want}.")
    return LabelBatch(shape, dtype)


def make_step(network: nn.Module, input_shape: tuple[int, ...], amp: bool, loss: Callable | None,
               label: Any) -> PlannedStep:
    out = training_output(network, input_shape, amp)
    dims = len(input_shape) - 2
    listed = isinstance(out, (list, tuple))
    first = out[0] if listed else out
    # a list of outputs (deep-supervision heads) is what the loss is called on, as the training step calls it
    shapes = [tuple(o.shape) for o in out] if listed else tuple(first.shape)
    if loss is None:
        memory = loss_memory(mean_square, shapes, LabelBatch((1,)), spatial_dims=dims, out_dtype=first.dtype, amp=amp)
        return PlannedStep(None, None, None, memory, "mean(out**2) (the default: give loss= for your own)")
    if not callable(loss):
        raise ValueError(f"loss must be a callable loss(output, label), e.g. monai.losses.DiceCELoss(to_onehot_y=True, "
                         f"softmax=True), got {loss!r}.")
    if not isinstance(first, torch.Tensor) or first.ndim < dims + 2:
        raise ValueError(f"the network's training output is {type(out).__name__}; plan(loss=...) needs a tensor "
                         "output.")
    batch = label_batch(label, input_shape, int(first.shape[-dims - 1]), dims)
    memory = loss_memory(loss, shapes, batch, spatial_dims=dims, out_dtype=first.dtype, amp=amp)
    measured = loss if memory.method == "fake tensors" else LossStandIn(memory)
    name = getattr(loss, "__name__", None) or type(loss).__name__
    return PlannedStep(measured, loss, batch, memory, f"{name} (memory: {memory.method})")


def input_shape_of(network: nn.Module, spatial_shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    if not hasattr(network, "checkpoint_segments"):
        raise TypeError(f"plan() needs a checkpoint-aware network, one of monai_ckpt's Checkpoint* classes "
                        f"(CheckpointUNet, CheckpointSegResNet, ...: see monai_ckpt.networks), got "
                        f"{type(network).__name__}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    dims = len(network.size_multiple())
    spatial = tuple(int(s) for s in spatial_shape)
    if len(spatial) != dims:
        raise ValueError(f"spatial_shape must have {dims} sizes for this {dims}D network, got {tuple(spatial_shape)}.")
    shape = (batch_size, network.in_channels, *spatial)
    network._check_input(torch.empty(shape, device="meta"))
    return shape


def measured_peak(network: nn.Module, policy: PolicySpec, input_shape: tuple[int, ...], amp: bool,
                   optimizer: str, step: PlannedStep | None = None) -> int:
    """Exact peak of one training step with ``policy`` (MemTracker on fake tensors: nothing is allocated)."""
    return measure_step_memory(lambda: replica(network, policy), input_shape, estimate=True, amp=amp,
                               optimizer=optimizer, loss=step.loss if step else None,
                               label=step.label if step else None, device=parameter_device(network)).peak


class FakeStep:
    """One question's training step on fake tensors, built once (network replica, optimizer with its state, batch,
    label batch), whose exact peak under a policy (`peak`) is `measured_peak`'s, at a fraction of its cost.

    `measured_peak` builds a new replica and steps its optimizer twice per policy (once to make the state). Here the
    optimizer phase is measured once: when it starts, what is alive (parameters, gradients, optimizer state, batch,
    label, the output and the loss value) does not depend on the policy, since the backward has freed everything
    the forward kept; so a policy's peak is the larger of its forward-and-backward peak and that one optimizer-phase
    peak (`tests/test_planner_speed.py` checks the identity against `measured_peak` policy by policy).
    """

    def __init__(self, network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str,
                 step: PlannedStep | None = None) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.amp, self.loss = amp, step.loss if step else None
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)  # a compiled graph may hold real constants
        device = parameter_device(network)
        with self.mode, steady_state(lambda: replica(network, "none"), input_shape, False, device, optimizer, amp,
                                     step.label if step else None) as (model, opt, x, y):
            self.model, self.opt, self.x, self.y = model, opt, x, y
        self.optimizer_peak = 0
        if opt is not None:
            self.optimizer_peak = self._measure(None, opt)

    def peak(self, policy: PolicySpec) -> int:
        """Exact peak of one training step with ``policy`` (the optimizer phase's peak included)."""
        return max(self._measure(policy, None), self.optimizer_peak)

    def _measure(self, policy: PolicySpec | None, opt: torch.optim.Optimizer | None) -> int:
        """With ``opt``: the peak of the optimizer phase of a whole step; without: the peak of forward, loss and
        backward (the optimizer state counted, as it is alive)."""
        phase = ["forward"]
        seen = [0]

        class _Tracker(step_tracker()):
            def after_operator(self, func: Any, out: Any) -> None:
                if phase[0] == "optimizer":
                    seen[0] = max(seen[0], self.live_bytes())

        def on_phase(name: str) -> None:
            tracker._settle()  # an addition that ended the backward belongs to the backward
            phase[0] = name

        with self.mode:
            if policy is not None:
                self.model.checkpoint_policy = policy
            tracker = _Tracker()
            tracker.track_external(self.model, self.opt, self.x, *(() if self.y is None else (self.y,)))
            with tracker:
                training_step(self.model, self.x, opt, self.amp, on_phase=on_phase, loss=self.loss, label=self.y)
            snapshot = tracker.get_tracker_snapshot("peak")
        if opt is not None:
            return seen[0]
        return int(next(iter(snapshot.values()))["Total"])
