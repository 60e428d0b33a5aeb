"""Every checkpoint-aware network the tests check against its MONAI parent, and the configurations they build.

`REGISTRY` has one entry per drop-in class: its MONAI parent, a small test configuration (one of `CASES`, by name),
the parent's default configuration and the smallest input that configuration trains on. The contract
(test_drop_in_contract.py) runs on every case of `CASES`, and the MetaTensor and default-configuration checks
(test_metatensor_and_defaults.py) on every entry of `REGISTRY`: a new network is covered by adding its entry.

"Default configuration": the parent's own defaults for every argument that has one, deep supervision on where the
parent has it, and for arguments without a default (UNet's and AttentionUnet's channels and strides, DynUNet's
kernels and strides) the configuration of MONAI's tutorials and model-zoo bundles. "Smallest input": batch 1, the
smallest spatial size the parent takes whose deepest level a norm there can normalise in training (a padded size
of the network's `size_multiple`, one side doubled where the deepest level would be a single voxel).
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers import make_pair
from monai.networks.nets import (
    AttentionUnet, BasicUNet, BasicUNetPlusPlus, DynUNet, SegResNet, SegResNetDS, SwinUNETR, UNet, VNet,
)
from torch import nn

from monai_ckpt import (
    CheckpointAttentionUnet, CheckpointBasicUNet, CheckpointBasicUNetPlusPlus, CheckpointDynUNet, CheckpointSegResNet,
    CheckpointSegResNetDS, CheckpointSwinUNETR, CheckpointUNet, CheckpointVNet,
)

__all__ = ["CASES", "REGISTRY", "Case", "Network", "basic_unet_kwargs", "dynunet_kwargs", "make", "segresnet_ds_kwargs",
           "segresnet_kwargs", "swin_kwargs"]


@dataclass(frozen=True)
class Case:
    """A parent, its drop-in child, constructor kwargs and an input shape (batch, channels, *spatial)."""

    parent: type
    child: type
    kwargs: dict
    shape: tuple[int, ...]

    def __iter__(self):  # noqa: ANN204 - unpacks as (parent, child, kwargs, shape)
        return iter((self.parent, self.child, self.kwargs, self.shape))


@dataclass(frozen=True)
class Network:
    """One drop-in class: ``case`` names its small test configuration (``small``, on inputs of ``small_shape``);
    ``default`` is the parent's default configuration and ``default_shape`` the smallest input it trains on."""

    parent: type
    child: type
    case: str
    small: dict
    small_shape: tuple[int, ...]
    default: dict
    default_shape: tuple[int, ...]


def dynunet_kwargs(ds=False, n=1, res=False, dims=3, norm="batch"):  # noqa: ANN001, ANN202
    """A five-level DynUNet with 4..64 filters and dropout; deep supervision with ``n`` heads when ``ds``."""
    return dict(spatial_dims=dims, in_channels=2, out_channels=3, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                upsample_kernel_size=[2] * 4, filters=[4, 8, 16, 32, 64], deep_supervision=ds, deep_supr_num=n,
                res_block=res, dropout=0.1, norm_name=norm)


def segresnet_kwargs(**kw):  # noqa: ANN003, ANN202
    """A three-level SegResNet with 8 filters, and ``kw``."""
    base = dict(spatial_dims=3, init_filters=8, in_channels=2, out_channels=3, blocks_down=(1, 2, 2), blocks_up=(1, 1))
    return {**base, **kw}


def swin_kwargs(**kw):  # noqa: ANN003, ANN202
    """A SwinUNETR with feature size 12, one shifted-window stage, window 4, every dropout, batch norm, and ``kw``."""
    base = dict(in_channels=2, out_channels=3, feature_size=12, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2),
                window_size=4, drop_rate=0.1, attn_drop_rate=0.1, dropout_path_rate=0.2, norm_name="batch")
    return {**base, **kw}


def basic_unet_kwargs(**kw):  # noqa: ANN003, ANN202
    """A BasicUNet (or UNet++) with features 4..16, and ``kw``."""
    return {**dict(spatial_dims=3, in_channels=2, out_channels=3, features=(4, 4, 8, 8, 16, 4)), **kw}


