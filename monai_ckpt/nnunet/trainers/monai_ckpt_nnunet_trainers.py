"""What nnU-Net imports from the ``nnUNet_extTrainer`` folder (as a top-level module named after this file)."""

from monai_ckpt.nnunet.trainer import nnUNetTrainerCkpt

__all__ = ["nnUNetTrainerCkpt"]
