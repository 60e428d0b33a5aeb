"""Checkpoint-aware drop-in subclass of MONAI's SegResNetDS (Auto3DSeg's SegResNet, with deep supervision)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from monai.networks.nets import SegResNetDS
from monai.utils import UpsampleMode
from torch import nn

from ..chain import ChainStep, run_chain, segment_steps
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin
from .segresnet import _merge, _res_blocks

__all__ = ["CheckpointSegResNetDS"]


def _segres_blocks(layer: nn.Module) -> list[dict]:
    """A level's SegResBlocks (an Identity where the level has none) as `segresnet._res_blocks`."""
    return _res_blocks(layer if isinstance(layer, nn.Sequential) else (), ("act1", "act2"))


def _stem(net: SegResNetDS, x: torch.Tensor) -> torch.Tensor:
    """The optional preprocess, the parent's shape check (after it, as the parent) and ``conv_init``."""
    if net.preprocess is not None:
        x = net.preprocess(x)
    if not net.is_valid_shape(x):
        raise ValueError(f"Input spatial dims {x.shape} must be divisible by {net.shape_factor()}")
    return net.encoder.conv_init(x)


def _flat_merge(up: Callable, x: torch.Tensor) -> torch.Tensor:
    # no down-sampling at all: the parent adds a zero of shape (1,) in place of a skip
    return up(x) + torch.zeros(1, device=x.device, dtype=x.dtype)


class CheckpointSegResNetDS(CheckpointPolicyMixin, SegResNetDS):
    """MONAI's `SegResNetDS` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as
    `monai.networks.nets.SegResNetDS`; outputs, gradients and normalisation statistics equal the parent's. With
    deep supervision (``dsdepth`` > 1) the training output is the parent's list, top resolution first, and every
    head is an output of its checkpoint, so it gets exactly the parent's gradient. In ``eval()``, without autograd
    or under TorchScript the forward is the parent's.

    Segments, in execution order: ``encoder0`` (``preprocess`` if any, ``conv_init``, the level-0 blocks),
    ``encoder1``.. (the previous level's down-sampling convolution, then its blocks), ``bottleneck`` (the last
    level), ``decoder{i}`` from the bottom up (up-sampling + the level-i skip addition, then the blocks), each
    followed, with deep supervision, by its head ``head{i}`` (i = 1..dsdepth-1); ``head0`` (the top head). Blocks:
    each half of a SegResBlock (norm, activation, convolution; the second with the residual addition).

    The parent's arguments (spatial_dims, init_filters, in_channels, out_channels, act, norm, blocks_down,
    blocks_up, dsdepth, preprocess, upsample_mode, resolution) are those of `monai.networks.nets.SegResNetDS`, plus:

    Args:
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointSegResNetDS

        net = CheckpointSegResNetDS(spatial_dims=3, init_filters=32, in_channels=1, out_channels=2, dsdepth=4,
                                    resolution=(0.8, 0.8, 2.5), checkpoint_policy="sqrt")
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 32,
        in_channels: int = 1,
        out_channels: int = 2,
        act: tuple | str = "relu",
        norm: tuple | str = "batch",
        blocks_down: tuple = (1, 2, 2, 4),
        blocks_up: tuple | None = None,
        dsdepth: int = 1,
        preprocess: nn.Module | Callable | None = None,
        upsample_mode: UpsampleMode | str = "deconv",
        resolution: tuple | None = None,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(spatial_dims, init_filters, in_channels, out_channels, act, norm, blocks_down, blocks_up,
                         dsdepth, preprocess, upsample_mode, resolution)
        self._init_checkpointing(checkpoint_policy)

    def _has_head(self, j: int) -> bool:
        """Whether up layer ``j`` (bottom first) has a head the parent returns (its own test)."""
        return len(self.up_layers) - j <= self.dsdepth

    def _chain_steps(self) -> list[ChainStep]:
        layers = self.encoder.layers
        n = len(layers)
        steps = []
        for i, level in enumerate(layers):
            first = [dict(fn=functools.partial(_stem, self))] if i == 0 else [dict(fn=layers[i - 1]["downsample"])]
            blocks = first + _segres_blocks(level["blocks"])
            if i < n - 1:
                blocks[-1]["push"] = True
                steps += segment_steps(f"encoder{i}", i, "encoder", *blocks)
            else:  # its down-sampling is an Identity
                steps += segment_steps("bottleneck", i, "bottleneck", *blocks)
        for j, level in enumerate(self.up_layers):
            lvl = n - 2 - j
            merge = (dict(fn=functools.partial(_merge, level["upsample"]), pops=1) if n > 1
                     else dict(fn=functools.partial(_flat_merge, level["upsample"])))
            steps += segment_steps(f"decoder{max(lvl, 0)}", max(lvl, 0), "decoder",
                                   merge, *_segres_blocks(level["blocks"]))
            if self._has_head(j) and j < len(self.up_layers) - 1:
                steps += segment_steps(f"head{lvl}", lvl, "head", dict(fn=level["head"], emit=True))
        steps += segment_steps("head0", 0, "head", dict(fn=self.up_layers[-1]["head"]))
        return steps

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial size must be a multiple of: the parent's ``shape_factor()`` (the product of the
        down-sampling scales, per dimension)."""
        if self.anisotropic_scales is None:
            return (2 ** (len(self.blocks_down) - 1),) * self.spatial_dims
        scales = self.anisotropic_scales[:-1]
        return tuple([math.prod([int(s[d]) for s in scales]) for d in range(self.spatial_dims)])

    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out, heads = run_chain(self._chain_steps(), self._checkpoint_groups, x)
        if not heads:
            return out
        return [out, *heads[::-1]]  # the parent's order: top resolution first

    def forward(self, x: torch.Tensor) -> None | torch.Tensor | list[torch.Tensor]:
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            if self.preprocess is None:  # with one, the stem checks the preprocessed input, as the parent does
                self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        return self._forward(x)
