"""The planner: fit a volume and batch into a memory budget with the least recomputation.

``plan(network, spatial_shape, budget_gb)`` (`fit`) profiles the network's blocks (`profile`: bytes each keeps for
backward, what it passes on, what a ``"cheap"`` checkpoint keeps, forward and recompute time; fake tensors where
the real size would not fit), then chooses how to run every segment (plainly, checkpointed whole, checkpointed
"cheap", or cut into runs of consecutive blocks, each run plain/full/cheap) with an exact dynamic program over
the chain (`model`): for each prefix of segments it keeps the Pareto front of (bytes kept for backward, recompute
time), and a choice is admissible only if the backward peak it implies fits. The front's fastest admissible end is
optimal for that memory model (as rotor does for chains), not a rule of thumb.

Only when no such policy fits does it search the opt-in nested mode (`search.Planner.smallest` with ``nested``,
moves from `moves`): groups whose recomputation checkpoints runs of their blocks again, each candidate measured.

The model is then checked against the measurement it stands for (`step.measured_peak`): the chosen policy's whole
training step is run under MemTracker on fake tensors (exact live-tensor bytes, see DESIGN.md), and the model's
budget is tightened until that measured peak fits. The plan's ``predicted_peak_bytes`` is this measured figure; the
fixed policies are measured too and the plan is never slower than the fastest one that fits. On CUDA a budget keeps
a headroom (`device`). `capacity` answers how large a patch or batch fits.

``plan_inference(network, image_shape, roi_size, budget_gb)`` (`inference`) answers the same question for
inference: the settings of MONAI's ``sliding_window_inference`` with which one whole image fits a budget fastest.

Sizes are in GiB (2**30 bytes), as GPU memory is counted.
"""

from .capacity import DEFAULT_BUDGETS_GB, capacity_table, format_capacity_table, max_batch_size, max_patch_edge
from .device import CUDA_HEADROOM_FRACTION, CUDA_HEADROOM_MIN_GB
from .fit import plan, plan_for_network, planning_loss
from .inference import InferencePlan, plan_inference
from .profile import TIME_VOXELS
from .result import GiB, Plan
from .search import FIXED_POLICIES

__all__ = [
    "CUDA_HEADROOM_FRACTION",
    "CUDA_HEADROOM_MIN_GB",
    "DEFAULT_BUDGETS_GB",
    "FIXED_POLICIES",
    "GiB",
    "InferencePlan",
    "Plan",
    "TIME_VOXELS",
    "capacity_table",
    "format_capacity_table",
    "max_batch_size",
    "max_patch_edge",
    "plan",
    "plan_for_network",
    "plan_inference",
    "planning_loss",
]
