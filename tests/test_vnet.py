"""What only CheckpointVNet has to show beyond the drop-in contract (test_drop_in_contract.py)."""

import pytest
from monai.networks.nets import VNet

from monai_ckpt import CheckpointVNet


def test_vnet_deprecated_dropout_prob_behaves_like_the_parent():
    """MONAI maps the deprecated float `dropout_prob` onto the tuple `dropout_prob_up` and fails: so do we."""
    outcomes = []
    for cls in (VNet, CheckpointVNet):
        with pytest.warns(FutureWarning, match="dropout_prob"), pytest.raises(TypeError) as e:
            cls(spatial_dims=2, dropout_prob=0.2)
        outcomes.append(str(e.value))
    assert outcomes[0] == outcomes[1]
