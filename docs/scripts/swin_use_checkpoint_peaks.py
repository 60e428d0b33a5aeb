"""docs/guide/model_zoo.md: estimated training-step peaks (fake tensors, exact live-tensor bytes) of the model zoo's
BTCV SwinUNETR, which ships ``use_checkpoint=True``: MONAI's network with and without its flag, and ours with the flag
under each kind of policy. Usage: ``python docs/scripts/swin_use_checkpoint_peaks.py 1 1 96 96 96`` (the input shape;
the bundle's patch by default)."""
import json
import sys

import torch
from monai.networks.nets import SwinUNETR

from monai_ckpt import CheckpointSwinUNETR
from monai_ckpt.profiling import measure_step_memory

shape = tuple(int(s) for s in sys.argv[1:]) or (1, 1, 96, 96, 96)
zoo = dict(spatial_dims=3, in_channels=1, out_channels=14, feature_size=48, use_checkpoint=True)
rows = {"SwinUNETR(use_checkpoint=True)": lambda: SwinUNETR(**zoo),
        "SwinUNETR(use_checkpoint=False)": lambda: SwinUNETR(**dict(zoo, use_checkpoint=False))}
for policy in ("none", "cheap", "offload", "blocks", "all"):
    rows[f"CheckpointSwinUNETR(use_checkpoint=True, {policy!r})"] = (
        lambda p=policy: CheckpointSwinUNETR(**zoo, checkpoint_policy=p))
peaks = {name: round(measure_step_memory(factory, shape, estimate=True).peak / 2**30, 2) for name, factory in rows.items()}
print(json.dumps({"input": shape, "torch": torch.__version__, "peak_gib": peaks}, indent=1))
