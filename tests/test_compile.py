"""torch.compile (inductor, CPU) on the checkpoint-aware networks: the compiled training step equals the eager
MONAI parent (outputs, gradients, weights, BatchNorm statistics updated once per step), checkpointing still
saves memory inside the compiled graph, and what torch cannot compile is a graph break, never a crash.

Compiling is slow on a small CI host: a few tiny networks, each compiled once and asserted on thoroughly.
"""

import copy
import os

import pytest
import torch
from monai.networks.nets import DynUNet, UNet, VNet
from networks_registry import CASES as NETWORKS

from monai_ckpt import CheckpointDynUNet, CheckpointUNet, CheckpointVNet, InputShapeError
from monai_ckpt.profiling import saved_for_backward

UNET = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1,
            norm="batch", dropout=0.2)
VNET = dict(spatial_dims=2, in_channels=1, out_channels=2, dropout_prob_down=0.2, dropout_prob_up=(0.2, 0.2),
            dropout_dim=2)
DYNUNET = dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 3, strides=[1, 2, 2],
               upsample_kernel_size=[2] * 2, filters=[4, 8, 16], norm_name="batch", dropout=0.1)
DYNUNET_DS = dict(DYNUNET, deep_supervision=True, deep_supr_num=1, res_block=True)

# network, policy (one of each kind but the budget, which test_what_torch_cannot_trace... covers), input shape,
# backend. inductor takes 30-200 s per network to generate kernels on 2 busy cores, so only the UNet uses it here;
# the others stop one step short of code generation: the same Dynamo trace, joint graph, decompositions and
# min-cut partitioner as inductor, where recomputation, RNG replay and BatchNorm updates are decided. Every case
# under inductor: MONAI_CKPT_COMPILE_BACKEND=inductor python -m pytest -q tests/test_compile.py (docs/benchmarks/compile.md).
_FAST = os.environ.get("MONAI_CKPT_COMPILE_BACKEND", "aot_eager_decomp_partition")
CASES = {
    "unet-all": (UNet, CheckpointUNet, UNET, "all", (2, 1, 8, 8, 8), "inductor"),
    # 32x32, not 16x16: VNet's 1x1 bottom maps normalised over a batch of 2 are so ill-conditioned that even the
    # compiled plain VNet differs from the eager one by ~5e-3 in the second step's gradients (measured)
    "vnet2d-cheap": (VNet, CheckpointVNet, VNET, "cheap", (2, 1, 32, 32), _FAST),
    "dynunet-runs": (DynUNet, CheckpointDynUNet, DYNUNET, [["encoder0", "encoder1"], "bottleneck.1",
                     {"names": ["decoder1.0"], "mode": "cheap"}, "decoder0"], (2, 1, 8, 8, 8), _FAST),
    "dynunet-ds-blocks": (DynUNet, CheckpointDynUNet, DYNUNET_DS, "blocks", (2, 1, 8, 8, 8), _FAST),
    # the opt-in nested mode: checkpoints inside a checkpoint's function trace into the same graph
    "unet-nested": (UNet, CheckpointUNet, UNET, {"names": [["encoder0", "bottleneck", ["decoder0.0", "decoder0.1"],
                                                            "decoder0.2"]], "mode": "nested"}, (2, 1, 8, 8, 8), _FAST),
}
ATOL, RTOL = 1e-4, 1e-3  # compiled kernels sum in another order; after 2 SGD steps (lr 0.1) differences stay ~1e-5


