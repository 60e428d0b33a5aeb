"""The CPU allocator's view of a training step (torch's profiler hooks the allocator, not the dispatcher): what
the live-tensor figures are checked against (docs/scripts/allocator_peaks.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .blocks import storage_bytes, storages_of
from .step import steady_state, training_step

__all__ = ["allocator_step"]

def allocator_step(factory: Callable[[], nn.Module], input_shape: Sequence[int], under_a_mode: bool = False,
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

    with steady_state(factory, input_shape, False, torch.device("cpu"), "adam", False) as (model, opt, x, _):
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        resident = storage_bytes(storages_of(*model.parameters(), *model.buffers(), x, *state))
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
