"""docs/benchmarks/swinunetr.md: step-time ratios of SwinUNETR (BTCV preset) at 64^3 batch 1: plain, our "blocks",
MONAI's use_checkpoint=True, checkpoint_submodules on its natural blocks; interleaved in one process, process CPU time, median of 3 after 1 warm-up."""
import torch
from monai.networks.nets import SwinUNETR
from monai_ckpt.checkpoint import checkpoint_submodules
from monai_ckpt.networks.presets import NETWORKS, network_factory
from monai_ckpt.profiling import step_time_ratios
torch.set_num_threads(2)
kw = NETWORKS["swinunetr"][2](3, 1)
def hand():
    net = SwinUNETR(**kw)
    checkpoint_submodules(net, predicate=lambda n, m: type(m).__name__ in ("SwinTransformerBlock", "UnetResBlock"))
    return net
rows = [("plain", lambda: SwinUNETR(**kw)), ("blocks", network_factory("swinunetr", 3, 1, "blocks")),
        ("use_checkpoint=True", lambda: SwinUNETR(**kw, use_checkpoint=True)), ("checkpoint_submodules", hand)]
_, ratios = step_time_ratios([f for _, f in rows], (1, 1, 64, 64, 64), steps=3, warmup=1)
for (n, _), r in zip(rows, ratios):
    print(f"{n}: {r:.2f}", flush=True)
