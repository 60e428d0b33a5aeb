"""The named network configurations that the benchmark and planner CLIs build (``--network unet|vnet|dynunet|...``).

A new network is added here as ``name -> (MONAI class, monai_ckpt class, constructor kwargs)``; both CLIs, the
docs' scripts and the scenario presets pick it up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..arguments import positive_int

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "NATURAL_BLOCKS",
    "NETWORKS",
    "PARENT_OWN_CHECKPOINT",
    "network_factory",
    "padded_shape",
    "positive_int",
    "shape_error",
]


def _unet(spatial_dims: int, in_channels: int) -> dict:
    return dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2,
                channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)


def _vnet(spatial_dims: int, in_channels: int) -> dict:
    return dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2)


def _dynunet(spatial_dims: int, in_channels: int) -> dict:
    """nnU-Net-like: 6 levels, filters 32..320, instance norm, leaky ReLU, deep supervision."""
    return dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, kernel_size=[3] * 6,
                strides=[1, 2, 2, 2, 2, 2], upsample_kernel_size=[2] * 5, filters=(32, 64, 128, 256, 320, 320),
                norm_name=("INSTANCE", {"affine": True}), deep_supervision=True, deep_supr_num=2)


def _segresnet(spatial_dims: int, in_channels: int) -> dict:
    """MONAI's BraTS tutorial: 16 filters, ResBlocks (1, 2, 2, 4) down and (1, 1, 1) up, group norm."""
    return dict(spatial_dims=spatial_dims, init_filters=16, in_channels=in_channels, out_channels=2,
                blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


def _swinunetr(spatial_dims: int, in_channels: int) -> dict:
    """The BTCV model-zoo bundle: feature size 48, depths (2, 2, 2, 2), window 7."""
    return dict(in_channels=in_channels, out_channels=2, feature_size=48, spatial_dims=spatial_dims)


def _attentionunet(spatial_dims: int, in_channels: int) -> dict:
    """Five levels, 16..256 channels, as the seed's PROMISE12 (prostate) configuration."""
    return dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2))


def _basicunet(spatial_dims: int, in_channels: int) -> dict:
    """MONAI's defaults: features (32, 32, 64, 128, 256, 32), instance norm, leaky ReLU, transposed convolutions."""
    return dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2)


def _basicunetplusplus(spatial_dims: int, in_channels: int) -> dict:
    """MONAI's defaults with deep supervision (four heads, all trained)."""
    return dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, deep_supervision=True)


def _segresnetds(spatial_dims: int, in_channels: int) -> dict:
    """Auto3DSeg's segresnet template: 32 filters, blocks (1, 2, 2, 4, 4), instance norm, deep supervision 4."""
    return dict(spatial_dims=spatial_dims, init_filters=32, in_channels=in_channels, out_channels=2,
                blocks_down=(1, 2, 2, 4, 4), norm="instance", dsdepth=4)


# name -> (MONAI class name, monai_ckpt class name, constructor kwargs for (spatial_dims, in_channels))
NETWORKS: dict[str, tuple[str, str, Callable[[int, int], dict]]] = {
    "unet": ("UNet", "CheckpointUNet", _unet),
    "vnet": ("VNet", "CheckpointVNet", _vnet),
    "dynunet": ("DynUNet", "CheckpointDynUNet", _dynunet),
    "segresnet": ("SegResNet", "CheckpointSegResNet", _segresnet),
    "swinunetr": ("SwinUNETR", "CheckpointSwinUNETR", _swinunetr),
    "attentionunet": ("AttentionUnet", "CheckpointAttentionUnet", _attentionunet),
    "basicunet": ("BasicUNet", "CheckpointBasicUNet", _basicunet),
    "basicunetplusplus": ("BasicUNetPlusPlus", "CheckpointBasicUNetPlusPlus", _basicunetplusplus),
    "segresnetds": ("SegResNetDS", "CheckpointSegResNetDS", _segresnetds),
}

# What a user would checkpoint by hand on the plain parent (`checkpoint_submodules` on these block classes), and
# the parent's own checkpointing switch: the benchmark's comparison rows.
NATURAL_BLOCKS: dict[str, tuple[str, ...]] = {
    "segresnet": ("ResBlock",),
    "swinunetr": ("SwinTransformerBlock", "UnetResBlock"),
    "attentionunet": ("ConvBlock", "AttentionBlock"),
    "basicunet": ("TwoConv",),
    "basicunetplusplus": ("TwoConv",),
    "segresnetds": ("SegResBlock",),
}
PARENT_OWN_CHECKPOINT: dict[str, dict] = {"swinunetr": {"use_checkpoint": True}}


def network_factory(
    network: str, spatial_dims: int, in_channels: int, policy: object = "none"
) -> Callable[[], nn.Module]:
    """A factory of the monai_ckpt network ``network`` as the benchmark builds it."""
    from .. import networks

    _, child_name, make_kwargs = NETWORKS[network]
    return lambda: getattr(networks, child_name)(**make_kwargs(spatial_dims, in_channels), checkpoint_policy=policy)


def padded_shape(network: str, shape: Sequence[int], in_channels: int) -> tuple[int, ...]:
    """``shape`` padded up to the next size the network takes."""
    multiple = network_factory(network, len(shape), in_channels)().size_multiple()
    return tuple(-(-int(s) // m) * m for s, m in zip(shape, multiple))


def shape_error(network: str, shape: Sequence[int], in_channels: int) -> str | None:
    """Why the CLIs' ``network`` cannot take a patch of ``shape`` (what it would take instead), or None."""
    import torch

    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        return f"--shape takes 2 or 3 positive sizes (H W or D H W), got {' '.join(map(str, shape))}"
    net = network_factory(network, len(shape), in_channels)()
    try:
        net._check_input(torch.empty((1, in_channels, *shape), device="meta"))
    except ValueError as error:
        return str(error)
    return None
