"""docs/guide/inference.md: what MONAI's sliding_window_inference needs at clinical sizes, and what the plan runs, for GPU
budgets of 8, 16, 24 and 80 GiB.

Per scenario, the peak of the real call on each device (`monai_ckpt.profiling.sliding_window_memory`: MemTracker on
fake tensors, the windows on the GPU, the host's tensors apart) for a few settings, which budgets each fits (the
GPU's tensors get the budget less the CUDA headroom: 10%, at least 0.25 GiB), and ``plan_inference(...,
device="cuda")`` for each budget. Planned on a machine without a GPU, so nothing is timed and the plan keeps
``sw_batch_size=1``.

    python docs/scripts/inference_memory.py                 # all four scenarios
    python docs/scripts/inference_memory.py --only brats
"""
import argparse
import json

from monai_ckpt import plan_inference
from monai_ckpt.plan import network_factory
from monai_ckpt.planner.device import headroom_bytes
from monai_ckpt.profiling import sliding_window_memory

import torch

SCENARIOS = {  # name: (network preset, in channels, classes, image D H W, roi)
    "brain": ("unet", 1, 4, (256, 256, 256), (128, 128, 128)),
    "brats": ("segresnet", 4, 3, (240, 240, 155), (128, 128, 128)),
    "chest-ct-14": ("swinunetr", 1, 14, (512, 512, 400), (96, 96, 96)),
    "chest-ct-105": ("dynunet", 1, 105, (512, 512, 400), (128, 128, 128)),
}
SETTINGS = [  # label, sw_batch_size, output stitched on the GPU, buffer_steps, buffer_dim
    ("MONAI's defaults: sw_batch_size=1, output on the GPU", 1, True, None, -1),
    ("sw_batch_size=4 (the bundles'), output on the GPU", 4, True, None, -1),
    ("sw_batch_size=16, output on the GPU", 16, True, None, -1),
    ("sw_batch_size=1, output on the host", 1, False, None, -1),
    ("sw_batch_size=4, output on the host", 4, False, None, -1),
    ("sw_batch_size=1, output on the host, buffer_steps=1, buffer_dim=0", 1, False, 1, 0),
]
BUDGETS = (8, 16, 24, 80)
GiB = 2**30

parser = argparse.ArgumentParser()
parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS))
parser.add_argument("--json", default="inference_memory.json")
args = parser.parse_args()


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


results = {}
for name in args.only or SCENARIOS:
    preset, channels, classes, spatial, roi = SCENARIOS[name]
    net = network_factory(preset, 3, channels, classes)()
    image = (1, channels, *spatial)
    profiles: dict = {}
    rows = []
    for label, b, on_gpu, steps, dim in SETTINGS:
        m = sliding_window_memory(net, image, roi, sw_batch_size=b, sw_device="cuda",
                                  device="cuda" if on_gpu else "cpu", buffer_steps=steps, buffer_dim=dim,
                                  profiles=profiles)
        rows.append((label, m.peaks["cuda"], m.peaks.get("cpu", 0)))
        print(name, label, m.peaks, flush=True)
    plans = {}
    for budget in BUDGETS:
        try:
            p = plan_inference(net, image, roi, budget, device="cuda")
            plans[budget] = (p.sliding_window_kwargs(), p.peak_bytes, p.host_peak_bytes)
        except ValueError as error:
            plans[budget] = str(error)
    results[name] = dict(rows=rows, plans={str(k): v for k, v in plans.items()}, windows=m.windows,
                         output_bytes=(classes + 1) * m.output_shape[2] * m.output_shape[3] * m.output_shape[4] * 4)
    limits = {b: b * GiB - headroom_bytes(None, b * GiB, torch.device("cuda")) for b in BUDGETS}
    print(f"\n#### {name}: {preset}, {channels} channel(s), {classes} classes, image {spatial}, roi {roi}, overlap "
          f"0.25: {m.windows} windows; output and count map {size(results[name]['output_bytes'])}\n")
    print("| setting | GPU peak | host peak | " + " | ".join(f"{b} GiB" for b in BUDGETS) + " |")
    print("|---|---:|---:|" + "---|" * len(BUDGETS))
    for label, gpu, host in rows:
        fits = " | ".join("fits" if gpu <= limits[b] else "-" for b in BUDGETS)
        print(f"| {label} | {size(gpu)} | {size(host) if host else '-'} | {fits} |")
    cells = []
    for b in BUDGETS:
        plan = plans[b]
        if isinstance(plan, str):
            cells.append("nothing fits")
            continue
        kw, gpu, host = plan
        where = "GPU" if kw["device"] == "cuda" else "host"
        buffers = f", buffer_steps={kw['buffer_steps']}, buffer_dim={kw['buffer_dim']}" if kw["buffer_steps"] else ""
        cells.append(f"output on the {where}{buffers}: {size(gpu)}" + (f" + host {size(host)}" if host else ""))
    print("| **plan** (sw_batch_size=1: not timed here) | | | " + " | ".join(cells) + " |", flush=True)
json.dump(results, open(args.json, "w"), indent=1, default=str)
