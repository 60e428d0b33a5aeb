"""What only CheckpointSegResNet has to show beyond the drop-in contract (test_drop_in_contract.py)."""

from monai.networks.nets import SegResNet

from monai_ckpt import CheckpointSegResNet
from helpers import assert_in_place_steps_copy_nothing
from networks_registry import segresnet_kwargs


def test_in_place_relu_after_instance_norm_copies_nothing():
    """SegResNet's in-place ReLU after instance norm runs on batch norm's output, not through its view."""
    assert_in_place_steps_copy_nothing(SegResNet, CheckpointSegResNet, segresnet_kwargs(norm="instance"),
                                       (2, 2, 8, 8, 8))
