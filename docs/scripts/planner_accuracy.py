"""docs/benchmarks/planner.md accuracy table: predicted peak vs the real MemTracker peak on the CPU."""
import json, torch
from monai_ckpt.planner.search import Planner
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import measure_step_memory, replica
torch.set_num_threads(2)
GiB = 2**30
out = []
for name, shape in [("unet", (1, 1, 96, 96, 96)), ("unet", (2, 1, 64, 64, 64)), ("vnet", (1, 1, 64, 64, 64)),
                    ("dynunet", (1, 1, 64, 64, 64))]:
    net = network_factory(name, 3, 1)()
    pl = Planner(net, shape, False, "adam")
    plain, small = pl.peak("none"), pl.smallest()[1]
    for frac in (0.75, 0.4):
        budget = int(small + frac * (plain - small))
        p = pl.plan(budget)
        real = measure_step_memory(lambda: replica(net, p.policy), shape).peak
        model = pl.modelled_peak(p.policy)
        row = dict(network=name, shape=shape, budget=budget, plain=plain, policy=p.policy, predicted=p.predicted_peak_bytes,
                   measured=real, model=model)
        print(json.dumps(row, default=str), flush=True)
        out.append(row)
json.dump(out, open("accuracy.json", "w"), indent=1, default=str)
