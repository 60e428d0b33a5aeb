"""Least-memory policies of the benchmark UNet under the drop-in contract (each block recomputed at most once):
peak at 256^3 batch 2 (FakeTensorMode estimate, fp32 and bf16 autocast) as % of the fp32 plain peak, and the
step-time ratio at 96^3 batch 1 on the CPU (interleaved, median of 7). Run from the repository root."""
import json

import torch

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import measure_step_memory, step_time_ratios

LEVEL0 = [["decoder1.0", "decoder1.1"], "decoder1.2", "decoder0.0", ["decoder0.1", "decoder0.2"]]
POLICIES = {
    "all": "all",
    "every 2": {"every": 2},
    "planner smallest() (fp32)": ["encoder0", "encoder1", "encoder2", "encoder3", "bottleneck", "decoder3", "decoder2",
                                  *LEVEL0],
    "local search (fp32)": ["encoder0", "encoder1", ["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2"],
                            *LEVEL0],
    "local search (bf16)": [["encoder0", "encoder1"], ["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2",
                                                       "decoder1"], "decoder0"],
}


def peak(policy, amp):
    return measure_step_memory(network_factory("unet", 3, 1, policy), (2, 1, 256, 256, 256), estimate=True,
                               amp=amp).peak


if __name__ == "__main__":
    torch.set_num_threads(2)
    plain = peak("none", False)
    _, ratios = step_time_ratios([network_factory("unet", 3, 1, p) for p in ["none", *POLICIES.values()]],
                                 (1, 1, 96, 96, 96), steps=7, warmup=1)
    print("| policy | fp32 peak MiB | % of fp32 plain | bf16 peak MiB | % of fp32 plain | time x (96^3, fp32) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| plain | {plain / 2**20:.0f} | 100.0% | {peak('none', True) / 2**20:.0f} | "
          f"{100 * peak('none', True) / plain:.1f}% | 1.00 |")
    for (name, policy), ratio in zip(POLICIES.items(), ratios[1:]):
        fp32, bf16 = peak(policy, False), peak(policy, True)
        print(f"| {name}: `{json.dumps(policy)}` | {fp32 / 2**20:.0f} | {100 * fp32 / plain:.1f}% | "
              f"{bf16 / 2**20:.0f} | {100 * bf16 / plain:.1f}% | {ratio:.2f} |")
