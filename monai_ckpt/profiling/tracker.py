"""The exact live-tensor peak of a training step: torch's ``MemTracker``, counting gradient additions as autograd
makes them in training (`step_tracker`), and ``measure_step_memory``, the measurement every figure, test and plan
rests on. On a CUDA device it also reports ``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .step import MiB, LabelBatch, steady_state, training_step

__all__ = ["CATEGORIES", "CATEGORY_NAMES", "StepMemory", "measure_step_memory", "run_tracked_step", "step_tracker"]

CATEGORIES = ("params", "buffers", "grads", "activations", "temporaries", "optimizer", "other")
CATEGORY_NAMES = {
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
def step_tracker() -> type:
    """The class of a MemTracker (torch.distributed._tools) that counts what a training step allocates without a
    dispatch mode: the engine's addition of a second gradient into one it holds alone is counted as in place, as
    autograd does it without a mode (see `_accumulated_in_place`). ``live_bytes()`` gives the live bytes now;
    subclasses override ``after_operator(func, out)``, called once per operator with ``live_bytes()`` as at its
    end."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _UpdateType

    class _StepTracker(MemTracker):
        # a compiled graph's RNG replay (run_and_save_rng_state) passes through: its outputs are tracked as any
        supports_higher_order_operators = True

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
    with steady_state(factory, input_shape, estimate, device, optimizer, amp, label) as (model, opt, x, y):
        cuda = device.type == "cuda" and not estimate
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        tracker = step_tracker()()
        tracker.track_external(model, opt, x, *(() if y is None else (y,)))
        with tracker:
            training_step(model, x, opt, amp, loss=loss, label=y)
        snapshot = tracker.get_tracker_snapshot("peak")
    per_device = snapshot.get(device) or next(iter(snapshot.values()))
    by_category = {CATEGORY_NAMES.get(str(k.value) if hasattr(k, "value") else str(k), str(k)): int(v)
                   for k, v in per_device.items() if k != "Total"}
    result = StepMemory(peak=int(per_device["Total"]), by_category=by_category)
    if cuda:
        torch.cuda.synchronize(device)
        result.cuda_max_allocated = torch.cuda.max_memory_allocated(device)
    return result


def run_tracked_step(model: nn.Module, opt: Any, x: torch.Tensor, amp: bool | torch.dtype,
                      after_operator: Callable[[Any, Any, Any], None]) -> None:
    """One training step under a MemTracker that calls ``after_operator(tracker, func, out)`` after every
    operator; ``tracker.live_bytes()`` and ``tracker.phase`` ("forward", "backward", "optimizer") say where
    the step is."""
    class _PerOperator(step_tracker()):
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