@pytest.fixture(autouse=True)
def _eager_random_ops(monkeypatch):
    """inductor draws random numbers its own way unless told to call torch's RNG: with this, the compiled
    dropout masks are those of the eager parent (and the recomputation replays them)."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, what
    diff = (actual.double() - expected.double()).abs()
    assert bool((diff <= ATOL + RTOL * expected.double().abs()).all()), f"{what}: max difference {diff.max().item():.3g}"


def assert_close_training(parent, child, compiled, shape, steps=2):
    """``steps`` SGD steps of the eager parent and of ``compiled`` (``child`` compiled) with the same dropout
    masks; outputs and gradients of every step, then weights and buffers, agree; BatchNorm counted each step once."""
    parent = copy.deepcopy(parent).train()
    compiled.train()
    models = {"parent": parent, "compiled": compiled}
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.1) for name, m in models.items()}
    for step in range(steps):
        x = torch.randn(*shape)
        outs, grads = {}, {}
        for name, model in models.items():
            torch.manual_seed(1000 + step)
            out = model(x)
            outs[name] = list(out) if isinstance(out, (list, tuple)) else [out]  # deep supervision: every head
            sum(o.float().square().mean() for o in outs[name]).backward()
            grads[name] = [p.grad.clone() for p in model.parameters()]
            opts[name].step()
            opts[name].zero_grad()
        assert len(outs["compiled"]) == len(outs["parent"])
        for i, (o_c, o_p) in enumerate(zip(outs["compiled"], outs["parent"])):
            assert_close(o_c, o_p, f"output {i} of step {step}")
        for (name, _), g_c, g_p in zip(parent.named_parameters(), grads["compiled"], grads["parent"], strict=True):
            assert_close(g_c, g_p, f"gradient of {name} in step {step}")
    for (name, p), (_, c) in zip(parent.named_parameters(), child.named_parameters(), strict=True):
        assert_close(c.detach(), p.detach(), f"weight {name}")
    for (name, p), (_, c) in zip(parent.named_buffers(), child.named_buffers(), strict=True):
        assert_close(c, p, f"buffer {name}")
        if name.endswith("num_batches_tracked"):
            assert int(c) == steps, f"{name}: {int(c)} BatchNorm updates in {steps} compiled steps"


@pytest.mark.parametrize("case", CASES)
def test_compiled_training_equals_the_eager_parent(case):
    """Two SGD steps with dropout through torch.compile(fullgraph=True) against the eager MONAI
    parent: outputs, gradients, weights and BatchNorm buffers agree to float tolerance, and every
    ``num_batches_tracked`` is exactly 2: the compiled recomputation never updates the running statistics."""
    parent_cls, child_cls, kw, policy, shape, backend = CASES[case]
    torch.manual_seed(0)
    parent = parent_cls(**kw)
    child = child_cls(**kw, checkpoint_policy=policy)
    child.load_state_dict(parent.state_dict())
    torch._dynamo.reset()
    assert child.checkpoint_groups()
    assert_close_training(parent, child, torch.compile(child, fullgraph=True, backend=backend), shape)


# One case of each newer network (tests/networks_registry.py), "cheap": the policy whose recomputation is chosen
# operator by operator, which the compiled graph must carry (the merge's and the gate's autograd Functions traced as
# plain expressions). BasicUNet's "cheap" compiles in test_cheap_compiles_with_fullgraph_in_a_fresh_process.
NEWER = ["segresnet3d", "swin2d-unnormalized", "attunet3d", "segresnetds3d-ds"]


@pytest.mark.parametrize("case", NEWER)
def test_the_newer_networks_compile_with_fullgraph_and_train_as_the_parent(case):
    """The same two steps as above for SegResNet, SwinUNETR, AttentionUnet (whose input check did not trace: a
    generator in its size rule) and SegResNetDS with its deep-supervision heads."""
    parent_cls, child_cls, kw, shape = NETWORKS[case]
    torch.manual_seed(0)
    parent = parent_cls(**kw)
    child = child_cls(**kw, checkpoint_policy="cheap")
    child.load_state_dict(parent.state_dict())
    torch._dynamo.reset()
    assert child.checkpoint_groups()
    assert_close_training(parent, child, torch.compile(child, fullgraph=True, backend=_FAST), shape)


def test_checkpointing_lowers_what_the_compiled_step_saves_and_follows_policy_changes():
    """Inside the compiled graph the checkpointed groups are recomputed, not saved: the bytes the compiled step
    holds for backward drop with "all", rise again with "cheap" (it keeps the convolution outputs), and a policy
    assigned after compiling is used (Dynamo recompiles) with outputs still equal to the eager parent's."""
    kw = dict(UNET, channels=(4, 8, 16), strides=(2, 2), dropout=0.0)
    torch.manual_seed(0)
    parent = UNet(**kw)
    child = CheckpointUNet(**kw, checkpoint_policy="none")
    child.load_state_dict(parent.state_dict())
    compiled = torch.compile(child, fullgraph=True, backend="aot_eager_decomp_partition")
    x = torch.randn(2, 1, 16, 16, 16)
    expected = parent(x)
    saved = {}
    for policy in ("none", "all", "cheap"):
        child.checkpoint_policy = policy
        saved[policy], out = saved_for_backward(compiled, x)
        assert_close(out, expected, f"output with {policy!r}")
    eager_plain, _ = saved_for_backward(copy.deepcopy(parent), x)
    assert saved["all"] < 0.5 * saved["none"] and saved["none"] <= eager_plain, (saved, eager_plain)
    assert saved["all"] < saved["cheap"] < saved["none"], saved


