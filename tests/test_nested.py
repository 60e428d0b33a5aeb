"""The opt-in nested mode: a group's recomputation checkpoints runs of its blocks again. Still exact against the
MONAI parent (outputs, gradients, weights, BatchNorm statistics, dropout masks), each conv run at most 3 times."""

import pytest
import torch
from monai.networks.nets import DynUNet, UNet, VNet

from monai_ckpt import CheckpointDynUNet, CheckpointUNet, CheckpointVNet
from monai_ckpt.policies import CheckpointGroup, resolve_policy, validate_policy
from monai_ckpt.profiling import measure_step_memory
from helpers import assert_same_training, count_conv_calls, make_pair, saved_tensor_shapes

CFG = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2,
           norm="batch", dropout=0.2)
WHOLE_NESTED = {"segments": 1, "mode": "nested"}  # the whole network one group, each block an inner run
MIXED = [{"names": ["encoder0"]},
         {"names": [["encoder1", "bottleneck", "decoder1"], ["decoder0.0", {"plain": "decoder0.1"}, "decoder0.2"]],
          "mode": "nested"}]


def _batch_counts(net: torch.nn.Module) -> set[int]:
    return {int(b) for n, b in net.named_buffers() if n.endswith("num_batches_tracked")}


@pytest.mark.parametrize("policy", [WHOLE_NESTED, MIXED], ids=["whole", "mixed"])
def test_nested_unet_with_batchnorm_and_dropout_is_exact(policy):
    torch.manual_seed(0)
    parent = UNet(**CFG)
    child = CheckpointUNet(**CFG, checkpoint_policy=policy)
    assert any(g.inner for g in child.checkpoint_groups())
    assert_same_training(parent, child, [torch.randn(2, 1, 16, 16, 16) for _ in range(2)])
    assert _batch_counts(child) == {2}  # BatchNorm counted once per step at every level of recomputation


def test_each_conv_runs_at_most_three_times():
    child = CheckpointUNet(**CFG, checkpoint_policy=MIXED)
    x = torch.randn(2, 1, 16, 16, 16)
    counts = count_conv_calls(child, lambda: child(x).square().mean().backward(), starts=True)
    assert max(counts.values()) == 3
    # encoder0 is one plain group: forward + its recomputation. The deeper levels are inner runs of a nested group:
    # forward, the outer group's recomputation, their own.
    assert all(counts[n] == 2 for n in counts if n.startswith("model.0."))
    assert all(counts[n] == 3 for n in counts if n.startswith("model.1.submodule.0."))
    assert counts["model.2.0.conv"] == 3  # decoder0.0's transposed conv
    child.checkpoint_policy = [["encoder1", "bottleneck", "decoder1"], ["decoder0.0", "decoder0.1", "decoder0.2"]]
    assert max(count_conv_calls(child, lambda: child(x).square().mean().backward(), starts=True).values()) == 2


def test_nested_vnet_and_deep_supervision_dynunet_are_exact():
    vnet = dict(spatial_dims=2, in_channels=2, out_channels=3, dropout_prob_down=0.3, dropout_dim=2)  # in-place ELU
    parent, child = make_pair(VNet, CheckpointVNet, vnet, WHOLE_NESTED)
    assert_same_training(parent, child, [torch.randn(2, 2, 32, 32) for _ in range(2)])
    assert _batch_counts(child) == {2}
    kw = dict(spatial_dims=3, in_channels=2, out_channels=3, kernel_size=[3] * 4, strides=[1, 2, 2, 2],
              upsample_kernel_size=[2] * 3, filters=[4, 8, 16, 32], deep_supervision=True, deep_supr_num=2,
              dropout=0.1, norm_name="batch")
    parent, child = make_pair(DynUNet, CheckpointDynUNet, kw, WHOLE_NESTED)  # the heads are emitted by inner runs
    assert_same_training(parent, child, [torch.randn(2, 2, 16, 16, 16) for _ in range(2)])


def test_nesting_lowers_the_peak_of_the_same_group():
    """One group over the whole network keeps everything at once in its recomputation; nested, only the blocks'
    boundaries (exact live-tensor bytes, MemTracker)."""
    def peak(policy):
        return measure_step_memory(lambda: CheckpointUNet(**CFG, checkpoint_policy=policy), (2, 1, 32, 32, 32),
                                   optimizer="sgd").peak

    assert peak(WHOLE_NESTED) < 0.8 * peak({"segments": 1})


