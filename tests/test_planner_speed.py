"""What makes planning fast gives the same figures: the question's step built once on fake tensors (`FakeStep`)
measures every policy's peak to the byte as `measured_peak` does, identical blocks are profiled once, and a loss on
a list of deep-supervision heads is planned as the step calls it."""

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from monai_ckpt import CheckpointBasicUNetPlusPlus, CheckpointDynUNet, CheckpointSegResNet, CheckpointUNet
from monai_ckpt.planner.step import FakeStep, make_step, measured_peak
from monai_ckpt.profiling import LabelBatch, block_costs, measure_step_memory, replica


def test_the_step_built_once_measures_every_policy_as_a_fresh_step_does():
    """Optimizer state, batch and label built once and the optimizer phase measured once: the peak of each policy
    (plain, checkpointed, cheap, nested; a BatchNorm UNet, and a deep-supervision DynUNet with a loss that reads
    data, replayed by `LossStandIn`) equals the peak of a step built from scratch for it."""
    unet = CheckpointUNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")
    dynunet = CheckpointDynUNet(3, 1, 2, kernel_size=[3] * 3, strides=[1, 2, 2], upsample_kernel_size=[2] * 2,
                                filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1)
    dice = DiceCELoss(to_onehot_y=True, softmax=True)
    nested = {"names": [[["encoder0"], ["encoder1", "bottleneck"]]], "mode": "nested"}
    cases = [(unet, (2, 1, 16, 16, 16), None, ["none", "all", "cheap", nested]),
             (dynunet, (1, 1, 16, 16, 16), lambda out, y: dice(out[:, 0], y), ["none", "blocks", "cheap"])]
    for net, shape, loss, policies in cases:
        step = make_step(net, shape, False, loss, "index")
        fake = FakeStep(net, shape, False, "adam", step)
        for policy in policies:
            assert fake.peak(policy) == measured_peak(net, policy, shape, False, "adam", step), (type(net), policy)


def test_identical_blocks_are_profiled_once_with_the_same_costs(monkeypatch):
    """SegResNet's repeated ResBlocks (same structure, parameter and input shapes) are run once: fewer convolutions
    run, and every block's costs are those of running each block."""
    net = CheckpointSegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 3),
                              blocks_up=(1,))
    calls = []
    convolve = torch.nn.Conv3d._conv_forward
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda self, *a: calls.append(1) or convolve(self, *a))
    every = block_costs(lambda: replica(net, "none"), (1, 1, 16, 16, 16), estimate=True, reuse_identical=False)
    each, calls[:] = len(calls), []
    reused = block_costs(lambda: replica(net, "none"), (1, 1, 16, 16, 16), estimate=True)
    assert reused == every and len(calls) < each


def test_a_loss_on_a_list_of_heads_is_planned_as_it_is_called():
    """UNet++ with deep supervision returns a list of heads in training, and DeepSupervisionLoss takes the list:
    the planned step sizes that loss on the whole list (it used to size it on the first head, then fail calling its
    stand-in on the list), and the planner's measured step is within 5% of the real one with the real loss."""
    net = CheckpointBasicUNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4),
                                      deep_supervision=True)
    shape, loss = (2, 1, 32, 32), DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    label = LabelBatch((2, 1, 32, 32), torch.float32)  # DeepSupervisionLoss resizes the label: float class indices
    step = make_step(net, shape, False, loss, label.make())
    assert step.memory.grad_bytes == 4 * 2 * 3 * 32 * 32 * 4  # a gradient for each of the four heads
    real = measure_step_memory(lambda: replica(net, "all"), shape, loss=loss, label=label).peak
    assert abs(FakeStep(net, shape, False, "adam", step).peak("all") - real) <= 0.05 * real


def test_a_long_segment_gets_the_undominated_options_without_listing_all(monkeypatch):
    """A segment of more blocks than `EXHAUSTIVE_BLOCKS` (nnU-Net ResEnc-L's stages have 12: 3 * 4^11 options, which
    never finished) gets its undominated options built run by run: the same (kept, peak, time) front as listing
    every option, checked on SegResNet's 7-block stage with stand-in times."""
    import random

    import monai_ckpt.planner.model as model
    from monai_ckpt.planner.profile import profile_chain

    net = CheckpointSegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 3),
                              blocks_up=(1,))
    p = profile_chain(net, (1, 1, 16, 16, 16), False, "adam", False)
    rng = random.Random(0)
    for mode in ("full", "cheap"):
        p.recompute_s[mode] = [round(rng.random(), 2) for _ in p.costs]
        p.tail_s[mode] = [round(0.3 * t, 2) for t in p.recompute_s[mode]]
    grads = model.param_grads_after(p)
    blocks = max((blocks for _, blocks in p.segments), key=len)
    assert len(blocks) == 7
    listed = model.undominated(model.segment_options(p, blocks, grads))
    monkeypatch.setattr(model, "EXHAUSTIVE_BLOCKS", 3)
    built = model.segment_options(p, blocks, grads)
    assert sorted((o.kept, o.peak, o.time) for o in built) == sorted((o.kept, o.peak, o.time) for o in listed)
    assert all(model.option_of(p, o.units, grads) == o for o in built)
