"""What MONAI's own pipelines hand the network: MetaTensor batches, in the parents' default configurations.

MONAI's data pipelines (``LoadImaged`` ... ``DataLoader``) give the network a `monai.data.MetaTensor` batch, a tensor
subclass that carries each image's metadata through every operator (``__torch_function__``); MONAI's networks then
return a MetaTensor in training and in eval. Every registered network (`networks_registry.REGISTRY`), in its small
test configuration under every policy kind and in the parent's default configuration (default depths, heads and
filters, deep supervision on) at the smallest size it trains on, must train and evaluate on such a batch as its
parent does: the same output values, of the parent's type with the parent's metadata, and the same gradients.

The default configurations are large (VNet's 45M parameters, SwinUNETR's 7^3 windows): each configuration runs one
training step of the parent and one of the child under a policy with a group of every kind (segments in full, single
blocks, "cheap", "offload" and nested), and an eval forward of each; a planned ``{"budget_gb": X}`` policy runs on
one small configuration.
"""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from helpers import loss_of
from networks_registry import REGISTRY


def metatensor_batch(shape: tuple[int, ...], seed: int = 0) -> MetaTensor:
    """A batch as MONAI's DataLoader collates it (`list_data_collate`): a MetaTensor with each image's affine and
    file name, ``is_batch`` set."""
    generator = torch.Generator().manual_seed(seed)
    images = [MetaTensor(torch.randn(*shape[1:], generator=generator),
                         affine=torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64)),
                         meta={"filename_or_obj": f"case_{i}.nii.gz"}) for i in range(shape[0])]
    return list_data_collate(images)


def _listed(out) -> list[torch.Tensor]:  # noqa: ANN001
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _step(net: torch.nn.Module, x: MetaTensor) -> tuple[object, list[torch.Tensor | None]]:
    """One training forward and backward: the output and every parameter's gradient."""
    net.train().zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = net(x)
    loss_of(out).backward()
    return out, [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def assert_same_output_as_parent(expected, got) -> None:  # noqa: ANN001
    """Same container, and per tensor the same type, values and (for a MetaTensor) metadata as the parent's."""
    assert type(got) is type(expected)
    for e, g in zip(_listed(expected), _listed(got), strict=True):
        assert type(g) is type(e), (type(g), type(e))
        assert torch.equal(torch.as_tensor(g), torch.as_tensor(e))
        if isinstance(e, MetaTensor):
            assert g.is_batch == e.is_batch and torch.equal(g.affine, e.affine)
            assert g.meta.keys() == e.meta.keys() and g.meta["filename_or_obj"] == e.meta["filename_or_obj"]


def _assert_same_gradients(expected: list, got: list) -> None:
    for e, g in zip(expected, got, strict=True):
        assert (e is None and g is None) or torch.equal(g, e)


def every_kind(child: torch.nn.Module) -> list[dict]:
    """A policy with a group of every kind over the child's segments, in five runs: segments in full, each block on
    its own, "cheap", "offload", then nested (swapped with the first run where the last has no segment of several
    blocks, which nesting needs: nnU-Net's decoders and heads are one block each)."""
    segments = child.checkpoint_segments()
    q = len(segments) // 5
    names = [s.name for s in segments]
    blocks = [b for s in segments[q:2 * q] for b in s.blocks]
    full, nested = names[:q], names[4 * q:]
    if not any(len(s.blocks) > 1 for s in segments[4 * q:]):
        full, nested = nested, full
    return [{"names": full}, {"names": blocks}, {"names": names[2 * q:3 * q], "mode": "cheap"},
            {"names": names[3 * q:4 * q], "mode": "offload"}, {"names": nested, "mode": "nested"}]


def _pair(network, config: str):  # noqa: ANN001, ANN202
    """The parent and the child (policy "none") of ``config`` ("small" or "default"), with the same weights, and the
    MetaTensor batch they train on."""
    kwargs, shape = (network.small, network.small_shape) if config == "small" else (network.default,
                                                                                    network.default_shape)
    torch.manual_seed(0)
    parent = network.parent(**kwargs)
    child = network.child(**kwargs, checkpoint_policy="none")
    child.load_state_dict(parent.state_dict())
    return parent, child, metatensor_batch(shape)


def assert_trains_and_evaluates_on_a_metatensor_batch_as_the_parent(network, config: str) -> None:  # noqa: ANN001
    """One training step under a policy with a group of every kind, then an eval forward, of ``network`` (a
    `networks_registry.Network`) in its ``config`` ("small" or "default", at the smallest size it trains on)."""
    parent, child, x = _pair(network, config)
    if config == "default":
        dims = x.ndim - 2
        assert x.shape[2:] == child._trainable_size(child._padded((1,) * dims), child._single_voxel_norm(1))
    child.checkpoint_policy = every_kind(child)
    groups = child.checkpoint_groups()
    assert {g.mode for g in groups} == {"full", "cheap", "offload"}
    assert any(g.inner for g in groups) and any(len(g.names) == 1 and not g.inner for g in groups)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        expected, grads = _step(parent, x)
        got, child_grads = _step(child, x)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert_same_output_as_parent(expected, got)
    _assert_same_gradients(grads, child_grads)
    with torch.no_grad():
        assert_same_output_as_parent(parent.eval()(x), child.eval()(x))


@pytest.mark.parametrize("config", ["small", "default"])
@pytest.mark.parametrize("name", REGISTRY)
def test_trains_and_evaluates_on_a_metatensor_batch_as_the_parent(name, config):
    """In the small test configuration and in the parent's default configuration. (Deterministic algorithms:
    SwinUNETR's relative position bias gradient, an index accumulation, otherwise sums in a different order from run
    to run, the parent's alike. nnU-Net's networks: tests/test_nnunet_networks.py.)"""
    assert_trains_and_evaluates_on_a_metatensor_batch_as_the_parent(REGISTRY[name], config)


def test_a_planned_policy_on_a_metatensor_batch():
    """``{"budget_gb": X}``: the planner measures the network for the MetaTensor batch's shape at the first training
    step, then trains as the parent. (The other kinds, alone or together, run the same groups as the policy with a
    group of every kind above: the policies know no network.)"""
    parent, child, x = _pair(REGISTRY["unet"], "small")
    expected, grads = _step(parent, x)
    child.checkpoint_policy = {"budget_gb": 1.0}
    got, child_grads = _step(child, x)
    assert_same_output_as_parent(expected, got)
    _assert_same_gradients(grads, child_grads)
    assert child.checkpoint_plan is not None and child.checkpoint_plan.input_shape == tuple(x.shape)
