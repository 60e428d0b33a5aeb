"""Checkpoint-aware drop-in subclass of MONAI's AttentionUnet."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import AttentionUnet
from monai.utils import ensure_tuple_rep
from torch import nn

from ..chain import ChainStep, segment_steps
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin
from .merge import conv_of_concatenation

__all__ = ["CheckpointAttentionUnet"]


def _conv_block(block: nn.Module) -> list[dict]:
    """A ConvBlock as its two Convolutions (conv, norm, activation, dropout each)."""
    return [dict(fn=conv) for conv in block.conv]


class _GatedProduct(torch.autograd.Function):
    """``x * gate``, ``gate`` broadcast over ``x`` (an attention gate's one channel), with the operators autograd runs
    for it in backward in another order: the gate's gradient (``grad * x`` summed to the gate's shape) is made and
    reduced before ``x``'s (``grad * gate``), so the two ``x``-sized products are never alive together. Bit-identical
    outputs and gradients; one skip-sized tensor less at the gate's backward (at 128^3, 128 MiB)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        return x * gate

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, gate = ctx.saved_tensors
        grad_gate = (grad * x).sum_to_size(gate.shape) if ctx.needs_input_grad[1] else None
        return (grad * gate if ctx.needs_input_grad[0] else None), grad_gate


def _attention(block: nn.Module, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """AttentionBlock.forward with its last product as `_GatedProduct` (the plain product under torch.compile,
    whose partitioner orders the backward itself)."""
    psi = block.psi(block.relu(block.W_g(g) + block.W_x(x)))
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return x * psi
    return _GatedProduct.apply(x, psi)


def _gate(layer: nn.Module, fromlower: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionLayer.forward's attention gate on the skip; the up-convolved tensor goes on to the merge."""
    return fromlower, _attention(layer.attention, fromlower, skip)


def _merge_conv(layer: nn.Module, fromlower: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """The merge's concatenation and convolution (``layer.merge`` is a monai Convolution: conv, then ADN), keeping
    the gated skip and the up-convolved tensor rather than their concatenation."""
    return conv_of_concatenation((att, fromlower), 1, layer.merge.conv)


def _decoder_blocks(layer: nn.Module) -> list[dict]:
    """AttentionLayer.forward after its submodule, as four blocks: up-convolution, attention gate on the skip,
    the merge's concatenation and convolution, its norm/dropout/activation."""
    return [dict(fn=layer.upconv), dict(fn=functools.partial(_gate, layer), pops=1, extra=1),
            dict(fn=functools.partial(_merge_conv, layer), pops=1), dict(fn=layer.merge.adn)]


class CheckpointAttentionUnet(CheckpointPolicyMixin, AttentionUnet):
    """MONAI's `AttentionUnet` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as
    `monai.networks.nets.AttentionUnet`; outputs, gradients and BatchNorm statistics equal the parent's, dropout
    masks included. In ``eval()``, without autograd or under TorchScript the forward is the parent's.

    Segments, in execution order: ``encoder0`` (the head ConvBlock), ``encoder1``.. (each AttentionLayer's
    strided ConvBlock), ``bottleneck`` (the bottom ConvBlock), ``decoder{i}`` from the bottom up (up-convolution,
    attention gate on the level-i skip, merge), ``head0`` (the 1x1 reduction). Blocks: each Convolution of a
    ConvBlock; a decoder's up-convolution, attention gate, merge convolution (with the concatenation) and
    merge norm/activation.

    Args:
        spatial_dims, in_channels, out_channels, channels, strides, kernel_size, up_kernel_size, dropout: as for
            `monai.networks.nets.AttentionUnet`.
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointAttentionUnet

        net = CheckpointAttentionUnet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128),
                                      strides=(2, 2, 2), checkpoint_policy="sqrt")
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
        dropout: float = 0.0,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, kernel_size, up_kernel_size,
                         dropout)
        self._init_checkpointing(checkpoint_policy)

    def _layers(self) -> list[nn.Module]:
        """The AttentionLayers, top first."""
        layers, layer = [], self.model[1]
        while True:
            layers.append(layer)
            if not isinstance(layer.submodule, nn.Sequential):
                return layers
            layer = layer.submodule[1]

    def _chain_steps(self) -> list[ChainStep]:
        layers = self._layers()
        head = _conv_block(self.model[0])
        head[-1]["push"] = True
        steps = segment_steps("encoder0", 0, "encoder", *head)
        for i, layer in enumerate(layers[:-1], start=1):
            blocks = _conv_block(layer.submodule[0])
            blocks[-1]["push"] = True
            steps += segment_steps(f"encoder{i}", i, "encoder", *blocks)
        steps += segment_steps("bottleneck", len(layers), "bottleneck", *_conv_block(layers[-1].submodule))
        for i in reversed(range(len(layers))):
            steps += segment_steps(f"decoder{i}", i, "decoder", *_decoder_blocks(layers[i]))
        steps += segment_steps("head0", 0, "head", dict(fn=self.model[2]))
        return steps

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size must be a multiple of: the product of the strides (each strided
        convolution rounds up, each up-convolution multiplies, and every attention gate must line up)."""
        strides = [ensure_tuple_rep(s, self.dimensions) for s in self.strides[: len(self.channels) - 1]]
        # lists, not generators: the input check runs this, and Dynamo traces lists (torch.compile, fullgraph)
        return tuple([math.prod([int(s[d]) for s in strides]) for d in range(self.dimensions)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        # AttentionUnet.forward, verbatim (TorchScript cannot call super())
        x_m: torch.Tensor = self.model(x)
        return x_m