def _budget_between_all_and_plain(shape):
    from monai_ckpt.profiling import measure_step_memory

    peaks = [measure_step_memory(lambda p=p: CheckpointUNet(**UNET, checkpoint_policy=p), shape, estimate=True).peak
             for p in ("all", "none")]
    return {"budget_gb": (peaks[0] + 0.5 * (peaks[1] - peaks[0])) / 2**30}


@pytest.mark.parametrize("policy, says", [("offload", "saved_tensors_hooks"), ("budget", "plan_checkpoints")])
def test_what_torch_cannot_trace_is_a_graph_break_that_fullgraph_names(policy, says):
    """"offload" and the planning of a budget policy cannot be traced: with fullgraph Dynamo refuses with our
    reason; without it they run eagerly between compiled graphs and the step equals the parent's; once planned
    for a shape (at that graph break, or by ``plan_checkpoints(x)``) a budget policy compiles with fullgraph."""
    shape = (2, 1, 8, 8, 8)
    policy = _budget_between_all_and_plain(shape) if policy == "budget" else policy
    torch.manual_seed(0)
    parent = UNet(**UNET)
    child = CheckpointUNet(**UNET, checkpoint_policy=policy)
    child.load_state_dict(parent.state_dict())
    with pytest.raises(torch._dynamo.exc.Unsupported, match=says):
        torch.compile(copy.deepcopy(child), fullgraph=True, backend="aot_eager")(torch.randn(*shape))
    assert_close_training(parent, child, torch.compile(child, backend="aot_eager"), shape)
    if policy != "offload":
        assert child.checkpoint_plan.input_shape == shape and child.checkpoint_groups()  # planned at the break
        planned = copy.deepcopy(child)
        # planned for the compiled step (compiled=True: the eager step has a plan of its own): no work
        assert planned.plan_checkpoints(torch.randn(*shape), compiled=True) == child.checkpoint_plan
        assert child.checkpoint_plan.compiled
        torch.compile(planned, fullgraph=True, backend="aot_eager")(torch.randn(*shape)).mean().backward()


def test_a_bad_training_input_under_compile_is_our_error():
    """Dynamo traces the input check; a bad shape ends the graph where the check raises and our error comes out."""
    net = CheckpointUNet(**dict(UNET, channels=(4, 8, 16), strides=(2, 2)))
    with pytest.raises(InputShapeError, match=r"cannot take spatial size \(8, 8, 6\).*pad to \(8, 8, 8\)") as err:
        torch.compile(net, backend="aot_eager")(torch.randn(2, 1, 8, 8, 6))
    assert isinstance(err.value, RuntimeError)


_COMPILED_FIRST = """
import torch
from monai.networks.nets import BasicUNet
from monai_ckpt import CheckpointBasicUNet

kw = dict(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
torch.manual_seed(0)
parent, child = BasicUNet(**kw).train(), CheckpointBasicUNet(**kw, checkpoint_policy="cheap").train()
child.load_state_dict(parent.state_dict())
x = torch.randn(2, 1, 32, 32, 32)
compiled = torch.compile(child, backend="aot_eager", fullgraph=True)(x)  # before anything runs eagerly
compiled.square().mean().backward()
parent(x).square().mean().backward()
assert all(torch.equal(p.grad, c.grad) for p, c in zip(parent.parameters(), child.parameters()))
print("compiled first: ok")
"""


def test_cheap_compiles_with_fullgraph_in_a_fresh_process():
    """The blocks that "cheap" reruns although they are convolutions (BasicUNet's upsamplings and 1-channel
    convolution, as UNet's residual branches) are marked through a thread-local flag; compiled before anything had
    run eagerly in the process, reading that flag was an exception to Dynamo (fullgraph: an error; otherwise a graph
    break)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _COMPILED_FIRST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled first: ok" in proc.stdout, proc.stderr[-3000:]
