"""The U-Net merge that keeps its parts (`monai_ckpt.networks.merge`), in the networks that use it."""

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus

from monai_ckpt import CheckpointAttentionUnet, CheckpointBasicUNet, CheckpointBasicUNetPlusPlus
from helpers import assert_same_training, saved_tensor_shapes

_BU = dict(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), norm="batch")


@pytest.mark.parametrize("parent_cls, child_cls, kw, concatenations", [
    # BasicUNet: each UpCat's skip and upsampled input (4 + 4 channels at 16^3 and 8^3, 4 + 8 at 4^3, 8 + 8 at 2^3)
    (BasicUNet, CheckpointBasicUNet, _BU, {(2, 8, 16, 16, 16), (2, 8, 8, 8, 8), (2, 12, 4, 4, 4), (2, 16, 2, 2, 2)}),
    # UNet++: at the top x_0_0..x_0_{j-1} and the upsampled x_1_{j-1} (4 channels each, j = 2..4), and deeper ones
    (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus, _BU,
     {(2, 12, 16, 16, 16), (2, 16, 16, 16, 16), (2, 20, 16, 16, 16), (2, 16, 8, 8, 8), (2, 20, 4, 4, 4)}),
    # AttentionUnet: the gated skip and the up-convolved tensor (4 + 4 channels at 16^3, 8 + 8 at 8^3)
    (AttentionUnet, CheckpointAttentionUnet,
     dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2)),
     {(2, 8, 16, 16, 16), (2, 16, 8, 8, 8)}),
], ids=["basicunet", "unetpp", "attentionunet"])
def test_the_merge_keeps_its_parts_not_their_concatenation(parent_cls, child_cls, kw, concatenations):
    """The merge's convolution saves the skip(s) and the upsampled tensor, which the chain keeps anyway, and
    concatenates them again in backward (as CheckpointUNet's merge): MONAI's parent keeps each concatenation, we
    keep none, and training stays bit-identical."""
    x = torch.randn(2, 1, 16, 16, 16)

    torch.manual_seed(0)
    parent, child = parent_cls(**kw), child_cls(**kw, checkpoint_policy=["encoder0"])  # the decoders run plainly
    child.load_state_dict(parent.state_dict())
    assert concatenations <= saved_tensor_shapes(parent, x)
    assert not concatenations & saved_tensor_shapes(child, x)
    assert_same_training(parent, child, [torch.randn(2, 1, 16, 16, 16) for _ in range(2)])
