"""Peak memory and step time of one training step, measured the same way everywhere.

- ``measure_step_memory(factory, shape)``: exact live-tensor peak of a training step (forward, loss,
  backward, optimizer step) with torch's ``MemTracker``, by category. With ``estimate=True`` the network and
  batch are fake tensors (``FakeTensorMode``): clinical sizes cost seconds and no memory. On a CUDA device
  it also reports ``torch.cuda.max_memory_allocated``.
- ``step_time_ratios(factories, shape)``: step time of several networks relative to the first, measured
  interleaved in one process (A B A B ...), median after warm-up.
- ``block_costs(factory, shape)``: per block of a checkpoint-aware network, the activation bytes its forward
  keeps for backward when it is not checkpointed, the bytes of its output, and its forward time.
- ``memory_timeline(factory, shape)``: live bytes after every operator of one training step, with phase.
- ``peak_tensors(factory, shape)``: the tensors alive at the peak, each with the operator and module that
  made it: where a policy's peak comes from, and what no policy can remove.

A training step here is ``loss = mean(out**2)`` (or the user's ``loss(out, label)`` on a label batch of the
shape and dtype given, see `LabelBatch`), ``loss.backward()``, ``Adam.step()``, ``zero_grad()``, measured on the
second step so that optimizer state exists, as in steady-state training. A loss that reads data (MONAI's
``.tolist()`` of reduction axes, one-hot checks) cannot run on fake tensors; `loss_memory` then measures it for
real at small output sizes and scales its output-sized terms exactly (`LossStandIn` replays that profile in a
fake step).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .chain import run_steps
from .checkpoint import cheap_keeps

__all__ = [
    "BlockCost",
    "LabelBatch",
    "LossMemory",
    "LossStandIn",
    "StepMemory",
    "block_costs",
    "loss_memory",
    "make_optimizer",
    "mean_square",
    "measure_step_memory",
    "memory_timeline",
    "peak_tensors",
    "replica",
    "saved_for_backward",
    "step_time_ratios",
    "training_step",
]

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
    dtype = amp if isinstance(amp, torch.dtype) else torch.bfloat16 if x.device.type == "cpu" else torch.float16
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
def _steady_state(factory, input_shape, estimate, device, optimizer, amp, label=None):  # noqa: ANN001, ANN202
    """Network, optimizer and batch (and label batch, when given) as in steady-state training: the optimizer has
    its state (made by one optimizer step on zero gradients, which costs no forward), all fake tensors when
    ``estimate``."""
    with _fake_mode() if estimate else contextlib.nullcontext():
        model = _build(factory, estimate).train()
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


def _build(factory: Callable[[], nn.Module], estimate: bool) -> nn.Module:
    """``factory()``; in estimate mode (inside ``FakeTensorMode``), a network whose constructor reads tensor
    values (SwinUNETR's stochastic-depth rates, ``.item()``) is built for real, outside fake mode, and measured
    as a fake `replica`."""
    if not estimate:
        return factory()
    from torch._subclasses.fake_tensor import DataDependentOutputException, unset_fake_temporarily

    try:
        return factory()
    except DataDependentOutputException:
        with unset_fake_temporarily():
            network = factory()
        return replica(network)


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


@functools.cache
def _tracker_files() -> frozenset[str]:
    return frozenset((__file__, torch._dynamo.eval_frame.__file__, torch._compile.__file__))


def _engine_frame() -> bool:
    """Whether the operator being dispatched was called by autograd's engine itself (its C++ code, not a Python
    backward or a checkpoint's recomputation): the nearest Python frame, past the dispatch modes (this tracker and
    any above it) and torch's dynamo-disable wrappers, is the one that started the backward (or there is none: the
    engine's device threads)."""
    passed = _tracker_files()
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename in passed or frame.f_code.co_name == "__torch_dispatch__"):
        frame = frame.f_back
    return frame is None or frame.f_code is torch.autograd.graph._engine_run_backward.__code__


def _accumulated_in_place(func: Any, args: Sequence[Any], kwargs: dict | None) -> weakref.ref | None:
    """The storage that autograd, run without a dispatch mode, would add a second gradient into in place, when
    ``func(*args)`` is that addition; else None.

    Without a mode the engine adds the incoming gradient into the one it holds (``add_``) when it holds the only
    reference to a dense tensor; under any dispatch mode (this tracker, FakeTensorMode) it never does, so a step
    measured here would count one gradient more than training allocates at each such addition. The reference
    count cannot be read reliably from Python, so this answers from the storage's and the tracker checks the
    answer afterwards (`_StepTracker`): a tensor the engine held alone dies as the sum replaces it."""
    if func is not torch.ops.aten.add.Tensor or kwargs or len(args) != 2 or torch.is_grad_enabled():
        return None
    a, b = args
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and _dense(a) and _engine_frame()):
        return None
    storage = a.untyped_storage()
    # one reference from the tensor, one from the Python object just made for it: no other tensor shares it
    return weakref.ref(storage) if torch._C._storage_Use_Count(storage._cdata) == 2 else None


