"""`enable_checkpointing` / `disable_checkpointing` on a network the user already has, against a never-converted
MONAI parent; `checkpoint_submodules(net)` without names; the policy in ``repr``; ``py.typed``."""

import copy
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from monai.networks import nets
from torch import nn

from monai_ckpt import checkpoint_submodules, disable_checkpointing, enable_checkpointing
from monai_ckpt.networks import CHECKPOINT_CLASSES
from helpers import assert_same_training, same

# parent -> (kwargs, input shape): tiny, batch norm where the parent has it (BatchNorm statistics are compared)
CASES = {
    nets.UNet: (dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                     num_res_units=1, norm="batch", dropout=0.1), (2, 1, 16, 16, 16)),
    nets.VNet: (dict(spatial_dims=2, in_channels=1, out_channels=2, dropout_prob_down=0.2), (2, 1, 16, 16)),
    nets.DynUNet: (dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                        upsample_kernel_size=[2, 2], norm_name="batch", deep_supervision=True, deep_supr_num=1,
                        filters=(4, 8, 16)), (2, 1, 16, 16, 16)),
    nets.SegResNet: (dict(spatial_dims=3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 1),
                          blocks_up=(1,), norm="batch"), (2, 1, 16, 16, 16)),
    nets.SegResNetDS: (dict(spatial_dims=3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 1, 1),
                            norm="batch", dsdepth=2), (2, 1, 16, 16, 16)),
    nets.AttentionUnet: (dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2)),
                         (2, 1, 16, 16, 16)),
    nets.SwinUNETR: (dict(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                          window_size=4, norm_name="batch", spatial_dims=2, use_checkpoint=True), (2, 1, 32, 32)),
    nets.BasicUNet: (dict(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4),
                          norm="batch"), (2, 1, 16, 16, 16)),
    nets.BasicUNetPlusPlus: (dict(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4),
                                  norm="batch", deep_supervision=True), (2, 1, 16, 16, 16)),
}


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    torch.testing.assert_close(torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b]),
                               rtol=1e-5, atol=1e-6)


def _step(net: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout masks in both networks
    out = net(x)
    out = torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out
    (out.float() * torch.linspace(0, 1, out.numel()).view(out.shape)).square().mean().backward()
    optimizer.step()
    return out.detach()


def test_the_nine_supported_classes_are_the_networks_of_the_package():
    import monai_ckpt.networks

    assert set(CASES) == set(CHECKPOINT_CLASSES)
    assert {c.__name__ for c in CHECKPOINT_CLASSES.values()} == {n for n in monai_ckpt.networks.__all__
                                                                if n.startswith("Checkpoint") and n != "CHECKPOINT_CLASSES"}


@pytest.mark.parametrize("parent_cls", list(CASES), ids=lambda c: c.__name__)
def test_enable_keeps_the_object_and_gives_the_drop_in_contract(parent_cls, monkeypatch):
    """An instance trained one step with an optimizer built on it (SGD with momentum: it has a state) is converted in
    place; two more steps with that same optimizer equal a never-converted copy's (outputs, gradients, parameters,
    BatchNorm statistics); eval is the parent's forward; disabling gives back the exact MONAI class."""
    kwargs, shape = CASES[parent_cls]
    torch.manual_seed(0)
    net, xs = parent_cls(**kwargs).train(), [torch.randn(shape) for _ in range(3)]
    reference = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    _step(net, xs[0], opt, 0)
    opt.zero_grad(set_to_none=False)
    reference.load_state_dict(net.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1e-2, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own momentum buffers, not shared ones
    params, keys = list(net.parameters()), list(net.state_dict())

    assert enable_checkpointing(net, "all") is net
    assert type(net) is CHECKPOINT_CLASSES[parent_cls] and isinstance(net, parent_cls)
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True)) and list(net.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values()))
    assert repr(net).splitlines()[1].strip() == "checkpoint_policy='all'" and net.checkpoint_groups()

    module = sys.modules["monai_ckpt.checkpoint"]
    calls, torch_checkpoint = [], module._torch_checkpoint
    monkeypatch.setattr(module, "_torch_checkpoint", lambda *a, **k: calls.append(1) or torch_checkpoint(*a, **k))
    for step, x in enumerate(xs[1:], 1):
        _close([_step(net, x, opt, step)], [_step(reference, x, ref_opt, step)])
        _close([p.grad for p in net.parameters()], [r.grad for r in reference.parameters()])
        opt.zero_grad(set_to_none=False), ref_opt.zero_grad(set_to_none=False)
    assert calls, "the converted network did not checkpoint"
    _close([t.float() for t in net.state_dict().values()], [t.float() for t in reference.state_dict().values()])
    net.eval(), reference.eval()
    with torch.no_grad():
        assert same(net(xs[0]), reference(xs[0]))

    assert disable_checkpointing(net) is net and type(net) is parent_cls
    assert set(vars(net)) == set(vars(reference)) and list(net.state_dict()) == keys
    assert disable_checkpointing(net) is net and type(net) is parent_cls  # idempotent


