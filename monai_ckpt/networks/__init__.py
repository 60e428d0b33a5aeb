"""Checkpoint-aware drop-in subclasses of MONAI networks."""

from .attentionunet import CheckpointAttentionUnet
from .base import InputShapeError
from .dynunet import CheckpointDynUNet
from .segresnet import CheckpointSegResNet
from .swin_unetr import CheckpointSwinUNETR
from .unet import CheckpointUNet
from .vnet import CheckpointVNet

__all__ = [
    "CheckpointAttentionUnet",
    "CheckpointDynUNet",
    "CheckpointSegResNet",
    "CheckpointSwinUNETR",
    "CheckpointUNet",
    "CheckpointVNet",
    "InputShapeError",
]
