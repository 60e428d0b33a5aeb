"""docs/benchmarks.md, "Planned policies: the fast target": the 55% plans of the planner with and without runs of
blocks, against plain and "all": step-time ratios at 96^3 batch 1, CPU, interleaved, median of 7."""
import torch
from monai_ckpt.benchmark import network_factory
from monai_ckpt.profiling import step_time_ratios
torch.set_num_threads(2)
old = [{"names": ["encoder0", "encoder1"]}, {"names": ["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2", "decoder1", "decoder0.0"], "mode": "cheap"}]
new = [{"names": ["encoder0", "encoder1", "decoder1.2"]}, {"names": ["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2", ["decoder1.0", "decoder1.1"], "decoder0.0"], "mode": "cheap"}]
pols = ["none", old, new, "all"]
_, r = step_time_ratios([network_factory("unet", 3, 1, p) for p in pols], (1, 1, 96, 96, 96), steps=7, warmup=1)
print(r)
