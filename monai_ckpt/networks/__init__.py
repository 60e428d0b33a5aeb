"""Checkpoint-aware drop-in subclasses of MONAI networks, and `enable_checkpointing` / `disable_checkpointing` for a
network the user already has. Imported on first use (PEP 562): ``monai_ckpt.networks.presets`` needs no MONAI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


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
