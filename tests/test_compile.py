"""torch.compile (inductor, CPU) on the checkpoint-aware networks: the compiled training step equals the eager
MONAI parent (outputs, gradients, weights, BatchNorm statistics updated once per step), checkpointing still
saves memory inside the compiled graph, and what torch cannot compile is a graph break, never a crash.

Compiling is slow on a small CI host: a few tiny networks, each compiled once and asserted on thoroughly.
"""

import copy

import pytest
import torch
from monai.networks.nets import DynUNet, UNet, VNet

from monai_ckpt import CheckpointDynUNet, CheckpointUNet, CheckpointVNet
from helpers import train_steps

UNET = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1,
            norm="batch", dropout=0.2)
VNET = dict(spatial_dims=2, in_channels=1, out_channels=2, dropout_prob_down=0.2, dropout_prob_up=(0.2, 0.2),
            dropout_dim=2)
DYNUNET = dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 3, strides=[1, 2, 2],
               upsample_kernel_size=[2] * 2, filters=[4, 8, 16], norm_name="batch", dropout=0.1)
DYNUNET_DS = dict(DYNUNET, deep_supervision=True, deep_supr_num=1, res_block=True)

# network, policy (one of each kind), input shape, fullgraph, backend. VNet's graph is long: inductor takes minutes
# to generate its kernels on 2 cores, so here it stops one step short of code generation (the same Dynamo trace,
# joint graph, decompositions and min-cut partitioner as inductor, where recomputation and BatchNorm updates are
# decided); docs/scripts/compile_benchmark.py runs VNet under inductor.
CASES = {
    "unet-all": (UNet, CheckpointUNet, UNET, "all", (2, 1, 8, 8, 8), True, "inductor"),
    "vnet2d-cheap": (VNet, CheckpointVNet, VNET, "cheap", (2, 1, 16, 16), True, "aot_eager_decomp_partition"),
    "dynunet-runs": (DynUNet, CheckpointDynUNet, DYNUNET, [["encoder1", "encoder2"], {"names": ["decoder1.0"],
                     "mode": "cheap"}, "decoder0"], (2, 1, 8, 8, 8), True, "inductor"),
    "dynunet-ds-budget": (DynUNet, CheckpointDynUNet, DYNUNET_DS, {"budget_gb": 1e-3}, (2, 1, 8, 8, 8), False,
                          "inductor"),
}
ATOL, RTOL = 1e-4, 1e-3  # compiled kernels sum in another order; after 2 SGD steps (lr 0.1) differences stay ~1e-5


@pytest.fixture(autouse=True)
def _eager_random_ops(monkeypatch):
    """inductor draws random numbers its own way unless told to call torch's RNG: with this, the compiled
    dropout masks are those of the eager parent (and the recomputation replays them)."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)


def saved_for_backward(model, x):
    """Bytes of the distinct storages the step saves for backward (what checkpointing lowers), and its output."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().square().mean().backward()
    return sum(storages.values()), out


def assert_close_training(parent, child, compiled, shape, steps=2):
    parent = copy.deepcopy(parent)
    inputs = [torch.randn(*shape) for _ in range(steps)]
    outs_p = train_steps(parent, inputs)
    outs_c = train_steps(compiled, inputs)
    for a, b in zip(outs_p, outs_c, strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    for (name, p), (_, c) in zip(parent.named_parameters(), child.named_parameters(), strict=True):
        torch.testing.assert_close(c.grad, p.grad, atol=ATOL, rtol=RTOL, msg=f"grad {name}")
        torch.testing.assert_close(c, p, atol=ATOL, rtol=RTOL, msg=f"param {name}")
    for (name, p), (_, c) in zip(parent.named_buffers(), child.named_buffers(), strict=True):
        torch.testing.assert_close(c, p, atol=ATOL, rtol=RTOL, msg=f"buffer {name}")
        if name.endswith("num_batches_tracked"):
            assert int(c) == steps, f"{name}: {int(c)} BatchNorm updates in {steps} compiled steps"


@pytest.mark.parametrize("case", CASES)
def test_compiled_training_equals_the_eager_parent(case):
    """Two SGD steps with dropout through torch.compile (fullgraph where torch allows it) against the eager MONAI
    parent: outputs, gradients, weights and BatchNorm buffers agree to float tolerance, and every
    ``num_batches_tracked`` is exactly 2: the compiled recomputation never updates the running statistics."""
    parent_cls, child_cls, kw, policy, shape, fullgraph, backend = CASES[case]
    torch.manual_seed(0)
    parent = parent_cls(**kw)
    child = child_cls(**kw, checkpoint_policy=policy)
    child.load_state_dict(parent.state_dict())
    torch._dynamo.reset()
    assert_close_training(parent, child, torch.compile(child, fullgraph=fullgraph, backend=backend), shape)
    assert child.checkpoint_groups()
    if isinstance(policy, dict) and "budget_gb" in policy:
        assert child.checkpoint_plan.input_shape == shape  # planned at a graph break, outside the compiled graphs
