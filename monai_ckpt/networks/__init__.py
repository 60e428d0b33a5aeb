"""Checkpoint-aware drop-in subclasses of MONAI networks."""

from .dynunet import CheckpointDynUNet
from .segresnet import CheckpointSegResNet
from .swin_unetr import CheckpointSwinUNETR
from .unet import CheckpointUNet
from .vnet import CheckpointVNet

__all__ = ["CheckpointDynUNet", "CheckpointSegResNet", "CheckpointSwinUNETR", "CheckpointUNet", "CheckpointVNet"]
