"""docs/guide/inference.md: on the CPU, the plan's time against the fastest setting that fits, measured.

The brain-tissue bundle's inference: its UNet (8, 16, 32, 64 channels, instance norm, 4 classes), its first test
image through its own preprocessing (2 mm, (1, 1, 97, 115, 97)), its inferer's window (48^3, overlap 0.5, gaussian).

1. ``plan_inference`` on the CPU into --budget-mib (it times the network's forwards itself).
2. Every ``sw_batch_size`` of 1, 2, 4, ... 32, at most the number of windows (and autocast with --amp): its peak
   measured on real tensors with MemTracker (the real call), and, for those that fit, the time of the real
   ``sliding_window_inference`` call:
   --rounds rounds after one warm-up, each round running every setting once in a rotating order, process CPU
   time, median.
3. The plan's time over the fastest setting that fits.

    python docs/scripts/inference_cpu_times.py --budget-mib 80
    python docs/scripts/inference_cpu_times.py --budget-mib 80 --amp
"""
import argparse
import json
import statistics
import time

import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference

from monai_ckpt import plan_inference
from monai_ckpt.profiling import sliding_window_memory

parser = argparse.ArgumentParser()
parser.add_argument("--budget-mib", type=float, default=80)
parser.add_argument("--amp", action="store_true", help="autocast allowed")
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--json", default="inference_cpu_times.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)

config = ConfigParser()
config.read_config("bundles/brain_tissue_segmentation/configs/inference.json")
config["bundle_root"] = "bundles/brain_tissue_segmentation"
image = config.get_parsed_content("preprocessing")(config.get_parsed_content("datalist")[0])["image"][None]
image = image.as_tensor() if hasattr(image, "as_tensor") else image
net = config.get_parsed_content("network_def").eval()
inferer = config.get_parsed_content("inferer")
roi, overlap, mode = tuple(inferer.roi_size), inferer.overlap, str(inferer.mode.value)
print(f"image {tuple(image.shape)}, roi {roi}, overlap {overlap}, {mode}; threads {args.threads}", flush=True)

budget_gb = args.budget_mib / 1024
t0 = time.perf_counter()
p = plan_inference(net, tuple(image.shape), roi, budget_gb, overlap=overlap, mode=mode, amp=args.amp)
print(p, f"\n(planned in {time.perf_counter() - t0:.1f} s wall)", flush=True)

batches = sorted({min(b, p.windows) for b in (1, 2, 4, 8, 16, 32)})  # a batch of more windows is all of them
settings = [(b, a) for b in batches for a in ((False, True) if args.amp else (False,))]
peaks = {}
for b, a in settings:
    peaks[(b, a)] = sliding_window_memory(net, tuple(image.shape), roi, sw_batch_size=b, overlap=overlap, mode=mode,
                                          amp=a, estimate=False).peaks["cpu"]
    print(f"sw_batch_size={b} autocast={a}: measured peak {peaks[(b, a)] / 2**20:.1f} MiB", flush=True)
fitting = [s for s in settings if peaks[s] <= p.budget_bytes]
chosen = (p.sw_batch_size, p.amp)
assert chosen in fitting and peaks[chosen] == p.peak_bytes, (chosen, peaks.get(chosen), p.peak_bytes)

times: dict = {s: [] for s in fitting}
with torch.no_grad():
    for r in range(args.rounds + 1):
        for k in range(len(fitting)):
            b, a = fitting[(r + k) % len(fitting)]
            with torch.autocast("cpu", enabled=a):
                c0 = time.process_time()
                sliding_window_inference(image, roi, b, net, overlap, mode)
                if r:
                    times[(b, a)].append(time.process_time() - c0)
median = {s: statistics.median(t) for s, t in times.items()}
fastest = min(median, key=median.get)
print(f"\nbudget {args.budget_mib} MiB; plan: sw_batch_size={chosen[0]}, autocast={chosen[1]}")
print("| sw_batch_size | autocast | peak (measured) | time / fastest (median of rounds) | plan |")
print("|---:|---|---:|---:|---|")
for s in settings:
    t = f"{median[s] / median[fastest]:.2f}" if s in median else "does not fit"
    mark = "plan" if s == chosen else ""
    print(f"| {s[0]} | {'yes' if s[1] else 'no'} | {peaks[s] / 2**20:.1f} MiB | {t} | {mark} |")
print(f"plan / fastest that fits: {median[chosen] / median[fastest]:.2f}")
json.dump(dict(budget_mib=args.budget_mib, amp=args.amp, rounds=args.rounds, plan=chosen,
               peaks={str(k): v for k, v in peaks.items()}, times={str(k): v for k, v in times.items()},
               predicted_time_ratio=p.time_ratio), open(args.json, "w"), indent=1)
