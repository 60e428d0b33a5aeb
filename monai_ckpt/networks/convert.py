"""Switch checkpointing on or off for a network the user already has: `enable_checkpointing` turns an instance of
one of MONAI's supported networks into its monai_ckpt subclass in place, `disable_checkpointing` turns it back.

The object stays the same: only its class is swapped (and what the subclass's ``__init__`` adds beyond the
parent's, by the subclass's own `CheckpointPolicyMixin._init_checkpointing`), so its parameters, buffers, hooks,
an optimizer built on it and a DDP or EMA wrapper around it keep working, and the drop-in contract holds from then
on: state_dict keys, outputs, gradients and BatchNorm statistics are the parent's.
"""

from __future__ import annotations

from monai.networks import nets
from torch import nn

from ..policies import PolicySpec, validate_policy
from .attentionunet import CheckpointAttentionUnet
from .base import CheckpointPolicyMixin
from .basic_unet import CheckpointBasicUNet, CheckpointBasicUNetPlusPlus
from .dynunet import CheckpointDynUNet
from .segresnet import CheckpointSegResNet
from .segresnet_ds import CheckpointSegResNetDS
from .swin_unetr import CheckpointSwinUNETR
from .unet import CheckpointUNet
from .vnet import CheckpointVNet

__all__ = ["CHECKPOINT_CLASSES", "disable_checkpointing", "enable_checkpointing"]

#: MONAI network class -> its checkpoint-aware subclass.
CHECKPOINT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nets.UNet: CheckpointUNet,
    nets.VNet: CheckpointVNet,
    nets.DynUNet: CheckpointDynUNet,
    nets.SegResNet: CheckpointSegResNet,
    nets.SegResNetDS: CheckpointSegResNetDS,
    nets.AttentionUnet: CheckpointAttentionUnet,
    nets.SwinUNETR: CheckpointSwinUNETR,
    nets.BasicUNet: CheckpointBasicUNet,
    nets.BasicUNetPlusPlus: CheckpointBasicUNetPlusPlus,
}
_PARENTS = {child: parent for parent, child in CHECKPOINT_CLASSES.items()}
_POLICY_ATTRIBUTES = tuple(CheckpointPolicyMixin.__jit_ignored_attributes__)  # the policy's state on an instance


def _supported() -> str:
    return ", ".join(parent.__name__ for parent in CHECKPOINT_CLASSES)


def _unsupported(net: object, what: str) -> TypeError:
    cls = type(net)
    parents = [p for p in CHECKPOINT_CLASSES if isinstance(net, p)]
    if parents:
        why = (f"{cls.__name__} is a subclass of MONAI's {parents[0].__name__}, not {parents[0].__name__} itself: "
               "swapping its class would drop what the subclass changes")
    elif hasattr(net, "module") and isinstance(getattr(net, "module"), nn.Module):
        why = f"{cls.__name__} wraps the network: pass the wrapped network (net.module), or call it before wrapping"
    elif hasattr(net, "_orig_mod"):
        why = f"{cls.__name__} is a compiled network: call it on the network before torch.compile"
    else:
        why = f"{cls.__name__} is not one of them"
    return TypeError(
        f"{what} works on an instance of exactly one of MONAI's {_supported()}; {why}. To checkpoint chosen blocks "
        "of any network in place, use monai_ckpt.checkpoint_submodules(net) (MONAI's natural blocks), or "
        "checkpoint_submodules(net, names=[...]) / checkpoint_submodules(net, predicate=...)."
    )


def enable_checkpointing(net: nn.Module, policy: PolicySpec = "all") -> nn.Module:
    """Make an existing MONAI network checkpoint-aware, in place, with ``policy``.

    ``net`` becomes an instance of its monai_ckpt subclass (`CHECKPOINT_CLASSES`): the same object, with the same
    parameters, buffers and weights, so an optimizer built on it keeps working; from then on it is the drop-in
    subclass (``net.checkpoint_policy`` can be changed at any time, ``repr(net)`` shows it). On a network that is
    already checkpoint-aware it only sets the policy. `disable_checkpointing` undoes it.

    Args:
        net: an instance of exactly one of MONAI's ``UNet``, ``VNet``, ``DynUNet``, ``SegResNet``, ``SegResNetDS``,
            ``AttentionUnet``, ``SwinUNETR``, ``BasicUNet``, ``BasicUNetPlusPlus`` (or of a monai_ckpt network).
        policy: the checkpoint policy (see `monai_ckpt.policies`).

    Returns:
        ``net`` itself.

    Raises:
        TypeError: for any other module (a subclass of a supported class included): the message names
            `monai_ckpt.checkpoint_submodules`, which checkpoints chosen blocks of any network.
        ValueError: for a bad policy; ``net`` is then left as it was.

    Example::

        from monai.networks.nets import SegResNet
        from monai_ckpt import enable_checkpointing

        net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3)
        optimizer = torch.optim.Adam(net.parameters())
        enable_checkpointing(net, "all")      # same object and parameters: the optimizer still trains it
    """
    if isinstance(net, CheckpointPolicyMixin):
        if type(net) not in _PARENTS:
            raise _unsupported(net, "enable_checkpointing")
        net.checkpoint_policy = policy
        return net
    parent = type(net)
    child = CHECKPOINT_CLASSES.get(parent)
    if child is None:
        raise _unsupported(net, "enable_checkpointing")
    chosen = [name for name, m in net.named_modules() if "_monai_ckpt_mode" in m.__dict__]
    if chosen:
        raise ValueError(f"{parent.__name__} has submodules checkpointed by checkpoint_submodules ({chosen[:3]}"
                         f"{'...' if len(chosen) > 3 else ''}): undo them first, checkpoint_submodules(net, "
                         "names=..., mode=None), so that nothing is recomputed twice.")
    validate_policy(policy)
    net.__class__ = child
    try:
        net._init_checkpointing(policy)  # type: ignore[attr-defined]
    except BaseException:
        _restore(net, parent)
        raise
    return net


def disable_checkpointing(net: nn.Module) -> nn.Module:
    """Turn a network made checkpoint-aware by `enable_checkpointing` (or built as a monai_ckpt network) back into
    the exact MONAI class, in place: the same object, parameters and weights. On a supported MONAI network it does
    nothing.

    Args:
        net: a monai_ckpt network, or one of the MONAI networks `enable_checkpointing` takes.

    Returns:
        ``net`` itself, now an instance of its MONAI class (``type(net) is monai.networks.nets.UNet``...).

    Raises:
        TypeError: for any other module.

    Example::

        net = disable_checkpointing(net)      # e.g. before handing it to code that checks type(net)
    """
    if type(net) in CHECKPOINT_CLASSES:
        return net
    parent = _PARENTS.get(type(net))
    if parent is None:
        raise _unsupported(net, "disable_checkpointing")
    _restore(net, parent)
    return net


def _restore(net: nn.Module, parent: type[nn.Module]) -> None:
    """Give ``net`` back its MONAI class and remove what `_init_checkpointing` added (those of its attributes
    that exist)."""
    added = net.__dict__.get("_checkpoint_added", ())
    for name in (*_POLICY_ATTRIBUTES, *added):
        net.__dict__.pop(name, None)
    net.__class__ = parent
