"""The planner for the compiled step: ``plan(..., compiled=True)`` measures what inductor's partition of the
network's graph keeps and the peak of the step it runs (fake tensors), chooses our policy, compile's
``activation_memory_budget`` or both, and a ``{"budget_gb": X}`` network under torch.compile runs that choice and
stays exactly the eager parent.

Compiling is slow here: tiny networks, inductor's partition without its code generation, aot_eager_decomp_partition
(the same min-cut partitioner, honouring the same region budget) for the training comparison."""

import dataclasses

import torch
from monai.networks.nets import UNet
from test_compile import UNET, _eager_random_ops, assert_close_training  # noqa: F401 - the fixture applies here
from torch._functorch._aot_autograd.utils import make_boxed_func
from torch._inductor.compile_fx import compile_fx

import monai_ckpt.planner as planner_package
from monai_ckpt import CheckpointUNet
from monai_ckpt.planner.compiled import compile_budgets
from monai_ckpt.planner.search import Planner, spec_text
from monai_ckpt.profiling import replica, saved_for_backward

SMALL = dict(UNET, channels=(4, 8, 16), strides=(2, 2), dropout=0.0, norm="instance")


def _partitioned_by_inductor(budget):
    """inductor's decompositions, joint passes and min-cut partition at ``budget``; the graphs run as they are."""

    def backend(gm, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs, inner_compile=lambda g, _, **kw: make_boxed_func(g.forward))

    return backend


def test_the_compiled_plan_fits_is_never_slower_than_compiles_own_budget_and_keeps_what_the_partition_keeps():
    """At the whole-step peak of compile's own budget 0.8, the compiled plan fits, is no slower by the compiled
    time model, and what its compiled step keeps for backward (fake tensors, planned size) is what the same
    partition keeps on real tensors."""
    torch._dynamo.reset()  # a fresh compile cache: after test_compile's compiles the fullgraph trace below saw the hooks
    net = CheckpointUNet(**SMALL, checkpoint_policy="none")
    shape = (2, 1, 16, 16, 16)
    planner = Planner(net, shape, False, "adam", timing=False)
    step = planner.compiled_step
    plain, own = step.measure("none", 1.0, spec_text("none")), step.measure("none", 0.8, spec_text("none"))
    assert own.saved_bytes < plain.saved_bytes
    p = planner.plan_compiled(own.peak)
    assert p.compiled and p.fits and p.predicted_peak_bytes <= own.peak
    assert p.predicted_time_ratio * plain.cost <= own.cost * (1 + 1e-9)
    model = replica(net, p.policy).train()
    compiled = torch.compile(model, backend=_partitioned_by_inductor(p.compile_memory_budget), fullgraph=True)
    assert saved_for_backward(compiled, torch.randn(*shape))[0] == p.saved_bytes


def test_a_budget_network_runs_its_compiled_plan_policy_and_compile_budget_as_the_eager_parent(monkeypatch):
    """The combined mode: a ``{"budget_gb": X}`` network planned for the compiled step (here a plan given by a
    stand-in planner: a checkpointed group and compile's budget 0.3 for the rest) sets the budget for its graph
    (`region_activation_memory_budget`) and checkpoints the group; two steps equal the eager parent; and what the
    compiled step keeps is what the planner measures for that policy and budget, less than the policy alone keeps.
    (Instance norm, no dropout: a network with BatchNorm, or with dropout under ``fallback_random``, is planned with
    compile's default budget only, `compile_budgets`, and its compiled step is then test_compile's.)"""
    assert compile_budgets(CheckpointUNet(**UNET)) == (1.0,) and 0.3 in compile_budgets(CheckpointUNet(**SMALL))
    assert compile_budgets(CheckpointUNet(**dict(SMALL, dropout=0.1))) == (1.0,)  # under fallback_random (fixture)
    policy = ["decoder0"]
    net = CheckpointUNet(**SMALL, checkpoint_policy={"budget_gb": 1.0})
    shape = (2, 1, 16, 16, 16)
    analysis = Planner(net, shape, False, "adam", timing=False).compiled_step
    combined, alone = (analysis.measure(policy, b, spec_text(policy)) for b in (0.3, 1.0))
    assert combined.saved_bytes < alone.saved_bytes
    planned = []

    def stand_in(network, x, amp, spec, compiled=False):
        plan = planner_package.plan(network, tuple(x.shape[2:]), 1.0, batch_size=int(x.shape[0]))  # fits plainly
        planned.append(compiled)
        return dataclasses.replace(plan, policy=policy, compiled=compiled, compile_memory_budget=0.3)

    monkeypatch.setattr(planner_package, "plan_for_network", stand_in)
    torch.manual_seed(0)
    parent = UNet(**SMALL)
    net.load_state_dict(parent.state_dict())
    compiled = torch.compile(net, backend="aot_eager_decomp_partition")
    assert_close_training(parent, net, compiled, shape)
    assert planned == [True] and net.checkpoint_plan.compile_memory_budget == 0.3
    with torch.random.fork_rng():
        assert saved_for_backward(compiled, torch.randn(*shape))[0] == combined.saved_bytes
