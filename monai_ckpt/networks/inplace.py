"""In-place operations on instance norm's output without autograd's CopySlices copies.

Instance norm returns batch norm's output reshaped: a view. An in-place operation on a view (MONAI's in-place
activations, ``out += residual`` in a residual block) makes autograd take its backward through the view's base
(CopySlices: a new tensor of the base's size and a clone of it, two more tensors of that size alive at once; at the
top level of a network, its peak). Running the operation on the base and viewing the result back gives the same
values and gradients without them.

A tensor subclass (MONAI's ``MetaTensor``, what MONAI's data pipelines hand the network) keeps its type and its
metadata: ``Tensor._base`` is the plain tensor the subclass's operator made, so the base is taken as the view's type,
with the view's attributes, as the parent's operators would have kept them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["activate", "adn", "viewed_base"]


def viewed_base(y: torch.Tensor) -> torch.Tensor | None:
    """``y``'s base where ``y`` views all of it, both contiguous (instance norm's output), else None. Under
    torch.compile, None: compiled, autograd runs no CopySlices."""
    if torch.compiler.is_compiling():
        return None
    base = y._base
    if base is None or base.numel() != y.numel() or not (y.is_contiguous() and base.is_contiguous()):
        return None
    if type(base) is torch.Tensor and type(y) is not torch.Tensor:
        return _as_type_of(y, base)
    return base


def _as_type_of(y: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` (a plain tensor) as ``y``'s tensor subclass with ``y``'s attributes (a MetaTensor's metadata, shared
    as MONAI's own operators share it within a batch): the same tensor and autograd history, so an in-place operation
    on it is one on the base, and what is computed from it has the type and metadata the parent's forward gives."""
    typed = base.as_subclass(type(y))
    typed.__dict__.update(y.__dict__)
    return typed


def activate(act: nn.Module, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``y += residual`` (when given), then ``act(y)``, as MONAI's blocks write them; the in-place steps run on
    ``y``'s base where ``y`` is a view of all of it (an in-place activation is elementwise: the base's shape is as
    good as ``y``'s)."""
    inplace = getattr(act, "inplace", False)
    base = viewed_base(y) if inplace or residual is not None else None
    if base is None:
        if residual is not None:
            y += residual
        return act(y)
    if residual is not None:
        base += residual.reshape(base.shape)
    return act(base).view(y.shape) if inplace else act(base.view(y.shape))


def adn(block: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """MONAI's ADN block (its modules, in its order) on ``y``, its activation through `activate`."""
    for name, module in block.named_children():
        y = activate(module, y) if name == "A" else module(y)
    return y
