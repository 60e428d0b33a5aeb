"""docs/benchmarks/unet.md, "Planned policies: the fast target": the plans the planner chose at 55% of the plain
256^3 batch-2 peak in this round's runs (its time profile is measured, so calls on a busy machine can choose
different plans of nearly equal predicted cost) and "all": peak (fake tensors) and step-time ratios at 96^3
batch 1 on the CPU (interleaved, median of 7 after 1 warm-up), repeated 5 times in one process; prints each
run, then the median and the range of the five. Run from the repository root on a quiet machine (~5 minutes)."""
import json
import statistics

import torch

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import measure_step_memory, step_time_ratios

torch.set_num_threads(2)
PLANS = {
    "plan A": [{"names": ["encoder0", "decoder2"]},
               {"names": ["encoder1", "encoder2", "encoder3.1", "bottleneck", "decoder3", "decoder1", "decoder0.1"],
                "mode": "cheap"}],
    "plan B": [{"names": ["encoder0", "encoder1", "decoder1.2"]},
               {"names": ["encoder2", "bottleneck", ["decoder3.0", "decoder3.1"], "decoder3.2", "decoder2",
                          ["decoder1.0", "decoder1.1"], "decoder0.0"], "mode": "cheap"}],
    "plan C": [{"names": ["encoder0", "encoder1", "encoder2", "decoder1.2"]},
               {"names": ["bottleneck", "decoder3", "decoder2", ["decoder1.0", "decoder1.1"], "decoder0.0"],
                "mode": "cheap"}],
}
policies = {"plain": "none", **PLANS, "all": "all"}


def peak(policy):
    return measure_step_memory(network_factory("unet", 3, 1, policy), (2, 1, 256, 256, 256), estimate=True).peak


plain = peak("none")
for name, policy in PLANS.items():
    print(f"{name}: {json.dumps(policy)}: {100 * peak(policy) / plain:.1f}% of the plain peak")
runs = []
for _ in range(5):
    _, ratios = step_time_ratios([network_factory("unet", 3, 1, p) for p in policies.values()], (1, 1, 96, 96, 96),
                                 steps=7, warmup=1)
    runs.append(ratios)
    print(" ".join(f"{name} {r:.3f}" for name, r in zip(policies, ratios)), flush=True)
for name, column in zip(policies, zip(*runs)):
    print(f"{name}: median {statistics.median(column):.3f}, range {min(column):.3f}-{max(column):.3f}")
