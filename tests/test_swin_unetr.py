"""What only CheckpointSwinUNETR has to show beyond the drop-in contract (test_drop_in_contract.py): groups of its
new kinds of blocks, the skips' CNN encoders run where the parent runs them, MONAI's own ``use_checkpoint`` (kept
outside our checkpoints, never nested), in-place steps after instance norm, and estimate mode for a constructor that
reads tensor values."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

from monai_ckpt import CheckpointSwinUNETR
from helpers import assert_in_place_steps_copy_nothing, assert_same_training, loss_of
from networks_registry import make, swin_kwargs


def test_training_parity_with_groups_of_skips_and_stages():
    """A skip's CNN encoder with the decoder before it; a stage's mask-building block on its own; the last stage with
    the bottleneck's CNN block: bit-identical."""
    policy = [["decoder1.1", "skip0"], {"names": ["encoder2.2", "skip1"], "mode": "cheap"},
              ["bottleneck.1", "bottleneck.2"]]
    parent, child, shape = make("swin2d-v2-instance", policy)
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


@pytest.mark.parametrize("policy", ["none", "blocks", "all"])
def test_swin_skip_encoders_run_backward_before_the_stages_as_in_the_parent(policy):
    """Each skip's CNN encoder runs where its skip is merged, after the Swin stages as in the parent, so its backward
    comes before theirs. (Run first in the chain, the level-0 skip's gradient, the size of the input times twice
    the feature size, waited through the whole transformer's backward: 6.7 instead of 5.9 GiB with "blocks" for
    the BTCV SwinUNETR at 128^3.)"""
    parent, child, shape = make("swin2d-v2-instance", policy)
    x = torch.randn(*shape)

    def order(net):
        seen = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: seen.append(n)) for n, p in net.named_parameters()
                 if n.startswith(("encoder1.", "encoder2.", "swinViT.layers1.", "swinViT.layers2."))]
        loss_of(net(x)).backward()
        for h in hooks:
            h.remove()
        return seen

    def first(seen, prefix):
        return min(i for i, n in enumerate(seen) if n.startswith(prefix))

    for seen in (order(parent), order(child)):
        assert max(i for i, n in enumerate(seen) if n.startswith(("encoder1.", "encoder2."))) < first(seen, "swinViT.")


def test_swin_own_checkpoint_is_kept_outside_our_checkpoints_and_never_nested():
    """MONAI's use_checkpoint: in force where our policy leaves the Swin blocks alone (policy "none" is the parent
    itself), off inside our checkpoints, so every Swin linear layer runs at most twice per step."""
    _, child, shape = make("swin3d-own-checkpoint", "none")
    assert child.builtin_checkpoint == "swin blocks"
    assert CheckpointSwinUNETR(**swin_kwargs()).builtin_checkpoint == "none"
    x = torch.randn(*shape)

    def linear_calls():
        counts = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
                 for n, m in child.named_modules() if isinstance(m, torch.nn.Linear)]
        loss_of(child(x)).backward()
        for h in hooks:
            h.remove()
        return counts

    stage1 = "swinViT.layers1.0.blocks.0.attn.qkv"
    assert linear_calls()[stage1] == 2  # MONAI's own checkpoint recomputes it
    child.checkpoint_policy = "all"
    assert max(linear_calls().values()) == 2  # ours instead, not both (that would be 3)
    child.checkpoint_policy = ["encoder3"]  # ours on stage 2 only: MONAI's still on stage 1
    counts = linear_calls()
    assert counts[stage1] == 2 and counts["swinViT.layers2.0.blocks.0.attn.qkv"] == 2


def test_with_monais_use_checkpoint_cheap_and_offload_keep_no_more_than_it():
    """Built with ``use_checkpoint=True`` the parent keeps each Swin block's inputs only. "cheap" inside our checkpoint
    would keep every Swin block's matrix products (6% above the parent here, 35% on the model zoo's BTCV bundle):
    there it recomputes the Swin blocks in full; "offload" recomputes nothing, so MONAI's own checkpoint stays on
    inside it (without it, 11% above the parent on this CPU, where offloading moves nothing). Exact live-tensor
    peaks of a training step (fake tensors: the same bytes as measured)."""
    from monai_ckpt.profiling import measure_step_memory

    kw, shape = swin_kwargs(depths=(2, 2, 2, 2), use_checkpoint=True), (2, 2, 32, 32, 32)
    parent = measure_step_memory(lambda: SwinUNETR(**kw), shape, estimate=True).peak
    for policy in ("cheap", "offload"):
        ours = measure_step_memory(lambda: CheckpointSwinUNETR(**kw, checkpoint_policy=policy), shape, estimate=True)
        assert ours.peak <= parent, policy


def test_in_place_leaky_relu_after_instance_norm_copies_nothing():
    """The in-place LeakyReLU of SwinUNETR's CNN blocks (DynUNet's blocks) after instance norm runs on batch norm's
    output, not through its view."""
    assert_in_place_steps_copy_nothing(SwinUNETR, CheckpointSwinUNETR, swin_kwargs(norm_name="instance"),
                                       (2, 2, 64, 32, 32))


def test_estimate_mode_builds_swin_outside_fake_mode_also_through_monais_config_parser():
    """SwinUNETR's constructor calls .item(): estimate mode builds it for real and measures a fake replica, also when
    MONAI's config parser builds it (``instantiate`` raises a RuntimeError from fake mode's exception)."""
    from monai.bundle import ConfigParser

    from monai_ckpt.profiling import measure_step_memory
    from monai_ckpt.profiling.step import build_network

    kw = swin_kwargs(norm_name="instance")
    plain = measure_step_memory(lambda: SwinUNETR(**kw), (1, 2, 64, 64, 64), estimate=True)
    ours = measure_step_memory(lambda: CheckpointSwinUNETR(**kw, checkpoint_policy="all"), (1, 2, 64, 64, 64),
                               estimate=True)
    assert 0 < ours.peak < 0.8 * plain.peak
    parser = ConfigParser({"network_def": {"_target_": "monai_ckpt.CheckpointSwinUNETR", **kw, "checkpoint_policy": "all"}})
    parsed = measure_step_memory(lambda: parser.get_parsed_content("network_def", lazy=False), (1, 2, 64, 64, 64),
                                 estimate=True)
    assert parsed.peak == ours.peak

    def broken():
        raise RuntimeError("not a tensor's value")

    with pytest.raises(RuntimeError, match="not a tensor's value"):  # any other error is the factory's own
        build_network(broken, estimate=True)