def segresnet_ds_kwargs(**kw):  # noqa: ANN003, ANN202
    """A three-level SegResNetDS with 4 filters, and ``kw``."""
    return {**dict(spatial_dims=3, init_filters=4, in_channels=2, out_channels=3, blocks_down=(1, 2, 2)), **kw}


_UNET5 = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))

REGISTRY: dict[str, Network] = {
    "unet": Network(UNet, CheckpointUNet, "unet3d",
                    dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                         num_res_units=2, norm="batch", dropout=0.2), (2, 1, 16, 16, 16),
                    dict(_UNET5, num_res_units=2), (1, 1, 32, 16, 16)),
    # VNet's 3D default has 45M parameters: its small configuration is 2D (the same code)
    "vnet": Network(VNet, CheckpointVNet, "vnet2d",
                    dict(spatial_dims=2, in_channels=2, out_channels=3, act="prelu", dropout_prob_down=0.3,
                         dropout_dim=2), (2, 2, 32, 32),
                    dict(), (1, 1, 32, 16, 16)),
    "dynunet": Network(DynUNet, CheckpointDynUNet, "dynunet", dynunet_kwargs(), (2, 2, 16, 16, 16),
                       dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 5,
                            strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4, deep_supervision=True),
                       (1, 1, 32, 16, 16)),
    "segresnet": Network(SegResNet, CheckpointSegResNet, "segresnet3d", segresnet_kwargs(dropout_prob=0.2), (2, 2, 8, 8, 12),
                         dict(), (1, 1, 8, 8, 8)),
    "segresnetds": Network(SegResNetDS, CheckpointSegResNetDS, "segresnetds3d-ds", segresnet_ds_kwargs(dsdepth=3), (2, 2, 8, 8, 8),
                           dict(dsdepth=4), (1, 1, 16, 8, 8)),
    "attentionunet": Network(AttentionUnet, CheckpointAttentionUnet, "attunet3d",
                             dict(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                                  dropout=0.2), (2, 2, 8, 8, 8),
                             dict(_UNET5), (1, 1, 32, 16, 16)),
    "swinunetr": Network(SwinUNETR, CheckpointSwinUNETR, "swin2d-v2-instance",
                         swin_kwargs(spatial_dims=2, use_v2=True, norm_name="instance", downsample="mergingv2"),
                         (2, 2, 64, 64),
                         dict(in_channels=1, out_channels=2), (1, 1, 64, 32, 32)),
    "basicunet": Network(BasicUNet, CheckpointBasicUNet, "basicunet3d", basic_unet_kwargs(dropout=0.2, norm="batch"),
                         (2, 2, 16, 16, 17),
                         dict(), (1, 1, 32, 16, 16)),
    "basicunetplusplus": Network(BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus, "unetpp2d-ds",
                                 basic_unet_kwargs(spatial_dims=2, deep_supervision=True, norm="batch", dropout=0.2),
                                 (2, 2, 33, 40),
                                 dict(deep_supervision=True), (1, 1, 32, 16, 16)),
}

