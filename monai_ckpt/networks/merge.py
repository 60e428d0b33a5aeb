"""A U-Net merge, ``conv(cat(parts))``, that keeps the parts for backward instead of their concatenation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["conv_of_concatenation"]


class _ConvOfConcatenation(torch.autograd.Function):
    """``conv(cat(parts))`` that keeps ``parts`` for backward instead of their concatenation, and concatenates them
    again there for the convolution's backward: the same operators with the same operands as autograd runs for
    ``cat`` then ``conv`` (bit-identical outputs and gradients), without keeping a tensor the size of all of them.
    Where the parts are kept anyway (a checkpoint's inputs, a skip that the encoder's next convolution keeps), the
    concatenation (at the top level of the benchmark UNet, 512 MiB) is not kept at all. Under autocast the
    convolution's operands are cast as autocast casts them, in forward and again in backward."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bias: torch.Tensor | None, dim: int, conv_args: tuple,
                conv: nn.Module, *parts: torch.Tensor) -> torch.Tensor:
        merged = torch.cat(parts, dim=dim)
        device = merged.device.type
        ctx.cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.dim, ctx.conv_args, ctx.has_bias, ctx.merged_dtype = dim, conv_args, bias is not None, merged.dtype
        ctx.save_for_backward(weight, *parts)
        return conv(merged)  # the module itself (its hooks run); ``weight`` and ``bias`` are its own

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        weight, *parts = ctx.saved_tensors
        merged, bias_sizes = torch.cat(parts, dim=ctx.dim), None
        if ctx.has_bias:
            bias_sizes = [weight.shape[1] * ctx.conv_args[-1] if ctx.conv_args[3] else weight.shape[0]]
        w = weight
        if ctx.cast is not None:
            merged, w = merged.to(ctx.cast), weight.to(ctx.cast)
        g_in, g_w, g_b = torch.ops.aten.convolution_backward(grad, merged, w, bias_sizes, *ctx.conv_args,
                                                             [True, True, ctx.has_bias])
        del merged
        g_parts = g_in.to(ctx.merged_dtype).split([p.shape[ctx.dim] for p in parts], dim=ctx.dim)
        return (g_w.to(weight.dtype), None if g_b is None else g_b.to(weight.dtype), None, None, None, *g_parts)


def _conv_args(conv: nn.Module) -> tuple | None:
    """``aten.convolution``'s arguments after input, weight and bias for a torch conv module that calls it
    directly (zero padding), else None."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    return (conv.stride, conv.padding, conv.dilation, transposed, conv.output_padding if transposed else
            (0,) * len(conv.stride), conv.groups)


def conv_of_concatenation(parts: Sequence[torch.Tensor], dim: int, conv: nn.Module) -> torch.Tensor:
    """``conv(torch.cat(parts, dim))``, the same operators, keeping ``parts`` rather than the concatenation for
    backward where ``conv`` is a torch convolution with zero padding and autograd records. Under torch.compile
    (its partitioner chooses what to keep itself) and for other modules: the plain expression."""
    conv_args = _conv_args(conv)
    if conv_args is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return conv(torch.cat(list(parts), dim=dim))
    return _ConvOfConcatenation.apply(conv.weight, conv.bias, dim, conv_args, conv, *parts)
