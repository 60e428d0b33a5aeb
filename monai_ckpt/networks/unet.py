"""Checkpoint-aware drop-in subclass of MONAI's UNet."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Act, Norm
from monai.networks.nets import UNet
from monai.utils import ensure_tuple_rep
from torch import nn

from ..chain import ChainStep, segment_steps
from ..checkpoint import recomputed_by_cheap
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin
from .merge import conv_of_concatenation

__all__ = ["CheckpointUNet"]


def _residual_first(residual: nn.Module, unit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # ResidualUnit computes the residual branch first. Its conv output only meets the final addition, whose
    # backward needs neither input: a "cheap" checkpoint recomputes it rather than keep it.
    with recomputed_by_cheap():
        res = residual(x)
    return unit(x), res


def _residual_last(unit: nn.Module, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    return unit(x) + res


def _path_blocks(module: nn.Module) -> list[dict]:
    """A down path or bottleneck as blocks: a ResidualUnit's subunits one by one (its residual branch
    carried from the first to the last), anything else as one block."""
    if isinstance(module, ResidualUnit) and len(module.conv) > 1:
        units = list(module.conv)
        return [
            dict(fn=functools.partial(_residual_first, module.residual, units[0]), extra=1),
            *[dict(fn=unit) for unit in units[1:-1]],
            dict(fn=functools.partial(_residual_last, units[-1]), pops=1),
        ]
    return [dict(fn=module)]


def _join(skip_connection: nn.Module, up: nn.Module, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``up(SkipConnection(...)(skip))`` given the sub-network output ``y``: the same ops as MONAI's (a
    concatenation followed by a conv module keeps the parts, not the concatenation: `conv_of_concatenation`)."""
    if skip_connection.mode == "cat":
        return conv_of_concatenation([skip, y], skip_connection.dim, up)
    if skip_connection.mode == "add":
        merged = torch.add(skip, y)
    else:
        merged = torch.mul(skip, y)
    return up(merged)


class CheckpointUNet(CheckpointPolicyMixin, UNet):
    """MONAI's `UNet` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, same modules, parameter names and state_dict keys as
    `monai.networks.nets.UNet`, so weights load both ways; outputs, gradients and BatchNorm statistics
    equal the parent's. In ``eval()`` mode, without autograd or under TorchScript the forward is the
    parent's forward. Segments, in execution order: ``encoder0`` .. ``encoder{n-2}`` (the down path of each
    level), ``bottleneck``, ``decoder{n-2}`` .. ``decoder0`` (skip merge + up path of each level). Their
    blocks: a residual unit's subunits; in a decoder, merge + (transposed) conv, its norm/activation, and
    the residual unit.

    The parent's arguments (spatial_dims, in_channels, out_channels, channels, strides, kernel_size, up_kernel_size,
    num_res_units, act, norm, dropout, bias, adn_ordering) are those of `monai.networks.nets.UNet`, plus:

    Args:
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`.
            Defaults to ``"all"``; can be changed at any time through the attribute of the same name.

    Examples::

        from monai_ckpt import CheckpointUNet

        net = CheckpointUNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                             num_res_units=2, checkpoint_policy="all")
        net.load_state_dict(plain_unet.state_dict())  # plain MONAI UNet weights load as they are
        net.checkpoint_policy = "cheap"
        [s.name for s in net.checkpoint_segments()]   # ['encoder0', ..., 'bottleneck', ..., 'decoder0']
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        kernel_size: Sequence[int] | int = 3,
        up_kernel_size: Sequence[int] | int = 3,
        num_res_units: int = 0,
        act: tuple | str = Act.PRELU,
        norm: tuple | str = Norm.INSTANCE,
        dropout: float = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, out_channels, channels, strides, kernel_size, up_kernel_size,
            num_res_units, act, norm, dropout, bias, adn_ordering,
        )  # fmt: skip
        self._init_checkpointing(checkpoint_policy)

    def _levels(self) -> list[nn.Sequential]:
        levels = [self.model]
        for _ in range(len(self.channels) - 2):
            levels.append(levels[-1][1].submodule)
        return levels

    def _chain_steps(self) -> list[ChainStep]:
        levels = self._levels()
        steps = []
        for i, level in enumerate(levels):
            blocks = _path_blocks(level[0])
            blocks[-1]["push"] = True  # the encoder output is the skip of its level
            steps += segment_steps(f"encoder{i}", i, "encoder", *blocks)
        steps += segment_steps("bottleneck", len(levels), "bottleneck", *_path_blocks(levels[-1][1].submodule))
        for i in reversed(range(len(levels))):
            up = levels[i][2]
            conv, rest = (up, []) if isinstance(up, Convolution) else (up[0], list(up)[1:])
            # the merge and the (transposed) conv, then its norm/dropout/activation, then the residual unit
            blocks = [dict(fn=functools.partial(_join, levels[i][1], conv.conv), pops=1)]
            if hasattr(conv, "adn"):
                blocks.append(dict(fn=conv.adn))
            for module in rest:
                blocks += _path_blocks(module)
            steps += segment_steps(f"decoder{i}", i, "decoder", *blocks)
        return steps

    def _per_dim_strides(self) -> list[tuple[int, ...]]:
        return [tuple([int(s) for s in ensure_tuple_rep(st, self.dimensions)]) for st in self.strides[: len(self.channels) - 1]]

    def _accepts(self, sizes: tuple[int, ...]) -> bool:
        """Whether the parent can run this spatial size: a strided conv gives ceil(n / s) and its transposed
        conv s * that, so every level below the top must divide by its stride for the skip merge to line up
        (the top level has no merge at input resolution; an odd top size only changes the output size)."""
        for d, n in enumerate(sizes):
            for level, strides in enumerate(self._per_dim_strides()):
                if level > 0 and n % strides[d]:
                    return False
                n = -(-n // strides[d])
        return True

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size should be a multiple of (the product of the strides)."""
        per_dim = self._per_dim_strides()
        return tuple([math.prod([s[d] for s in per_dim]) for d in range(self.dimensions)])


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        return self.model(x)
