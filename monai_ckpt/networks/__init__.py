"""Checkpoint-aware drop-in subclasses of MONAI networks."""

from .unet import CheckpointUNet

__all__ = ["CheckpointUNet"]
