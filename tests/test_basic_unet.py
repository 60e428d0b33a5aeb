"""What only CheckpointBasicUNet and CheckpointBasicUNetPlusPlus have to show beyond the drop-in contract
(test_drop_in_contract.py): UNet++'s dense skips as chain steps, the budget policy, BasicUNet's size rule, and what
"cheap" reruns and copies with MONAI's defaults."""

import pytest
import torch
from monai.networks.nets import BasicUNet, BasicUNetPlusPlus

from monai_ckpt import CheckpointBasicUNet, CheckpointBasicUNetPlusPlus
from helpers import assert_same_training, backward_calls, count_conv_calls
from networks_registry import CASES, make


def test_unetplusplus_dense_skips_as_chain_steps():
    """The dense graph as chain steps: a node pops down to the deepest tensor it reads and pushes back what later
    nodes read; a head that reads another tensor than the head before it is preceded by a move (no operator)."""
    _, child, shape = make("unetpp2d-ds", "none")
    steps = child._chain_steps()
    assert [s.block for s in steps if s.emit] == ["head1", "head2.1", "head3.1"]
    assert max(s.pops for s in steps) > 1 and steps[0].pops == 0
    x = torch.randn(*shape)
    move = steps[[s.block for s in steps].index("head2.0")]
    counts = count_conv_calls(child, lambda: move.fn(x, *[x] * move.pops))
    assert set(counts.values()) == {0}


def test_budget_policy_plans_and_trains_like_the_parent():
    from monai_ckpt.profiling import measure_step_memory

    case = "basicunet1d-nontrainable"  # instance norm: the planner times a batch of one
    parent, child, shape = make(case, "none")
    kw = CASES[case].kwargs
    plain = measure_step_memory(lambda: CheckpointBasicUNet(**kw, checkpoint_policy="none"), shape, estimate=True).peak
    least = measure_step_memory(lambda: CheckpointBasicUNet(**kw, checkpoint_policy="all"), shape, estimate=True).peak
    child.checkpoint_policy = {"budget_gb": (least + 0.5 * (plain - least)) / 2**30}
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])
    plan = child.checkpoint_plan
    assert plan.input_shape == shape and plan.policy != "none" and plan.predicted_peak_bytes < plain


def test_basic_unet_size_error_says_at_least_16():
    """BasicUNet takes any size from 16 (UpCat pads odd ones): the error names the minimum, not a multiple."""
    net = CheckpointBasicUNet(**CASES["basicunet3d"].kwargs)
    with pytest.raises(ValueError, match=r"at least 16 .* e\.g\. pad to \(16, 16, 33\)"):
        net(torch.randn(2, 2, 12, 15, 33))


@pytest.mark.parametrize("parent_cls, child_cls", [(BasicUNet, CheckpointBasicUNet),
                                                   (BasicUNetPlusPlus, CheckpointBasicUNetPlusPlus)])
def test_basicunet_defaults_cheap_reruns_the_thin_convolution_and_the_upsamplings_and_copies_nothing(parent_cls,
                                                                                                    child_cls):
    """MONAI's defaults (instance norm, in-place leaky ReLU, transposed-convolution upsampling, even sizes). The
    parent's backward takes each activation through its instance norm's view (CopySlices: new_empty_strided and
    clone, two tensors the size of the activation); ours takes none. A "cheap" checkpoint keeps the 3x3x3
    convolutions' outputs and reruns, in backward, only the first convolution (1 channel in, 4 out) and the
    upsamplings (kernel = stride); UpCat's padding by nothing is no copy. Training stays bit-identical."""
    kw = dict(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(0)
    parent = parent_cls(**kw).train()
    child = child_cls(**kw, checkpoint_policy="cheap").train()
    assert_same_training(parent, child, [torch.randn(2, 1, 32, 32, 32) for _ in range(2)])
    ops = {"parent": backward_calls(parent, x), "cheap": backward_calls(child, x)}
    assert ops["parent"].names.count("aten.new_empty_strided.default") > 0 and not ops["parent"].convolutions
    assert "aten.new_empty_strided.default" not in ops["cheap"].names
    assert "aten.replication_pad3d.default" not in ops["cheap"].names
    rerun = ops["cheap"].convolutions
    assert ((4, 1, 3, 3, 3), False) in rerun and all(transposed or w == (4, 1, 3, 3, 3) for w, transposed in rerun)
    assert sum(transposed for _, transposed in rerun) == sum("upcat" in n and n.endswith("deconv")
                                                             for n, _ in parent.named_modules())
