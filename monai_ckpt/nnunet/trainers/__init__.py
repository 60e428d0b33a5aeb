"""The folder nnU-Net searches for ``nnUNetTrainerCkpt`` when ``nnUNet_extTrainer`` names it (``python -m
monai_ckpt.nnunet trainers-path``). nnU-Net imports each module here by its file name; each re-exports the trainers
from `monai_ckpt.nnunet.trainer`, so there is one class whichever way it is imported."""
