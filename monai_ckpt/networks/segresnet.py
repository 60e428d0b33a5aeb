"""Checkpoint-aware drop-in subclass of MONAI's SegResNet (Auto3DSeg's default network family)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from monai.networks.nets import SegResNet
from monai.utils import UpsampleMode
from torch import nn

from ..chain import ChainStep, segment_steps
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin
from .inplace import activate

__all__ = ["CheckpointSegResNet"]


def _res_first(norm: nn.Module, act: nn.Module, conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return conv(activate(act, norm(x))), x  # the input is carried to the residual add


def _res_second(norm: nn.Module, act: nn.Module, conv: nn.Module, x: torch.Tensor,
                identity: torch.Tensor) -> torch.Tensor:
    # out of place (the parent adds in place): a "cheap" checkpoint keeps the conv output, which must not change
    return conv(activate(act, norm(x))) + identity


def _res_blocks(layer: Iterable[nn.Module], acts: tuple[str, str] = ("act", "act")) -> list[dict]:
    """The residual blocks of a layer (SegResNet's ResBlock; SegResNetDS's SegResBlock, whose activations are
    ``act1``/``act2``), each as two blocks (norm, activation, conv), exactly its op order."""
    out = []
    for b in layer:
        first, second = (getattr(b, a) for a in acts)
        out += [dict(fn=functools.partial(_res_first, b.norm1, first, b.conv1), extra=1),
                dict(fn=functools.partial(_res_second, b.norm2, second, b.conv2), pops=1)]
    return out


def _stem(net: SegResNet, x: torch.Tensor) -> torch.Tensor:
    x = net.convInit(x)
    return net.dropout(x) if net.dropout_prob is not None else x


def _final(final: nn.Module, x: torch.Tensor) -> torch.Tensor:
    norm, act, conv = final  # SegResNet._make_final_conv
    return conv(activate(act, norm(x)))


def _merge(up: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return up(x) + skip


class CheckpointSegResNet(CheckpointPolicyMixin, SegResNet):
    """MONAI's `SegResNet` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as
    `monai.networks.nets.SegResNet`; outputs, gradients and normalisation statistics equal the parent's, dropout
    mask included. In ``eval()``, without autograd or under TorchScript the forward is the parent's.

    Segments, in execution order: ``encoder0`` (``convInit`` with its dropout, then ``down_layers[0]``),
    ``encoder1``.. (``down_layers[i]``: its stride-2 convolution, then its ResBlocks), ``bottleneck`` (the last
    down layer), ``decoder{i}`` from the bottom up (``up_samples`` + the level-i skip addition, then
    ``up_layers``), ``head0`` (``conv_final``, when ``use_conv_final``). Blocks: each half of a ResBlock
    (norm, activation, convolution; the second with the residual addition).

    The parent's arguments (spatial_dims, init_filters, in_channels, out_channels, dropout_prob, act, norm,
    norm_name, num_groups, use_conv_final, blocks_down, blocks_up, upsample_mode) are those of
    `monai.networks.nets.SegResNet`, plus:

    Args:
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointSegResNet

        net = CheckpointSegResNet(spatial_dims=3, init_filters=16, in_channels=4, out_channels=3,
                                  blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), checkpoint_policy="sqrt")
        net.load_state_dict(plain_segresnet.state_dict())
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 8,
        in_channels: int = 1,
        out_channels: int = 2,
        dropout_prob: float | None = None,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        norm_name: str = "",
        num_groups: int = 8,
        use_conv_final: bool = True,
        blocks_down: tuple = (1, 2, 2, 4),
        blocks_up: tuple = (1, 1, 1),
        upsample_mode: UpsampleMode | str = UpsampleMode.NONTRAINABLE,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(
            spatial_dims, init_filters, in_channels, out_channels, dropout_prob, act, norm, norm_name, num_groups,
            use_conv_final, blocks_down, blocks_up, upsample_mode,
        )  # fmt: skip
        self._init_checkpointing(checkpoint_policy)

    def _chain_steps(self) -> list[ChainStep]:
        n = len(self.down_layers)
        steps = []
        for i, layer in enumerate(self.down_layers):
            pre, *_ = layer
            first = [dict(fn=functools.partial(_stem, self))] if i == 0 else [dict(fn=pre)]
            blocks = first + _res_blocks(layer[1:])
            if i < n - 1:
                blocks[-1]["push"] = True
                steps += segment_steps(f"encoder{i}", i, "encoder", *blocks)
            else:
                steps += segment_steps("bottleneck", i, "bottleneck", *blocks)
        for j, (up, layer) in enumerate(zip(self.up_samples, self.up_layers)):
            level = n - 2 - j
            blocks = [dict(fn=functools.partial(_merge, up), pops=1)] + _res_blocks(layer)
            steps += segment_steps(f"decoder{level}", level, "decoder", *blocks)
        if self.use_conv_final:
            steps += segment_steps("head0", 0, "head", dict(fn=functools.partial(_final, self.conv_final)))
        return steps

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size must be a multiple of: each down layer halves (stride-2 convolution,
        rounding up) and each up sample doubles, so every skip addition lines up only on exact multiples."""
        return (2 ** (len(self.blocks_down) - 1),) * self.spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        # SegResNet.forward, verbatim (TorchScript cannot call super())
        x, down_x = self.encode(x)
        down_x.reverse()

        x = self.decode(x, down_x)
        return x
