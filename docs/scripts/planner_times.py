"""Step-time ratios at 96^3 batch 1, CPU, of the plans and fixed policies in fixed_vs_plan.json."""
import json, torch
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import replica, step_time_ratios
torch.set_num_threads(2)
d = json.load(open("fixed_vs_plan.json"))
net = network_factory("unet", 3, 1)()
keys = list(d["measured"])
pols = [json.loads(k) for k in keys]
_, ratios = step_time_ratios([lambda p=p: replica(net, p) for p in pols], (1, 1, 96, 96, 96), steps=7, warmup=1)
for k, r in zip(keys, ratios):
    print(f"{r:.3f} {k}")
json.dump(dict(zip(keys, ratios)), open("times.json", "w"), indent=1)
