"""docs/planner.md: the planner vs the fixed policies on the benchmark UNet, 256^3 batch 2 (fake-tensor peaks),
step-time ratios measured at 96^3 batch 1 on the CPU (interleaved, rotating order, process CPU time)."""
import json, sys, torch
import monai_ckpt.planner as P
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import step_time_ratios
torch.set_num_threads(2)
net = network_factory("unet", 3, 1)()
shape = (2, 1, 256, 256, 256)
pl = P._Planner(net, shape, False, "adam")
plain = pl.peak("none")
rows = []
for frac in (0.80, 0.65, 0.55, 0.50):
    budget = int(frac * plain)
    p = pl.plan(budget)
    fits = [(pl.time_ratio(f), f) for f in P.FIXED_POLICIES if f != "none" and pl.peak(f) <= budget]
    fastest = min(fits, key=lambda t: t[0]) if fits else None
    rows.append(dict(fraction=frac, budget=budget, plan=p.policy, plan_peak=p.predicted_peak_bytes, plan_pred=p.predicted_time_ratio,
                     fixed=fastest[1] if fastest else None, fixed_peak=pl.peak(fastest[1]) if fastest else None,
                     fixed_pred=fastest[0] if fastest else None))
    print(rows[-1], flush=True)
pols = ["none"] + [r["plan"] for r in rows] + sorted({json.dumps(r["fixed"]) for r in rows if r["fixed"]}, key=str)
pols = [p if not (isinstance(p, str) and p.startswith(("\"", "{", "["))) else json.loads(p) for p in pols]
_, ratios = step_time_ratios([lambda p=p: P._replica(net, p) for p in pols], (1, 1, 96, 96, 96), steps=5, warmup=1)
measured = {json.dumps(p): r for p, r in zip(pols, ratios)}
print("measured", measured, flush=True)
json.dump(dict(plain=plain, rows=rows, measured=measured), open("fixed_vs_plan.json", "w"), indent=1, default=str)
