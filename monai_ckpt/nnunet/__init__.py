"""nnU-Net v2 with monai-ckpt: checkpoint-aware nnU-Net networks, a trainer nnU-Net finds, and plans that fit a GPU.

Optional: ``pip install monai-ckpt[nnunet]`` (``nnunetv2`` and ``dynamic-network-architectures``). Nothing else in
monai_ckpt imports this package.

- `CheckpointPlainConvUNet`, `CheckpointResidualEncoderUNet`: drop-in subclasses of the networks nnU-Net trains
  (`monai_ckpt.nnunet.networks`).
- ``nnUNetTrainerCkpt`` (`monai_ckpt.nnunet.trainer`): nnU-Net's trainer with our network; ``nnUNetv2_train ... -tr
  nnUNetTrainerCkpt`` finds it once ``nnUNet_extTrainer`` names the folder that ``python -m monai_ckpt.nnunet
  trainers-path`` prints.
- ``python -m monai_ckpt.nnunet plan``: a configuration added to an nnU-Net plans file, sized for a GPU with our
  checkpointing (`monai_ckpt.nnunet.plans`).
"""

try:
    from .networks import CheckpointPlainConvUNet, CheckpointResidualEncoderUNet
except ModuleNotFoundError as error:  # pragma: no cover - depends on the install
    if error.name is None or not error.name.startswith("dynamic_network_architectures"):
        raise
    raise ModuleNotFoundError(
        "monai_ckpt.nnunet needs nnU-Net's networks (dynamic_network_architectures): pip install 'monai-ckpt[nnunet]'",
        name=error.name,
    ) from error

__all__ = ["CheckpointPlainConvUNet", "CheckpointResidualEncoderUNet"]
