"""Checkpoint-aware drop-in subclasses of MONAI networks."""

from .base import InputShapeError
from .dynunet import CheckpointDynUNet
from .unet import CheckpointUNet
from .vnet import CheckpointVNet

__all__ = ["CheckpointDynUNet", "CheckpointUNet", "CheckpointVNet", "InputShapeError"]
