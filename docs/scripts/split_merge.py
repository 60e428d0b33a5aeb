"""docs/benchmarks/unet.md, "A merge without the concatenation (measured, not shipped)": the benchmark UNet with each
decoder's merge computed as two convolutions over the skip and the upsampled tensor, the weight split along its
input channels (same parameters; the sum rounds differently from one convolution over the concatenation, so it
is not bit-identical to MONAI's). Fake-tensor peaks at 256^3 batch 2 against the unmodified network, the
planner's plan at 55% of the plain peak with the split merge, and its step-time ratio at 96^3 batch 1 on the CPU
(interleaved, median of 7, 4 runs). Run from the repository root; about 5 minutes."""
import json
import statistics

import torch
import torch.nn.functional as F

from monai_ckpt.planner.search import Planner
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.networks import unet
from monai_ckpt.profiling import measure_step_memory, step_time_ratios

SHAPE = (2, 1, 256, 256, 256)
MEMORY_POLICY = ["encoder0", "encoder1", ["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2"],
                 ["decoder1.0", "decoder1.1"], "decoder1.2", "decoder0.0", ["decoder0.1", "decoder0.2"]]
concatenating_join = unet._join


def split_join(skip_connection, up, y, skip):
    if skip_connection.mode != "cat" or not isinstance(up, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
        return concatenating_join(skip_connection, up, y, skip)
    c = skip.shape[1]
    if isinstance(up, torch.nn.ConvTranspose3d):  # weight (in, out, k, k, k)
        def conv(t, w, b):
            return F.conv_transpose3d(t, w, b, up.stride, up.padding, up.output_padding, up.groups, up.dilation)
        w_skip, w_y = up.weight[:c], up.weight[c:]
    else:  # weight (out, in, k, k, k)
        def conv(t, w, b):
            return F.conv3d(t, w, b, up.stride, up.padding, up.dilation, up.groups)
        w_skip, w_y = up.weight[:, :c], up.weight[:, c:]
    return conv(skip, w_skip, up.bias) + conv(y, w_y, None)


def peak(policy, amp=False):
    return measure_step_memory(network_factory("unet", 3, 1, policy), SHAPE, estimate=True, amp=amp).peak


if __name__ == "__main__":
    torch.set_num_threads(2)
    plain = peak("none")  # MONAI's forward: the merge does not matter
    rows = {"all": "all", "memory policy": MEMORY_POLICY}
    before = {name: (peak(p), peak(p, True)) for name, p in rows.items()}
    unet._join = split_join
    for name, p in rows.items():
        after = (peak(p), peak(p, True))
        print(f"{name}: fp32 {100 * before[name][0] / plain:.1f}% -> {100 * after[0] / plain:.1f}%, "
              f"bf16 {100 * before[name][1] / plain:.1f}% -> {100 * after[1] / plain:.1f}% of the fp32 plain peak")
    planner = Planner(network_factory("unet", 3, 1)(), SHAPE, False, "adam")
    plan = planner.plan(int(0.55 * plain))
    print(f"55% plan: {json.dumps(plan.policy)}: {100 * plan.predicted_peak_bytes / plain:.1f}%, "
          f"predicted x{plan.predicted_time_ratio:.3f}")
    runs = []
    for _ in range(4):
        _, ratios = step_time_ratios([network_factory("unet", 3, 1, p) for p in ("none", plan.policy, "all")],
                                     (1, 1, 96, 96, 96), steps=7, warmup=1)
        runs.append(ratios)
        print(" ".join(f"{r:.3f}" for r in ratios), flush=True)
    for name, column in zip(("plain", "55% plan", "all"), zip(*runs)):
        print(f"{name}: median {statistics.median(column):.3f}, range {min(column):.3f}-{max(column):.3f}")