def _dense(t: torch.Tensor) -> bool:
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    return is_non_overlapping_and_dense_or_false(t)


@functools.cache
def _step_tracker() -> type:
    """The class of a MemTracker (torch.distributed._tools) that counts what a training step allocates without a
    dispatch mode: the engine's addition of a second gradient into one it holds alone is counted as in place, as
    autograd does it without a mode (see `_accumulated_in_place`). ``live_bytes()`` gives the live bytes now;
    subclasses override ``after_operator(func, out)``, called once per operator with ``live_bytes()`` as at its
    end."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _UpdateType

    class _StepTracker(MemTracker):
        def __init__(self) -> None:
            super().__init__()
            self._reusing: weakref.ref | None = None
            self._pending: tuple | None = None
            self._live_then: int | None = None

        def live_bytes(self) -> int:
            if self._live_then is not None:
                return self._live_then
            return int(sum(snap.get(_TOTAL_KEY, 0) for snap in self._curr_mem_snap.values()))

        def after_operator(self, func: Any, out: Any) -> None:
            pass

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self._settle()
            self._reusing = _accumulated_in_place(func, args, kwargs)
            try:
                out = super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self._reusing = None
            if self._pending is None:
                self.after_operator(func, out)
            else:
                self._pending += (func, out)
            return out

        def _update_peak_stats(self, peak_state: Any) -> None:
            storage = self._reusing() if self._reusing is not None else None
            winfo = self._WINFO.get(storage, (None, None))[0] if storage is not None else None
            if winfo is not None and winfo.mem_consumed > 0:
                # the sum is written into the old gradient: its bytes are the sum's
                before = copy.deepcopy(self._curr_mem_snap)
                self._update_snap(_UpdateType.DEL, winfo)
                self._pending = (self._reusing, winfo, winfo.mem_consumed, before)
                winfo.mem_consumed = 0
            del storage
            # MemTracker also walks every module it has seen here, at every operator, for per-module peaks that
            # nothing in monai_ckpt reads: half of an estimate's time on a network of a few hundred modules
            self._raise_peak(self._curr_mem_snap)

        def _raise_peak(self, snapshots: dict) -> None:
            for device, snap in snapshots.items():
                if self._peak_mem.get(device, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[device], self._peak_mem_snap[device] = snap[_TOTAL_KEY], copy.deepcopy(snap)

        def _settle(self) -> None:
            """At the next operator: if the old gradient outlived the addition, something else held it and the
            engine added out of place after all; count it again, and the peak at the addition with it."""
            if self._pending is None:
                return
            storage, winfo, nbytes, before, func, out = self._pending
            self._pending = None
            live = sum(snap[_TOTAL_KEY] for snap in before.values())  # at the addition's end, counted out of place
            if storage() is None:
                live -= nbytes
            else:
                winfo.mem_consumed = nbytes
                self._update_snap(_UpdateType.ADD, winfo)
                self._raise_peak(before)
            self._live_then = live
            try:
                self.after_operator(func, out)
            finally:
                self._live_then = None

        def __exit__(self, *args: Any) -> None:
            self._settle()
            super().__exit__(*args)

    return _StepTracker


def measure_step_memory(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    device: str | torch.device = "cpu",
    optimizer: str = "adam",
    amp: bool | torch.dtype = False,
    loss: Callable[..., torch.Tensor] | None = None,
    label: LabelBatch | None = None,
) -> StepMemory:
    """Peak memory of one training step of ``factory()`` on a batch of ``input_shape`` (B, C, *spatial).

    Args:
        factory: builds the network (called once, inside ``FakeTensorMode`` when ``estimate``).
        input_shape: full input shape, batch and channels included.
        estimate: use fake tensors: no memory is allocated and no arithmetic is done.
        device: where to run; on CUDA the result also has ``cuda_max_allocated``.
        optimizer: ``"adam"``, ``"sgd"`` or ``"none"``; its state counts towards the peak.
        amp: run the forward under autocast (bf16 on CPU, fp16 on CUDA, or the dtype given).
        loss: ``loss(out, label)``; None: ``mean(out**2)`` (see `training_step`). With ``estimate``, a loss that
            reads data cannot run on fake tensors: give ``LossStandIn(loss_memory(...))`` instead.
        label: the label batch the loss takes (alive for the whole step, as a trainer's batch is).
    """
    device = torch.device(device)
    if loss is not None and label is None:
        raise ValueError("a loss needs its label batch: give label=LabelBatch(shape, dtype).")
    with _steady_state(factory, input_shape, estimate, device, optimizer, amp, label) as (model, opt, x, y):
        cuda = device.type == "cuda" and not estimate
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        tracker = _step_tracker()()
        tracker.track_external(model, opt, x, *(() if y is None else (y,)))
        with tracker:
            training_step(model, x, opt, amp, loss=loss, label=y)
        snapshot = tracker.get_tracker_snapshot("peak")
    per_device = snapshot.get(device) or next(iter(snapshot.values()))
    by_category = {_MEMTRACKER_NAMES.get(str(k.value) if hasattr(k, "value") else str(k), str(k)): int(v)
                   for k, v in per_device.items() if k != "Total"}
    result = StepMemory(peak=int(per_device["Total"]), by_category=by_category)
    if cuda:
        torch.cuda.synchronize(device)
        result.cuda_max_allocated = torch.cuda.max_memory_allocated(device)
    return result


@dataclass(frozen=True)
class LossMemory:
    """What a loss (forward and backward) adds to a training step, in bytes above what is alive when it starts
    (the network's output and the label batch included), for one output shape.

    Attributes:
        forward_peak: its forward's peak.
        saved: what its forward leaves alive until its backward (saved tensors, the loss value).
        backward_peak: its backward's peak, the gradient it passes to the output included.
        grad_bytes: that gradient (output-sized, the output's dtype).
        method: how it was measured: ``"fake tensors"`` (exact, at the real size) or ``"real at output sizes
            ..., scaled"`` (exact at small sizes, scaled by the output's voxels).
    """

    forward_peak: int
    saved: int
    backward_peak: int
    grad_bytes: int
    method: str = "fake tensors"


def _loss_phases(loss: Callable[..., torch.Tensor], out: torch.Tensor, label: torch.Tensor, amp: bool | torch.dtype,
                 ) -> tuple[int, int, int]:
    """(forward peak, saved, backward peak) of ``loss(out, label).mean()`` above the live bytes at its start."""
    seen = {"forward": 0, "backward": 0}
    phase = ["forward"]

    class _Phases(_step_tracker()):
        def after_operator(self, func: Any, out: Any) -> None:
            seen[phase[0]] = max(seen[phase[0]], self.live_bytes())

    tracker = _Phases()
    tracker.track_external(out, label)
    dtype = amp if isinstance(amp, torch.dtype) else torch.bfloat16 if out.device.type == "cpu" else torch.float16
    with tracker:
        base = tracker.live_bytes()
        with torch.autocast(out.device.type, dtype=dtype, enabled=bool(amp)):
            value = loss(out, label).mean()
        saved = tracker.live_bytes() - base
        phase[0] = "backward"
        value.backward()
    return max(seen["forward"] - base, saved), saved, max(seen["backward"] - base, 0)


def loss_memory(
    loss: Callable[..., torch.Tensor],
    out_shape: Sequence[int],
    label: LabelBatch,
    *,
    spatial_dims: int,
    out_dtype: torch.dtype = torch.float32,
    amp: bool | torch.dtype = False,
    sizes: Sequence[int] = (8, 12, 16),
) -> LossMemory:
    """The memory ``loss(out, label)`` adds to a training step whose network output has ``out_shape``.

    First on fake tensors at the real size (exact). A loss that reads data cannot run there (MONAI's losses
    call ``.tolist()`` on their reduction axes); it is then run for real on zero labels at small outputs (the
    last ``spatial_dims`` sizes of output and label set to each of ``sizes``), where its memory is exact, and
    each figure is extended to the real number of voxels along the line through the smallest and largest size.
    A segmentation loss's temporaries are output- or label-sized (softmax, one-hot, products) or per channel
    (sums), so the line is exact; the middle size checks it, and where it is off (a loss with other terms) each
    figure takes the largest of the three lines' values instead, an upper bound for such a term.

    Raises:
        ValueError: when the loss fails on an output and label of these shapes (the message says which).
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    out_shape, grad_bytes = tuple(out_shape), math.prod(out_shape) * torch.empty((), dtype=out_dtype).element_size()
    try:
        with _fake_mode():
            out = torch.randn(out_shape, dtype=out_dtype, requires_grad=True)
            forward, saved, backward = _loss_phases(loss, out, label.make(), amp)
        return LossMemory(forward, saved, backward, grad_bytes)
    except (DataDependentOutputException, DynamicOutputShapeException, NotImplementedError):
        pass  # a loss that reads data (or an operator fake tensors lack): measured for real at small sizes
    except Exception as error:  # noqa: BLE001 - the user's loss; its own message says what is wrong
        raise _loss_error(loss, out_shape, label, error) from error

    def small(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
        return (*shape[: len(shape) - spatial_dims], *(size,) * spatial_dims)

    points = []
    for size in sizes:
        out = torch.randn(small(out_shape, size), dtype=out_dtype, requires_grad=True)
        try:
            points.append((out.numel(), _loss_phases(loss, out, LabelBatch(small(label.shape, size), label.dtype).make(),
                                                     amp)))
        except Exception as error:  # noqa: BLE001
            raise _loss_error(loss, out.shape, label, error) from error
    target = math.prod(out_shape)
    lines = [(points[i], points[j]) for i, j in ((0, -1), (0, 1), (1, -1))]

    def at(k: int, line: tuple) -> float:
        (v0, f0), (v1, f1) = line
        return f0[k] + (f1[k] - f0[k]) * (target - v0) / (v1 - v0)

    straight = all(abs(at(k, lines[0]) - at(k, lines[1])) <= 64 + 1e-3 * abs(at(k, lines[0])) for k in range(3))
    figures = [math.ceil(at(k, lines[0]) if straight else max(at(k, line) for line in lines)) for k in range(3)]
    method = (f"real at output sizes {', '.join('x'.join([str(s)] * spatial_dims) for s in sizes)}, scaled by voxels"
              + ("" if straight else " (not linear: upper bound)"))
    forward, saved, backward = figures
    return LossMemory(max(forward, saved), saved, max(backward, grad_bytes), grad_bytes, method)


def _loss_error(loss: Any, out_shape: Sequence[int], label: LabelBatch, error: Exception) -> ValueError:
    return ValueError(
        f"the loss {type(loss).__name__} fails on the network's output of shape {tuple(out_shape)} and a label batch "
        f"of shape {label.shape} ({str(label.dtype).replace('torch.', '')}): {type(error).__name__}: {error}. "
        "Describe the label batch as the loss expects it: label='index' (B, 1, *spatial class indices, for "
        "to_onehot_y / cross-entropy losses), 'channels' (B, out_channels, *spatial, for sigmoid or one-hot "
        "targets), or an example tensor; and give a loss that takes the network's output as it is (a DynUNet "
        "with deep supervision outputs (B, 1 + deep_supr_num, C, *spatial) in training)."
    )


class _StandInFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, memory: LossMemory) -> torch.Tensor:  # noqa: ANN001
        kept = out.new_empty((memory.saved,), dtype=torch.uint8)
        out.new_empty((max(0, memory.forward_peak - memory.saved),), dtype=torch.uint8)  # freed at once
        ctx.kept, ctx.memory, ctx.shape, ctx.dtype = kept, memory, out.shape, out.dtype
        return out.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        memory = ctx.memory
        grad_out = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
        rest = memory.backward_peak - memory.saved - memory.grad_bytes
        grad.new_empty((max(0, rest),), dtype=torch.uint8)  # freed at once
        ctx.kept = None
        return grad_out, None


class LossStandIn:
    """A loss that uses, in a training step, the memory `loss_memory` measured for a real one: its forward
    allocates what the loss's forward peaks at and keeps what it saves, its backward what the loss's backward
    peaks at, and it returns a gradient of the output's shape and dtype. It runs on fake tensors, so a step with
    a loss that reads data can be measured at clinical sizes."""

    def __init__(self, memory: LossMemory) -> None:
        self.memory = memory

    def __call__(self, out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return _StandInFunction.apply(out, self.memory)


def step_time_ratios(
    factories: Sequence[Callable[[], nn.Module]],
    input_shape: Sequence[int],
    *,
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    amp: bool = False,
    optimizer: str = "adam",
    clock: str = "process",
) -> tuple[list[float], list[float]]:
    """Median step time of each network, and its ratio to the first, interleaved in one process.

    All networks get the same weights-independent input; each round runs one step of every network in
    turn (A B C, B C A, C A B ...: the order rotates so that no network always runs first), so load on a
    shared machine affects them alike. On the CPU the ratios' clock is this process's CPU time (all its
    threads), which other processes on a shared machine do not inflate; on CUDA it is wall time after
    synchronising.

    Args:
        clock: on the CPU, ``"process"`` (user and kernel time) or ``"user"`` (user time only, without the
            kernel's page faults): see `device_clock`.

    Returns:
        (median wall-clock seconds per network, ratio of each network's median to the first network's).
    """
    cpu_clock = device_clock("cpu", clock)
    device = torch.device(device)
    models = [f().to(device).train() for f in factories]
    opts = [make_optimizer(m, optimizer) for m in models]
    x = torch.randn(*input_shape, device=device)
    cuda = device.type == "cuda"
    wall: list[list[float]] = [[] for _ in models]
    ratio_clock: list[list[float]] = [[] for _ in models]
    n = len(models)
    for round_ in range(warmup + steps):
        for i in [(round_ + k) % n for k in range(n)]:  # rotate the order: no network always runs first
            m, o = models[i], opts[i]
            if cuda:
                torch.cuda.synchronize(device)
            w0, c0 = time.perf_counter(), cpu_clock()
            training_step(m, x, o, amp)
            if cuda:
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                wall[i].append(time.perf_counter() - w0)
                ratio_clock[i].append(wall[i][-1] if cuda else cpu_clock() - c0)
    base = statistics.median(ratio_clock[0])
    return [statistics.median(t) for t in wall], [statistics.median(t) / base for t in ratio_clock]


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Run a training step's forward and backward (loss ``mean(out**2)``) and return the bytes of the distinct
    storages the forward saves for backward, the model's parameters and buffers excluded, and the output.

    These are the activations held from forward to backward, which checkpointing trades for recomputation. It also
    works for a ``torch.compile``d model, where MemTracker does not see inside the generated code: a compiled step
    hands everything it keeps to autograd as the saved tensors of one function. An eager checkpoint keeps its
    tensors through saved-tensor hooks of its own, which this does not see: for eager checkpointed networks use
    `measure_step_memory`.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().square().mean().backward()
    return sum(storages.values()), out.detach()


@dataclass
class BlockCost:
    """What one block of a checkpoint-aware network costs when it is not checkpointed.

    Attributes:
        block: block name (``"decoder0.1"``, or the segment name for a one-block segment).
        segment, kind, level: the segment it belongs to.
        saved_bytes: bytes of the tensors its forward saves for backward (parameters excluded; tensors
            that existed before the block, such as its input, excluded too).
        output_bytes: bytes of what it passes on: the boundary a checkpoint ending here keeps.
        forward_s: median forward time (with autograd recording; this process's CPU time, which other processes
            on a shared machine do not inflate), None in estimate mode.
        kept_bytes: bytes its forward leaves alive until its backward when it runs plainly (saved tensors
            and what it passes on, each storage once).
        next_bytes: of ``output_bytes``, the running tensor the next block takes.
        side_bytes: of ``output_bytes``, the rest: skips and residual branches pushed for later blocks, and
            emitted side-head outputs.
        cheap_bytes: bytes a ``"cheap"`` checkpoint keeps inside it besides what it passes on (the outputs of
            its convolutions and matmuls).
        input_bytes: bytes of the tensors it takes (the running tensor and the skips it pops).
        param_bytes: bytes of the parameters it uses (their gradients appear during its backward).
        cheap_recompute_s: of ``forward_s``, the time of the operators a ``"cheap"`` checkpoint recomputes.
        tail_s: of ``forward_s``, the time of the operators after its last saved tensor, which a checkpoint
            that ends with this block does not rerun (torch stops a recomputation once every saved tensor is
            back, e.g. before a final convolution, whose input is saved before it runs).
        cheap_tail_s: of ``cheap_recompute_s``, the part after its last saved tensor.
    """

    block: str
    segment: str
    kind: str
    level: int
    saved_bytes: int
    output_bytes: int
    forward_s: float | None = None
    kept_bytes: int = 0
    next_bytes: int = 0
    side_bytes: int = 0
    cheap_bytes: int = 0
    input_bytes: int = 0
    param_bytes: int = 0
    cheap_recompute_s: float | None = None
    tail_s: float | None = None
    cheap_tail_s: float | None = None


def device_clock(device: str | torch.device, cpu: str = "process") -> Callable[[], float]:
    """The clock a profile times operators with: on the CPU this process's CPU time (which other processes on a
    shared machine do not inflate); on CUDA wall time after ``torch.cuda.synchronize`` (an operator's time is
    then its kernels' time).

    ``cpu``: ``"process"`` (user and kernel time) or ``"user"`` (user time only). The kernel's share is mostly page
    faults on fresh memory: glibc hands each freed large tensor back to the system, so a step pays for every large
    tensor it allocates, and a network that allocates less pays less. A GPU's caching allocator has no such cost;
    ``"user"`` leaves it out, to compare computation alone."""
    if cpu not in ("process", "user"):
        raise ValueError(f"clock must be 'process' or 'user', got {cpu!r}.")
    device = torch.device(device)
    if device.type == "cuda":
        def cuda_clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return cuda_clock
    if device.type != "cpu":
        raise ValueError(f"times can be measured on 'cpu' or 'cuda' devices, got {str(device)!r}.")
    if cpu == "process":
        return time.process_time
    import resource  # POSIX only, as the distinction is; imported here, once, not at every reading of the clock

    def user_seconds() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_utime

    return user_seconds


def _storages(*tensors: torch.Tensor) -> dict[int, torch.UntypedStorage]:
    """Storages by id; the dict holds them, so an id cannot be reused while it is in use."""
    return {id(st): st for st in (t.untyped_storage() for t in tensors)}


def _nbytes(storages: dict[int, torch.UntypedStorage]) -> int:
    return sum(st.nbytes() for st in storages.values())


class _OpRecorder(TorchDispatchMode):
    """Records the storages of convolution/matmul outputs (what a cheap checkpoint keeps), the parameters
    used, and, when timing, the time of all operators and of the others (what a cheap checkpoint recomputes),
    and both as they stood when the last tensor was saved for backward (call `saved()` from a pack hook)."""

    def __init__(self, params: dict[int, torch.UntypedStorage], timing: bool,
                 clock: Callable[[], float] = time.process_time) -> None:
        super().__init__()
        self.params, self.timing, self.clock = params, timing, clock
        self.kept: dict[int, torch.UntypedStorage] = {}
        self.used: dict[int, torch.UntypedStorage] = {}
        self.ops_s = self.recompute_s = 0.0
        self.at_last_save = (0.0, 0.0)

    def saved(self) -> None:
        self.at_last_save = (self.ops_s, self.recompute_s)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        t0 = self.clock() if self.timing else 0.0
        out = func(*args, **(kwargs or {}))
        seconds = self.clock() - t0 if self.timing else 0.0
        self.ops_s += seconds
        if cheap_keeps(func):
            self.kept.update(_storages(*(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))))
        else:
            self.recompute_s += seconds
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(st := t.untyped_storage()) in self.params:
                self.used[id(st)] = st
        return out


def block_costs(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    repeats: int = 3,
    amp: bool = False,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] | None = None,
) -> list[BlockCost]:
    """Per-block costs of ``factory()``, a monai_ckpt network, on a batch of ``input_shape``.

    The blocks run in the network's own order (the chain its policies checkpoint), without checkpointing,
    under autocast when ``amp``; saved tensors are counted once per storage. Times are the median of
    ``repeats`` runs after a warm-up run (the first run at a shape also pays one-off kernel set-up), on
    ``device`` with `device_clock` (CPU: process CPU time; CUDA: wall time after synchronising, per operator) or
    the ``clock`` given.
    """
    device = torch.device(device)
    clock = clock or device_clock(device)
    with _fake_mode() if estimate else contextlib.nullcontext():
        model = _build(factory, estimate).train()
        if device.type != "cpu" and not estimate:
            model.to(device)
        steps = model._chain_steps()
        # fakes live where the network's (fake) parameters are: a CUDA network's fakes are CUDA fakes
        where = device if not estimate else next((p.device for p in model.parameters()), torch.device("cpu"))
        x = torch.randn(*input_shape, device=where)
        params = _storages(*model.parameters())
        # per block, one record per timed run: forward, cheap recompute, tail, cheap tail
        timings: dict[str, list[tuple[float, float, float, float]]] = {s.block: [] for s in steps}
        costs: list[BlockCost] = []
        for rep in range(1 if estimate else 1 + repeats):
            h, stack = x, []
            for step in steps:
                before = _storages(h, *stack)
                inputs = _storages(h, *stack[len(stack) - step.pops :]) if step.pops else _storages(h)
                saved: dict[int, torch.UntypedStorage] = {}
                recorder = _OpRecorder(params, timing=not estimate, clock=clock)

                def pack(t: torch.Tensor, saved=saved, before=before, recorder=recorder) -> torch.Tensor:
                    saved.update((k, st) for k, st in _storages(t).items() if k not in params and k not in before)
                    recorder.saved()
                    return t

                t0 = clock()
                amp_dtype = torch.bfloat16 if x.device.type == "cpu" else torch.float16
                with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp):
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
                        outs = run_steps([step], h, *stack)
                if rep > 0:  # the first run is the warm-up (and, in estimate mode, the only one: no times)
                    ops_at_save, recompute_at_save = recorder.at_last_save
                    timings[step.block].append((clock() - t0, recorder.recompute_s,
                                                recorder.ops_s - ops_at_save, recorder.recompute_s - recompute_at_save))
                h, stack = outs[0], list(outs[1 : len(outs) - step.emit])
                if rep == 0:  # what it passes on: every tensor it made that outlives it
                    made = {k: st for k, st in _storages(*outs).items() if k not in before}
                    nxt = {k: st for k, st in _storages(outs[0]).items() if k in made}
                    side = {k: st for k, st in made.items() if k not in nxt}
                    kept = {**saved, **made}
                    cheap = {k: st for k, st in recorder.kept.items() if k not in before and k not in made}
                    seg = step.segment
                    costs.append(BlockCost(
                        step.block, seg.name, seg.kind, seg.level, _nbytes(saved), _nbytes(made),
                        kept_bytes=_nbytes(kept), next_bytes=_nbytes(nxt), side_bytes=_nbytes(side),
                        cheap_bytes=_nbytes(cheap), input_bytes=_nbytes(inputs),
                        param_bytes=_nbytes(recorder.used),
                    ))
            del h, stack
    if not estimate:
        for cost in costs:
            cost.forward_s, cost.cheap_recompute_s, cost.tail_s, cost.cheap_tail_s = (
                statistics.median(column) for column in zip(*timings[cost.block]))
    return costs


def _allocator_step(factory: Callable[[], nn.Module], input_shape: Sequence[int], under_a_mode: bool = False,
                    ) -> tuple[int, int, int, int]:
    """One steady-state training step on the CPU, real tensors, read from the CPU allocator by torch's profiler
    (which hooks the allocator, not the dispatcher): (the allocator's peak, operator-internal buffers included; its
    bytes at the end of each top-level operator, what the live-tensor figures count; activation-sized gradient
    additions that autograd did in place; and out of place). ``under_a_mode``: with a pass-through dispatch mode
    active, as under MemTracker or FakeTensorMode."""
    from torch.profiler import ProfilerActivity, profile

    class _PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            return func(*args, **(kwargs or {}))

    with _steady_state(factory, input_shape, False, torch.device("cpu"), "adam", False) as (model, opt, x, _):
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        resident = _nbytes(_storages(*model.parameters(), *model.buffers(), x, *state))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            with _PassThrough() if under_a_mode else contextlib.nullcontext():
                training_step(model, x, opt)
    results = prof.profiler.kineto_results
    start = results.trace_start_ns()
    allocations = sorted(((e.start_ns() - start) / 1e3, e.nbytes()) for e in results.events() if e.name() == "[memory]")
    events = prof.events()
    top_ends = sorted(e.time_range.end for e in events if e.name.startswith("aten::") and
                      not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    current = peak = at_ends = 0
    i = 0
    for t, nbytes in allocations:
        while i < len(top_ends) and top_ends[i] < t:
            at_ends = max(at_ends, current)
            i += 1
        current += nbytes
        peak = max(peak, current)
    at_ends = max(at_ends, current)
    activation = [e for e in events if e.input_shapes and len(e.input_shapes[0]) == len(input_shape)  # not weights
                  and e.input_shapes[0][0] == input_shape[0] and min(e.input_shapes[0][2:]) >= 4]
    engine = [e.name for e in activation
              if e.cpu_parent is not None and e.cpu_parent.name.startswith("autograd::engine")]
    return resident + peak, resident + at_ends, engine.count("aten::add_"), engine.count("aten::add")


def memory_timeline(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    optimizer: str = "adam",
    amp: bool = False,
) -> list[tuple[int, int, str]]:
    """Live tensor bytes after every operator of one (steady-state) training step.

    Returns:
        ``(operator index, live bytes, phase)`` with phase ``"forward"``, ``"backward"`` or ``"optimizer"``.
    """
    points: list[tuple[int, int, str]] = []

    def after_operator(tracker: Any, func: Any, out: Any) -> None:
        points.append((len(points), tracker.live_bytes(), tracker.phase))

    with _steady_state(factory, input_shape, estimate, torch.device("cpu"), optimizer, amp) as (model, opt, x, _):
        _run_tracked_step(model, opt, x, amp, after_operator)
    return points


def _run_tracked_step(model: nn.Module, opt: Any, x: torch.Tensor, amp: bool | torch.dtype,
                      after_operator: Callable[[Any, Any, Any], None]) -> None:
    """One training step under a MemTracker that calls ``after_operator(tracker, func, out)`` after every
    operator; ``tracker.live_bytes()`` and ``tracker.phase`` ("forward", "backward", "optimizer") say where
    the step is."""
    class _PerOperator(_step_tracker()):
        step_phase = "forward"

        @property
        def phase(self) -> str:
            return "backward" if self._mod_tracker.is_bw else self.step_phase

        def after_operator(self, func: Any, out: Any) -> None:
            after_operator(self, func, out)

        def start(self, phase: str) -> None:
            self._settle()  # an addition that ended the backward is reported as the backward's
            self.step_phase = phase

    tracker = _PerOperator()
    tracker.track_external(model, opt, x)
    with tracker:
        training_step(model, x, opt, amp, on_phase=tracker.start)


@dataclass
class LiveTensor:
    """A tensor storage alive at the peak: its bytes, category, and the operator, module and phase
    (``"forward"``, ``"backward"``, ``"optimizer"``; ``"setup"`` for weights, optimizer state and the batch)
    that made it."""

    nbytes: int
    category: str
    made_by: str
    module: str
    phase: str
    shape: tuple[int, ...] = ()
    dtype: str = ""


@dataclass
class PeakTensors:
    """The live tensors at the peak of one training step, largest first, and the operator running then."""

    peak: int
    operator: str
    phase: str
    tensors: list[LiveTensor]

    def format(self, min_bytes: int = MiB) -> str:
        """A table of the tensors of at least ``min_bytes``; the rest summed by category."""
        lines = [f"peak {self.peak / MiB:.0f} MiB during {self.operator} ({self.phase})",
                 "| MiB | category | made by | in module | phase | shape | dtype |", "|---:|---|---|---|---|---|---|"]
        small: dict[str, int] = {}
        for t in self.tensors:
            if t.nbytes >= min_bytes:
                shape = "x".join(map(str, t.shape))
                lines.append(f"| {t.nbytes / MiB:.4g} | {t.category} | {t.made_by} | {t.module} | {t.phase} | "
                             f"{shape} | {t.dtype} |")
            else:
                small[t.category] = small.get(t.category, 0) + t.nbytes
        lines += [f"| {v / MiB:.4g} | {k} | (tensors under {min_bytes / MiB:.0f} MiB) | | | | |"
                  for k, v in small.items()]
        return "\n".join(lines)


def peak_tensors(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    optimizer: str = "adam",
    amp: bool | torch.dtype = False,
) -> PeakTensors:
    """The tensors alive at the peak of one (steady-state) training step, as `measure_step_memory` counts
    them, each with the operator and (innermost) module that made it.

    Example::

        print(peak_tensors(lambda: CheckpointUNet(..., checkpoint_policy="all"), (2, 1, 256, 256, 256),
                           estimate=True).format())
    """
    from torch.utils.weak import WeakIdKeyDictionary

    made: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> (made by, module, phase, shape, dtype)
    best: list[Any] = [-1, "", "", []]

    def label(t: torch.Tensor, what: str, module: str, phase: str) -> None:
        if t.untyped_storage() not in made:
            made[t.untyped_storage()] = (what, module, phase, tuple(t.shape), str(t.dtype).replace("torch.", ""))

    def after_operator(tracker: Any, func: Any, out: Any) -> None:
        parents = tracker._mod_tracker.parents
        module = max(parents, key=lambda n: (n != "Global", n.count("."), len(n)), default="")
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                label(t, str(func), module, tracker.phase)
        total = tracker.live_bytes()
        if total > best[0]:
            live = []
            for st, (winfo, _) in list(tracker._WINFO.items()):
                if winfo.mem_consumed:
                    category = _MEMTRACKER_NAMES.get(str(winfo.reftype.value), str(winfo.reftype.value))
                    live.append(LiveTensor(winfo.mem_consumed, category, *made.get(st, ("", "", "setup", (), ""))))
            best[:] = [total, str(func), tracker.phase, live]

    with _steady_state(factory, input_shape, estimate, torch.device("cpu"), optimizer, amp) as (model, opt, x, _):
        for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
            label(p, "parameter" if isinstance(p, nn.Parameter) else "buffer", name, "setup")
        for state in (opt.state.values() if opt is not None else ()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    label(value, f"optimizer state {key}", "", "setup")
        label(x, "input batch", "", "setup")
        _run_tracked_step(model, opt, x, amp, after_operator)
    peak, operator, at_phase, live = best
    return PeakTensors(peak, operator, at_phase, sorted(live, key=lambda t: -t.nbytes))


def _fake_mode():  # noqa: ANN202
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()