def test_enable_on_a_converted_network_sets_the_policy_and_a_bad_policy_changes_nothing():
    kwargs, _ = CASES[nets.UNet]
    net = nets.UNet(**kwargs)
    before = set(vars(net))
    with pytest.raises(ValueError, match=r"unknown checkpoint_policy 'alll' \(did you mean 'all'\?\)"):
        enable_checkpointing(net, "alll")
    assert type(net) is nets.UNet and set(vars(net)) == before
    with pytest.raises(ValueError, match="more runs than this network has segments"):  # fails after the swap
        enable_checkpointing(net, {"segments": 99})
    assert type(net) is nets.UNet and set(vars(net)) == before
    enable_checkpointing(net)
    assert enable_checkpointing(net, "cheap") is net and net.checkpoint_policy == "cheap"


def test_enable_keeps_parent_attributes_a_subclass_would_set():
    """What the subclass's __init__ adds beyond the parent's (SwinUNETR: in_channels, spatial_dims and MONAI's own
    use_checkpoint) comes from the parent's modules, as a freshly built subclass has it."""
    kwargs, _ = CASES[nets.SwinUNETR]
    net = enable_checkpointing(nets.SwinUNETR(**kwargs))
    built = CHECKPOINT_CLASSES[nets.SwinUNETR](**kwargs)
    assert (net.in_channels, net.spatial_dims, net.use_checkpoint, net.builtin_checkpoint) == (1, 2, True, "swin blocks")
    assert {k: v for k, v in vars(net).items() if not isinstance(v, (dict, list))} == {
        k: v for k, v in vars(built).items() if not isinstance(v, (dict, list))}


class _MyUNet(nets.UNet):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("make", [lambda: _MyUNet(**CASES[nets.UNet][0]), lambda: nn.Sequential(nn.Conv3d(1, 2, 3)),
                                  lambda: nets.SegResNetVAE(input_image_size=(16, 16, 16))],
                         ids=["subclass", "any module", "another MONAI network"])
def test_other_modules_get_a_clear_error_naming_checkpoint_submodules(make):
    net = make()
    for function in (enable_checkpointing, disable_checkpointing):
        with pytest.raises(TypeError, match=r"exactly one of MONAI's UNet, VNet, .*checkpoint_submodules\(net"):
            function(net)
    assert type(net) is type(make())


def test_checkpoint_submodules_without_names_chooses_the_natural_blocks():
    """UNet: each ResidualUnit and each Convolution outside one (the up-sampling convolutions); training equals
    the plain UNet's; a model without MONAI blocks gets an error that says what to pass."""
    kwargs, shape = CASES[nets.UNet]
    torch.manual_seed(0)
    parent = nets.UNet(**kwargs)
    net = copy.deepcopy(parent)
    chosen = checkpoint_submodules(net)
    assert chosen == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule", "model.1.submodule.2.0",
                      "model.1.submodule.2.1", "model.2.0", "model.2.1"]
    assert [type(dict(net.named_modules())[n]).__name__ for n in chosen] == [
        "ResidualUnit", "ResidualUnit", "ResidualUnit", "Convolution", "ResidualUnit", "Convolution", "ResidualUnit"]
    assert_same_training(parent, net, [torch.randn(shape) for _ in range(2)], atol=1e-6)
    with pytest.raises(ValueError, match=r"holds none: choose its blocks with names=\[\.\.\.\] \(its top-level "
                                         r"submodules are \['0', '1'\]\) or predicate="):
        checkpoint_submodules(nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU()))


def test_the_benchmark_natural_blocks_are_checkpoint_submodules_defaults():
    from monai_ckpt.checkpoint import NATURAL_BLOCKS
    from monai_ckpt.networks.presets import NATURAL_BLOCKS as BENCHMARK_ROWS, NETWORKS

    assert all(NATURAL_BLOCKS[NETWORKS[name][0]] == blocks for name, blocks in BENCHMARK_ROWS.items())
    assert set(NATURAL_BLOCKS) == {parent.__name__ for parent in CHECKPOINT_CLASSES}


def test_py_typed_is_shipped():
    root = Path(__file__).resolve().parents[1]
    assert (root / "monai_ckpt" / "py.typed").is_file()
    config = tomllib.loads((root / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["monai_ckpt"]
