"""docs/benchmarks/planner.md, docs/benchmarks/segresnet.md, docs/benchmarks/attentionunet.md: the planner's plan vs the fixed policies that fit, per budget.

For each budget (a fraction of the plain peak at --plan-shape): the plan, and every fixed policy whose peak fits
(fake-tensor MemTracker peaks, exact); then the step-time ratios of all of them, measured on the CPU at
--time-shape batch 1, interleaved in one process (rotating order, process CPU time, median of --steps after one
warm-up). Writes fixed_vs_plan.json (or --json) and prints a markdown table.

    python docs/scripts/planner_fixed_vs_plan.py                    # UNet: plans at 256^3 batch 2, times at 96^3
    python docs/scripts/planner_fixed_vs_plan.py --network segresnet --plan-shape 1 1 64 64 64 \\
        --time-shape 64 64 64 --fractions 0.8 0.7 0.6
"""
import argparse
import json

import torch

import monai_ckpt.planner as P
from monai_ckpt.planner.search import Planner
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import replica, step_time_ratios

parser = argparse.ArgumentParser()
parser.add_argument("--network", default="unet")
parser.add_argument("--plan-shape", type=int, nargs="+", default=[2, 1, 256, 256, 256], help="B C D H W of the peaks")
parser.add_argument("--time-shape", type=int, nargs="+", default=[96, 96, 96], help="D H W of the timed steps")
parser.add_argument("--fractions", type=float, nargs="+", default=[0.80, 0.65, 0.55, 0.50])
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--json", default="fixed_vs_plan.json")
args = parser.parse_args()
torch.set_num_threads(2)
shape = tuple(args.plan_shape)
net = network_factory(args.network, len(shape) - 2, shape[1])()
pl = Planner(net, shape, False, "adam", progress=lambda m: print(f"[plan] {m}", flush=True))
plain = pl.peak("none")
rows = []
for frac in args.fractions:
    budget = int(frac * plain)
    p = pl.plan(budget)
    fits = [f for f in P.FIXED_POLICIES if f != "none" and pl.peak(f) <= budget]
    rows.append(dict(fraction=frac, budget=budget, plan=p.policy, plan_peak=p.predicted_peak_bytes,
                     plan_pred=p.predicted_time_ratio,
                     fixed=[dict(policy=f, peak=pl.peak(f), pred=pl.time_ratio(f)) for f in fits]))
    print(json.dumps(rows[-1]), flush=True)
texts = ["\"none\""] + list(dict.fromkeys(json.dumps(r["plan"]) for r in rows))
texts += [t for t in dict.fromkeys(json.dumps(f["policy"]) for r in rows for f in r["fixed"]) if t not in texts]
pols = [json.loads(t) for t in texts]
print(f"timing {len(pols)} policies at {args.time_shape}", flush=True)
_, ratios = step_time_ratios([lambda p=p: replica(net, p) for p in pols], (1, shape[1], *args.time_shape),
                             steps=args.steps, warmup=1)
measured = dict(zip(texts, ratios))
print("measured", json.dumps(measured), flush=True)
json.dump(dict(network=args.network, plan_shape=shape, time_shape=args.time_shape, plain=plain, rows=rows,
               measured=measured), open(args.json, "w"), indent=1, default=str)

MiB = 2**20
print(f"\n{args.network}: plain peak {plain / MiB:.1f} MiB at {shape}; time x measured at {args.time_shape} batch 1")
print("| budget | plan | its peak | time x | fixed policies that fit: peak, time x | plan vs fastest fixed |")
print("|---|---|---:|---:|---|---|")
for r in rows:
    text = json.dumps(r["plan"])
    fixed = sorted(r["fixed"], key=lambda f: measured[json.dumps(f["policy"])])
    cells = ", ".join(f"`{json.dumps(f['policy'])}` {f['peak'] / MiB:.1f} MiB {measured[json.dumps(f['policy'])]:.2f}"
                      for f in fixed) or "none fits"
    verdict = "-" if not fixed else f"{measured[text] - measured[json.dumps(fixed[0]['policy'])]:+.2f}"
    print(f"| {r['fraction']:.0%} ({r['budget'] / MiB:.1f} MiB) | `{text}` | {r['plan_peak'] / MiB:.1f} MiB "
          f"({r['plan_peak'] / plain:.1%}) | {measured[text]:.2f} | {cells} | {verdict} |")
