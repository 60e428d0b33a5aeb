"""monai-ckpt: correct, planned and measured gradient checkpointing for MONAI's 3D segmentation networks.

The public names are imported on first use (PEP 562), so that ``import monai_ckpt`` and the command lines'
``--help`` do not pay for importing torch and MONAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "CHECKPOINT_MODES": ".checkpoint",
    "CheckpointGroup": ".policies",
    "CheckpointAttentionUnet": ".networks",
    "CheckpointBasicUNet": ".networks",
    "CheckpointBasicUNetPlusPlus": ".networks",
    "CheckpointDynUNet": ".networks",
    "CheckpointSegResNet": ".networks",
    "CheckpointSegResNetDS": ".networks",
    "CheckpointSwinUNETR": ".networks",
    "CheckpointUNet": ".networks",
    "CheckpointVNet": ".networks",
    "CheckpointedSequential": ".checkpoint",
    "InferencePlan": ".planner",
    "InputShapeError": ".networks",
    "Plan": ".planner",
    "Segment": ".policies",
    "checkpoint": ".checkpoint",
    "checkpoint_submodules": ".checkpoint",
    "disable_checkpointing": ".networks",
    "enable_checkpointing": ".networks",
    "plan": ".planner",
    "plan_inference": ".planner",
    "resolve_policy": ".policies",
    "validate_policy": ".policies",
}
_SUBMODULES = ("arguments", "benchmark", "chain", "checkpoint", "data", "handlers", "inferers", "io", "lazy",
               "networks", "planner", "plots", "policies", "profiling")

__all__ = [
    "CHECKPOINT_MODES",
    "CheckpointGroup",
    "CheckpointAttentionUnet",
    "CheckpointBasicUNet",
    "CheckpointBasicUNetPlusPlus",
    "CheckpointDynUNet",
    "CheckpointSegResNet",
    "CheckpointSegResNetDS",
    "CheckpointSwinUNETR",
    "CheckpointUNet",
    "CheckpointVNet",
    "CheckpointedSequential",
    "InferencePlan",
    "InputShapeError",
    "Plan",
    "Segment",
    "checkpoint",
    "checkpoint_submodules",
    "disable_checkpointing",
    "enable_checkpointing",
    "plan",
    "plan_inference",
    "resolve_policy",
    "validate_policy",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)

if TYPE_CHECKING:  # what type checkers and IDEs see (py.typed)
    from .checkpoint import CHECKPOINT_MODES, CheckpointedSequential, checkpoint, checkpoint_submodules
    from .networks import (
        CheckpointAttentionUnet,
        CheckpointBasicUNet,
        CheckpointBasicUNetPlusPlus,
        CheckpointDynUNet,
        CheckpointSegResNet,
        CheckpointSegResNetDS,
        CheckpointSwinUNETR,
        CheckpointUNet,
        CheckpointVNet,
        InputShapeError,
        disable_checkpointing,
        enable_checkpointing,
    )
    from .planner import InferencePlan, Plan, plan, plan_inference
    from .policies import CheckpointGroup, Segment, resolve_policy, validate_policy
