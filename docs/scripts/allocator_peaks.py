"""docs/benchmarks.md, "What the live-tensor figures count": one training step of each policy measured three ways on
the CPU, real tensors:

- live tensors: the benchmark's figure (torch's MemTracker, a TorchDispatchMode);
- live tensors without a dispatch mode: the CPU allocator's bytes at the end of each top-level operator (torch's
  profiler with profile_memory, which hooks the allocator, not the dispatcher);
- allocator peak: the CPU allocator's highest point, operator-internal buffers included (oneDNN's reorders).

and how many activation-sized gradient accumulations autograd did in place, without a mode and under one (the
engine does not accumulate into a tensor that Python code may still see).

    python docs/scripts/allocator_peaks.py NETWORK SIZE POLICY [POLICY ...]

e.g. ``python docs/scripts/allocator_peaks.py attentionunet 64 '"none"' '"cheap"' '"all"'`` (batch 1, one input
channel, SIZE^3). Run from the repository root."""
import contextlib
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import _nbytes, _steady_state, _storages, measure_step_memory, training_step


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _resident(model, opt, x):
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return _nbytes(_storages(*model.parameters(), *model.buffers(), x, *state))


def profiled_step(factory, shape, under_a_mode=False):
    """(allocator peak, allocator bytes at top-level operator ends, in-place and out-of-place accumulations)."""
    with _steady_state(factory, shape, False, torch.device("cpu"), "adam", False) as (model, opt, x, _):
        resident = _resident(model, opt, x)
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
    activation = [e for e in events if e.input_shapes and len(e.input_shapes[0]) == 5
                  and e.input_shapes[0][0] == shape[0] and min(e.input_shapes[0][2:]) >= 4]  # not weights
    engine = [e.name for e in activation if e.cpu_parent is not None and e.cpu_parent.name.startswith("autograd::engine")]
    return resident + peak, resident + at_ends, engine.count("aten::add_"), engine.count("aten::add")


if __name__ == "__main__":
    network, size, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    shape = (1, 1, size, size, size)
    print(f"{network} {size}^3 batch 1, MiB | live tensors (MemTracker) | live tensors, no dispatch mode | "
          "allocator peak | accumulations in place / out of place: no mode; under a mode")
    for spec in policies:
        factory = network_factory(network, 3, 1, json.loads(spec))
        live = measure_step_memory(factory, shape).peak
        peak, at_ends, inplace, outplace = profiled_step(factory, shape)
        _, _, inplace_mode, outplace_mode = profiled_step(factory, shape, under_a_mode=True)
        print(f"| {spec} | {live / 2**20:.1f} | {at_ends / 2**20:.1f} | {peak / 2**20:.1f} | "
              f"{inplace}/{outplace}; {inplace_mode}/{outplace_mode} |", flush=True)
