"""Checkpoint-aware drop-in subclasses of MONAI networks, and `enable_checkpointing` / `disable_checkpointing` for a
network the user already has. Imported on first use (PEP 562): ``monai_ckpt.networks.presets`` needs no MONAI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

# public name -> the module that defines it
_LAZY = {
    "CHECKPOINT_CLASSES": ".convert",
    "CheckpointAttentionUnet": ".attentionunet",
    "CheckpointBasicUNet": ".basic_unet",
    "CheckpointBasicUNetPlusPlus": ".basic_unet",
    "CheckpointDynUNet": ".dynunet",
    "CheckpointSegResNet": ".segresnet",
    "CheckpointSegResNetDS": ".segresnet_ds",
    "CheckpointSwinUNETR": ".swin_unetr",
    "CheckpointUNet": ".unet",
    "CheckpointVNet": ".vnet",
    "InputShapeError": ".base",
    "disable_checkpointing": ".convert",
    "enable_checkpointing": ".convert",
}
_SUBMODULES = ("attentionunet", "base", "basic_unet", "convert", "dense", "dynunet", "inplace", "merge", "presets",
               "segresnet", "segresnet_ds", "swin_unetr", "unet", "vnet")

__all__ = [
    "CHECKPOINT_CLASSES",
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
    "disable_checkpointing",
    "enable_checkpointing",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)

if TYPE_CHECKING:
    from .attentionunet import CheckpointAttentionUnet
    from .base import InputShapeError
    from .basic_unet import CheckpointBasicUNet, CheckpointBasicUNetPlusPlus
    from .convert import CHECKPOINT_CLASSES, disable_checkpointing, enable_checkpointing
    from .dynunet import CheckpointDynUNet
    from .segresnet import CheckpointSegResNet
    from .segresnet_ds import CheckpointSegResNetDS
    from .swin_unetr import CheckpointSwinUNETR
    from .unet import CheckpointUNet
    from .vnet import CheckpointVNet
