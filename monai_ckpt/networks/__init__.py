"""Checkpoint-aware drop-in subclasses of MONAI networks."""

from .attentionunet import CheckpointAttentionUnet
from .base import InputShapeError
from .basic_unet import CheckpointBasicUNet, CheckpointBasicUNetPlusPlus
from .dynunet import CheckpointDynUNet
from .segresnet import CheckpointSegResNet
from .segresnet_ds import CheckpointSegResNetDS
from .swin_unetr import CheckpointSwinUNETR
from .unet import CheckpointUNet
from .vnet import CheckpointVNet

__all__ = [
    "CheckpointAttentionUnet",
    "CheckpointBasicUNet",
    "CheckpointBasicUNetPlusPlus",
    "CheckpointDynUNet",
    "CheckpointSegResNet",
    "CheckpointSegResNetDS",
    "CheckpointSwinUNETR",
    "CheckpointUNet",
    "CheckpointVNet",
    "InputShapeError",
]