# name -> Case: the registry's small configurations first, then more of each network (MONAI's own tests' kinds of
# case: 2D and 3D, every norm, dropout, every upsample mode, residual blocks, deep supervision, anisotropy ...)
CASES: dict[str, Case] = {n.case: Case(n.parent, n.child, n.small, n.small_shape) for n in REGISTRY.values()}
CASES.update({
    "unet2d": Case(UNet, CheckpointUNet, dict(spatial_dims=2, in_channels=2, out_channels=3, channels=(4, 8, 16, 32),
                                              strides=(2, 2, 1)), (2, 2, 32, 32)),
    "dynunet2d-res": Case(DynUNet, CheckpointDynUNet, dynunet_kwargs(res=True, dims=2, norm="instance"), (2, 2, 32, 32)),
    "dynunet-ds1": Case(DynUNet, CheckpointDynUNet, dynunet_kwargs(ds=True, n=1), (2, 2, 16, 16, 16)),
    "dynunet-ds3-res": Case(DynUNet, CheckpointDynUNet, dynunet_kwargs(ds=True, n=3, res=True), (2, 2, 16, 16, 16)),
    "dynunet-ds2": Case(DynUNet, CheckpointDynUNet, dynunet_kwargs(ds=True, n=2, norm="instance"), (2, 2, 32, 32, 32)),
    "segresnet3d-batch-deconv": Case(SegResNet, CheckpointSegResNet,
                                     segresnet_kwargs(norm="batch", upsample_mode="deconv", act=("leakyrelu", {"inplace": True})),
                                     (2, 2, 8, 8, 8)),
    "segresnet2d-instance-pixelshuffle": Case(SegResNet, CheckpointSegResNet,
                                              segresnet_kwargs(spatial_dims=2, norm="instance", upsample_mode="pixelshuffle",
                                                   blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.1),
                                              (2, 2, 32, 32)),
    "segresnet2d-no-final": Case(SegResNet, CheckpointSegResNet,
                                 segresnet_kwargs(spatial_dims=2, use_conv_final=False, norm_name="group", num_groups=4),
                                 (2, 2, 16, 16)),
    "swin3d": Case(SwinUNETR, CheckpointSwinUNETR, swin_kwargs(), (2, 2, 32, 32, 32)),
    "swin3d-own-checkpoint": Case(SwinUNETR, CheckpointSwinUNETR, swin_kwargs(use_checkpoint=True, patch_norm=True),
                                  (2, 2, 32, 32, 32)),
    "swin2d-unnormalized": Case(SwinUNETR, CheckpointSwinUNETR,
                                swin_kwargs(spatial_dims=2, normalize=False, depths=(1, 2, 1, 1), window_size=(4, 8)),
                                (1, 2, 64, 64)),
    "attunet2d": Case(AttentionUnet, CheckpointAttentionUnet,
                      dict(spatial_dims=2, in_channels=2, out_channels=3, channels=(4, 8, 16, 16), strides=(2, 2, 1),
                           kernel_size=5, up_kernel_size=5), (2, 2, 16, 16)),
    "basicunet2d-pixelshuffle": Case(BasicUNet, CheckpointBasicUNet,
                                     basic_unet_kwargs(spatial_dims=2, upsample="pixelshuffle", dropout=0.1), (2, 2, 33, 40)),
    "basicunet1d-nontrainable": Case(BasicUNet, CheckpointBasicUNet, basic_unet_kwargs(spatial_dims=1, upsample="nontrainable"),
                                     (2, 2, 35)),
    # no norm: the in-place activation overwrites the convolution's output, which "cheap" must then not keep
    "basicunet2d-no-norm": Case(BasicUNet, CheckpointBasicUNet, basic_unet_kwargs(spatial_dims=2, norm=None), (2, 2, 32, 32)),
    "unetpp3d": Case(BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus, basic_unet_kwargs(upsample="nontrainable", norm="batch"),
                     (2, 2, 16, 17, 16)),
    "segresnetds3d-aniso": Case(SegResNetDS, CheckpointSegResNetDS,
                                segresnet_ds_kwargs(blocks_down=(1, 2, 2, 4), dsdepth=4, resolution=(1, 2, 5), norm="instance"),
                                (2, 2, 16, 16, 8)),
    "segresnetds2d-preprocess": Case(SegResNetDS, CheckpointSegResNetDS,
                                     segresnet_ds_kwargs(spatial_dims=2, preprocess=nn.Tanh(), upsample_mode="nontrainable",
                                         act="leakyrelu", dsdepth=2), (2, 2, 16, 16)),
    "segresnetds2d-flat": Case(SegResNetDS, CheckpointSegResNetDS, segresnet_ds_kwargs(spatial_dims=2, blocks_down=(1,), norm="instance"),
                               (2, 2, 8, 8)),
})


def make(case: str, policy="all"):  # noqa: ANN001, ANN201
    """The parent and child of ``case`` holding the same weights (the child with ``policy``), and its input shape."""
    parent_cls, child_cls, kw, shape = CASES[case]
    return (*make_pair(parent_cls, child_cls, kw, policy), shape)
