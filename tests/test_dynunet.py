"""What only CheckpointDynUNet has to show beyond the drop-in contract (test_drop_in_contract.py): its deep-supervision
heads (a list the parent fills as a side effect of forward, stacked into one output) get their gradient, and its
in-place steps after instance norm copy nothing."""

import pytest
import torch
from monai.networks.nets import DynUNet

from monai_ckpt import CheckpointDynUNet
from helpers import assert_same_training, backward_calls, loss_of, make_pair
from networks_registry import dynunet_kwargs, make


@pytest.mark.parametrize("case", ["dynunet-ds1", "dynunet-ds2", "dynunet-ds3-res"])
@pytest.mark.parametrize("policy", ["all", "head", "sqrt", {"segments": 1}, "cheap"], ids=str)
def test_deep_supervision_heads_get_their_gradient(case, policy):
    parent, child, shape = make(case, policy)
    x = torch.randn(*shape)
    for net in (parent, child):
        torch.manual_seed(5)
        out = net(x)
        assert out.shape[1] == 1 + net.deep_supr_num
        loss_of(out).backward()
    for p, c in zip(parent.deep_supervision_heads.parameters(), child.deep_supervision_heads.parameters()):
        assert c.grad is not None and c.grad.abs().sum() > 0
        assert torch.equal(c.grad, p.grad)
    for p, c in zip(parent.heads, child.heads):  # the parent's side-effect list is filled the same way
        assert torch.equal(p, c)


def test_reentrant_checkpointing_loses_the_deep_supervision_gradient():
    """The known failure our chain avoids: heads written into a list inside a reentrant checkpoint get no
    gradient at all, silently."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    parent, _, shape = make("dynunet-ds2")
    inner = parent.skip_layers

    class Reentrant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch_checkpoint(self.inner, x, use_reentrant=True)

    parent.skip_layers = Reentrant()
    x = torch.randn(*shape, requires_grad=True)
    loss_of(parent(x)).backward()
    assert all(p.grad is None for p in parent.deep_supervision_heads.parameters())


@pytest.mark.parametrize("res", [False, True], ids=["basic-blocks", "residual-blocks"])
def test_dynunet_instance_norm_in_place_steps_copy_nothing(res):
    """With instance norm (a view of batch norm's output) the parent's in-place leaky ReLU, and a residual block's
    ``out += residual``, take their backward through the view's base (CopySlices: new_empty_strided and a clone,
    two tensors of the activation's size); ours run on the base and copy nothing, and training stays bit-identical."""
    kw = dynunet_kwargs(res=res, norm="instance")
    x = torch.randn(2, 2, 32, 32, 32)  # 16^3 would leave the deepest level one voxel
    for policy in ("all", "cheap"):
        parent, child = make_pair(DynUNet, CheckpointDynUNet, kw, policy)
        assert_same_training(parent, child, [torch.randn(2, 2, 32, 32, 32) for _ in range(2)])
        assert backward_calls(parent, x).names.count("aten.new_empty_strided.default") >= 2 * (2 + res)
        assert "aten.new_empty_strided.default" not in backward_calls(child, x).names