def test_nested_policy_syntax_and_errors():
    segments = CheckpointUNet(**CFG, checkpoint_policy="none").checkpoint_segments()
    spec = {"names": ["decoder1", ["decoder0.0", ["decoder0.1", "decoder0.2"]]], "mode": "nested"}
    assert resolve_policy(spec, segments) == [
        CheckpointGroup(("decoder1.0", "decoder1.1", "decoder1.2"), "full",
                        (("decoder1.0",), ("decoder1.1",), ("decoder1.2",))),
        CheckpointGroup(("decoder0.0", "decoder0.1", "decoder0.2"), "full",
                        (("decoder0.0",), ("decoder0.1", "decoder0.2"))),
    ]
    # a segment name inside an outer group is one inner run; {"plain": ...} runs without an inner checkpoint
    groups = resolve_policy({"names": [["bottleneck", {"plain": ["decoder1"]}]], "mode": "nested"}, segments)
    assert groups == [CheckpointGroup(("bottleneck.0", "bottleneck.1", "decoder1.0", "decoder1.1", "decoder1.2"),
                                      "full", (("bottleneck.0", "bottleneck.1"),))]
    # other selectors: each group's blocks are its inner runs; a one-block group does not nest
    assert [g.inner for g in resolve_policy({"kind": "encoder", "mode": "nested"}, segments)] == [
        (("encoder0.0",), ("encoder0.1",)), (("encoder1.0",), ("encoder1.1",))]
    assert resolve_policy({"names": ["decoder0.0"], "mode": "nested"}, segments) == [CheckpointGroup(("decoder0.0",))]
    with pytest.raises(ValueError, match="one inner run that is the whole group"):
        resolve_policy({"names": [["decoder0"]], "mode": "nested"}, segments)
    with pytest.raises(ValueError, match="not a run of consecutive blocks"):
        resolve_policy({"names": [["encoder0", "decoder0"]], "mode": "nested"}, segments)
    with pytest.raises(ValueError, match="does not have"):
        resolve_policy({"names": [["encoder0", "encoder9"]], "mode": "nested"}, segments)
    with pytest.raises(ValueError, match=r"in mode 'nested', 'names' is a list"):
        validate_policy({"names": [["encoder0", 3]], "mode": "nested"})
    with pytest.raises(ValueError, match=r"in mode 'nested'.*\{'plain': names\}"):
        validate_policy({"names": [["encoder0", {"skip": "encoder1"}]], "mode": "nested"})
    with pytest.raises(ValueError, match="'mode' must be one of.*'nested'"):
        validate_policy({"names": ["encoder0"], "mode": "twice"})
    with pytest.raises(ValueError, match="not policy dicts"):
        validate_policy({"names": [{"plain": "encoder0"}]})


def test_the_merge_keeps_its_parts_not_their_concatenation():
    """Op-level: the decoder's merge (concatenation + transposed conv) saves the skip and the upsampled tensor,
    which the chain keeps anyway, and concatenates them again in backward: no tensor with the channels of both is
    kept (MONAI's UNet keeps one per level), and training stays bit-identical, under bf16 autocast too."""
    cfg = dict(CFG, norm="instance", dropout=0.0)
    x = torch.randn(2, 1, 16, 16, 16)

    torch.manual_seed(0)
    parent, child = UNet(**cfg), CheckpointUNet(**cfg, checkpoint_policy=["encoder0"])  # the decoders run plainly
    child.load_state_dict(parent.state_dict())
    concatenations = {(2, 8 + 16, 4, 4, 4), (2, 4 + 4, 8, 8, 8)}  # level 1: skip + bottleneck; level 0: skip + up
    assert concatenations <= saved_tensor_shapes(parent, x)
    assert not concatenations & saved_tensor_shapes(child, x)
    for policy in (["encoder0"], MIXED):
        child.checkpoint_policy = policy
        for net in (parent, child):
            net.zero_grad()
            torch.manual_seed(3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x)
            out.float().square().mean().backward()
            net.out = out
        assert torch.equal(child.out, parent.out)
        for (name, p), c in zip(parent.named_parameters(), child.parameters()):
            assert torch.equal(p.grad, c.grad), name


@pytest.mark.parametrize("case", ["segresnet3d", "swin2d-v2-instance", "attunet3d", "basicunet3d", "unetpp2d-ds",
                                  "segresnetds3d-ds"])
def test_nested_is_exact_on_the_newer_networks(case):
    """The whole network one nested group, each block an inner run: the same training as the parent (UNet++'s
    dense skips, SegResNetDS's and UNet++'s deep-supervision heads emitted from inner runs)."""
    from networks_registry import make
    parent, child, shape = make(case, WHOLE_NESTED)
    assert any(g.inner for g in child.checkpoint_groups())
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])
