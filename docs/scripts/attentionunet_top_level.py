"""docs/benchmarks/attentionunet.md: what the top level costs. Policies that differ in how much below the top level
they checkpoint, all with the top level (``encoder0`` and the up-convolution and gate of ``decoder0``) whole: the
peak at 128^3 (estimate, Adam, mean(out**2)) and the step time at 64^3 batch 1 relative to the plain parent (CPU,
2 threads, interleaved in one process, user CPU time: `step_time_ratios(clock="user")`; median of 3 runs of 5 steps).

    python docs/scripts/attentionunet_top_level.py

Run from the repository root, on an otherwise idle machine."""
import torch

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import measure_step_memory, step_time_ratios

TOP = ["encoder0", ["decoder0.0", "decoder0.1"]]
POLICIES = {
    "the top level only": [{"names": TOP}],
    "+ level 1 cheap": [{"names": TOP}, {"names": ["encoder1", "decoder1"], "mode": "cheap"}],
    "+ levels 1-2 cheap": [{"names": TOP}, {"names": ["encoder1", "decoder1", "encoder2", "decoder2"], "mode": "cheap"}],
    "+ encoder1 whole, decoder1 cheap": [{"names": TOP + ["encoder1"]}, {"names": ["decoder1"], "mode": "cheap"}],
    "+ levels 1-4 cheap (the planner's)": [
        {"names": TOP},
        {"names": ["encoder1", "encoder2", "encoder3", "bottleneck", "decoder3", "decoder2", "decoder1"],
         "mode": "cheap"}],
}

if __name__ == "__main__":
    torch.set_num_threads(2)
    factories = [network_factory("attentionunet", 3, 1, "none")]
    factories += [network_factory("attentionunet", 3, 1, p) for p in POLICIES.values()]
    peaks = [measure_step_memory(f, (1, 1, 128, 128, 128), estimate=True).peak for f in factories]
    runs = [step_time_ratios(factories, (1, 1, 64, 64, 64), steps=5, clock="user")[1] for _ in range(3)]
    print("| policy | peak at 128^3 | vs plain | time x at 64^3, user (range) |\n|---|---:|---:|---:|")
    for i, name in enumerate(["plain", *POLICIES]):
        r = sorted(run[i] for run in runs)
        print(f"| {name} | {peaks[i] / 2**20:.0f} MiB | {100 * peaks[i] / peaks[0]:.1f}% | {r[1]:.2f} ({r[0]:.2f}-{r[2]:.2f}) |")
