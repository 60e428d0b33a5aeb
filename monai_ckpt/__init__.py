"""monai-ckpt: correct, planned and measured gradient checkpointing for MONAI's 3D segmentation networks."""

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
)
from .planner import InferencePlan, Plan, plan, plan_inference
from .policies import CheckpointGroup, Segment, resolve_policy, validate_policy

__version__ = "0.1.0"

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
    "plan",
    "plan_inference",
    "resolve_policy",
    "validate_policy",
]
