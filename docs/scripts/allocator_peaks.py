"""docs/benchmarks/index.md, "What the live-tensor figures count": one training step of each policy measured three ways on
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
import json
import sys

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import measure_step_memory
from monai_ckpt.profiling.allocator import allocator_step


if __name__ == "__main__":
    network, size, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    shape = (1, 1, size, size, size)
    print(f"{network} {size}^3 batch 1, MiB | live tensors (MemTracker) | live tensors, no dispatch mode | "
          "allocator peak | accumulations in place / out of place: no mode; under a mode")
    for spec in policies:
        factory = network_factory(network, 3, 1, json.loads(spec))
        live = measure_step_memory(factory, shape).peak
        peak, at_ends, inplace, outplace = allocator_step(factory, shape)
        _, _, inplace_mode, outplace_mode = allocator_step(factory, shape, under_a_mode=True)
        print(f"| {spec} | {live / 2**20:.1f} | {at_ends / 2**20:.1f} | {peak / 2**20:.1f} | "
              f"{inplace}/{outplace}; {inplace_mode}/{outplace_mode} |", flush=True)
