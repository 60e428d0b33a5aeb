"""What only CheckpointBasicUNet, CheckpointBasicUNetPlusPlus and CheckpointSegResNetDS have to show beyond the shared
contract checks of test_networks_ii.py (whose cases they are): every deep-supervision head gets the parent's
gradient, UNet++'s dense skips as chain steps, the budget policy, BasicUNet's size rule, estimate mode, the
merge that keeps its parts (BasicUNet, UNet++, AttentionUnet), and what "cheap" reruns and copies with MONAI's defaults.
"""

import pytest
import torch

from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus

from monai_ckpt import CheckpointAttentionUnet, CheckpointBasicUNet, CheckpointBasicUNetPlusPlus
from helpers import assert_same_training, backward_calls, count_conv_calls, loss_of, saved_tensor_shapes, train_steps
from test_networks_ii import CASES, make


@pytest.mark.parametrize("case", ["unetpp2d-ds", "segresnetds3d-ds"])
def test_every_deep_supervision_head_gets_the_parents_gradient(case):
    """Each head's output is an output of its checkpoint: with a loss on one head at a time, the weights get exactly
    the parent's gradient (a head computed inside a checkpoint as a side effect would get none)."""
    parent, child, shape = make(case, "all")
    x = torch.randn(*shape)
    n_heads = len(parent.train()(x))
    assert n_heads > 1
    for k in range(n_heads):
        grads = []
        for net in (parent, child):
            net.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            out = net(x)
            assert len(out) == n_heads and all(o.requires_grad for o in out)
            loss_of(out[k]).backward()
            grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            assert torch.equal(grads[0][name], grads[1][name]), (k, name)


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
    kw = CASES[case][2]
    plain = measure_step_memory(lambda: CheckpointBasicUNet(**kw, checkpoint_policy="none"), shape, estimate=True).peak
    least = measure_step_memory(lambda: CheckpointBasicUNet(**kw, checkpoint_policy="all"), shape, estimate=True).peak
    child.checkpoint_policy = {"budget_gb": (least + 0.5 * (plain - least)) / 2**30}
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])
    plan = child.checkpoint_plan
    assert plan.input_shape == shape and plan.policy != "none" and plan.predicted_peak_bytes < plain


def test_basic_unet_size_error_says_at_least_16():
    """BasicUNet takes any size from 16 (UpCat pads odd ones): the error names the minimum, not a multiple."""
    net = CheckpointBasicUNet(**CASES["basicunet3d"][2])
    with pytest.raises(ValueError, match=r"at least 16 .* e\.g\. pad to \(16, 16, 33\)"):
        net(torch.randn(2, 2, 12, 15, 33))


@pytest.mark.parametrize("case", ["unetpp3d", "segresnetds3d-aniso"])
def test_estimate_mode(case):
    """Fake tensors at a larger size: every segment checkpointed, the peak is well below the parent's (UNet++: the
    tensors its dense skips share pass through the checkpoints as themselves, never copied)."""
    from monai_ckpt.profiling import measure_step_memory

    parent_cls, child_cls, kw, shape = CASES[case]
    big = (1, shape[1], *[2 * s for s in shape[2:]])
    plain = measure_step_memory(lambda: parent_cls(**kw), big, estimate=True)
    ours = measure_step_memory(lambda: child_cls(**kw, checkpoint_policy="all"), big, estimate=True)
    assert 0 < ours.peak < 0.8 * plain.peak


def test_helpers_train_lists_of_heads():
    """train_steps trains every head of a list output (SegResNetDS's are of several sizes)."""
    _, child, shape = make("segresnetds3d-ds")
    outs = train_steps(child, [torch.randn(*shape)])
    assert outs[0].numel() == sum(o.numel() for o in child(torch.randn(*shape)))


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


class _Gate(torch.nn.Module):
    """An AttentionUnet attention gate on a skip made from the input, run as MONAI's AttentionBlock or as the chain's
    gate step."""

    def __init__(self, chain_step: bool, skip_channels: int = 16):
        from monai.networks.nets.attentionunet import AttentionBlock

        super().__init__()
        self.chain_step = chain_step
        self.skip = torch.nn.Conv3d(1, skip_channels, 1)
        self.block = AttentionBlock(3, f_int=1, f_g=1, f_l=skip_channels)

    def forward(self, inp):
        from monai_ckpt.networks.attentionunet import _attention

        x = self.skip(inp)
        return _attention(self.block, inp, x) if self.chain_step else self.block(inp, x)


def test_the_attention_gates_backward_holds_one_skip_sized_product_at_a_time():
    """The gate's product ``x * psi`` in backward: MONAI's (autograd's MulBackward) makes ``grad * psi`` and then
    ``grad * x`` and sums the latter to psi's one channel with both alive; the chain's gate reduces first. Same
    operators, so bit-identical gradients; at the reduction the live bytes are one skip-sized tensor fewer."""
    from monai_ckpt.profiling.step import steady_state
    from monai_ckpt.profiling.tracker import run_tracked_step

    shape = (2, 1, 16, 16, 16)
    at_reduction = []
    for chain_step in (False, True):
        points = []
        with steady_state(lambda: _Gate(chain_step), shape, False, torch.device("cpu"), "adam", False) as (m, o, x, _):
            run_tracked_step(m, o, x, False, lambda t, func, out: points.append((func, t.live_bytes(), t.phase)))
        at_reduction.append([live for func, live, phase in points
                             if func is torch.ops.aten.sum.dim_IntList and phase == "backward"])
    skip = 2 * 16 * 16**3 * 4
    assert len(at_reduction[0]) == len(at_reduction[1]) == 1
    assert at_reduction[0][0] - at_reduction[1][0] == skip

    torch.manual_seed(0)
    parent, child = _Gate(False), _Gate(True)
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])
