"""Checkpoint-aware drop-in subclass of MONAI's DynUNet (the nnU-Net architecture)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from monai.networks.nets import DynUNet
from monai.utils import ensure_tuple_rep
from torch import nn
from torch.nn.functional import interpolate

from ..chain import ChainStep, run_chain, segment_steps
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin
from .inplace import activate

__all__ = ["CheckpointDynUNet"]


def _basic_first(b: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return activate(b.lrelu, b.norm1(b.conv1(x)))


def _basic_second(b: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return activate(b.lrelu, b.norm2(b.conv2(x)))


def _res_first(b: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return activate(b.lrelu, b.norm1(b.conv1(x))), x  # the input is carried to the residual add


def _res_second(b: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    out = b.norm2(b.conv2(x))
    if hasattr(b, "conv3"):
        residual = b.conv3(residual)
    if hasattr(b, "norm3"):
        residual = b.norm3(residual)
    return activate(b.lrelu, out, residual)  # out += residual; lrelu(out)


def conv_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``; a UnetBasicBlock or UnetResBlock through the functions above (its operators, in its order,
    the in-place ones on instance norm's base)."""
    if isinstance(block, UnetResBlock):
        return _res_second(block, *_res_first(block, x))
    if isinstance(block, UnetBasicBlock):
        return _basic_second(block, _basic_first(block, x))
    return block(x)


def _merge_then(up: nn.Module, first: Callable, x: torch.Tensor, skip: torch.Tensor):  # noqa: ANN202
    return first(torch.cat((up.transp_conv(x), skip), dim=1))


def _conv_blocks(block: nn.Module) -> list[dict]:
    """A UnetBasicBlock or UnetResBlock as two blocks (each conv with its norm and activation), exactly
    its op order; anything else as one block."""
    if isinstance(block, UnetResBlock):
        return [dict(fn=functools.partial(_res_first, block), extra=1),
                dict(fn=functools.partial(_res_second, block), pops=1)]
    if isinstance(block, UnetBasicBlock):
        return [dict(fn=functools.partial(_basic_first, block)), dict(fn=functools.partial(_basic_second, block))]
    return [dict(fn=block)]


def _up_blocks(up: nn.Module) -> list[dict]:
    """A UnetUpBlock: transposed conv + skip merge + the first conv of its block, then the rest."""
    first, *rest = _conv_blocks(up.conv_block)
    first = dict(first, fn=functools.partial(_merge_then, up, first["fn"]), pops=1 + first.get("pops", 0))
    return [first, *rest]


class CheckpointDynUNet(CheckpointPolicyMixin, DynUNet):
    """MONAI's `DynUNet` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys (including the
    duplicate ``skip_layers.*`` keys) as `monai.networks.nets.DynUNet`; outputs, gradients and normalisation
    statistics equal the parent's. With deep supervision, every supervision head is an output of its
    checkpoint and gets exactly the gradient it gets in the parent (not written into a list inside the
    checkpoint, where it would silently get none); ``self.heads`` is still filled as the parent does.
    In ``eval()``, without autograd or under TorchScript the forward is the parent's.

    Segments, in execution order: ``encoder0`` (``input_block``), ``encoder1``..``encoder{n}``
    (``downsamples``), ``bottleneck``, then from the bottom up ``decoder{i}`` (the up block that merges the
    level-i skip) each followed, with deep supervision, by its head ``head{i}`` (i = 1..deep_supr_num), and
    ``head0`` (``output_block``). Blocks: each conv of a basic/residual block with its norm and
    activation (the up block's first one with the transposed conv and the skip merge).

    The parent's arguments (spatial_dims, in_channels, out_channels, kernel_size, strides, upsample_kernel_size,
    filters, dropout, norm_name, act_name, deep_supervision, deep_supr_num, res_block, trans_bias) are those of
    `monai.networks.nets.DynUNet`, plus:

    Args:
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointDynUNet

        net = CheckpointDynUNet(3, 4, 3, kernel_size=[3] * 6, strides=[1, 2, 2, 2, 2, 2],
                                upsample_kernel_size=[2] * 5, deep_supervision=True, deep_supr_num=2,
                                checkpoint_policy="sqrt")
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Sequence[int] | int],
        strides: Sequence[Sequence[int] | int],
        upsample_kernel_size: Sequence[Sequence[int] | int],
        filters: Sequence[int] | None = None,
        dropout: tuple | str | float | None = None,
        norm_name: tuple | str = ("INSTANCE", {"affine": True}),
        act_name: tuple | str = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        res_block: bool = False,
        trans_bias: bool = False,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, out_channels, kernel_size, strides, upsample_kernel_size, filters, dropout,
            norm_name, act_name, deep_supervision, deep_supr_num, res_block, trans_bias,
        )  # fmt: skip
        self._init_checkpointing(checkpoint_policy)

    def _n_heads(self) -> int:
        return self.deep_supr_num if self.deep_supervision else 0

    def _chain_steps(self) -> list[ChainStep]:
        encoders = [self.input_block, *self.downsamples]
        steps = []
        for i, block in enumerate(encoders):
            blocks = _conv_blocks(block)
            blocks[-1]["push"] = True
            steps += segment_steps(f"encoder{i}", i, "encoder", *blocks)
        steps += segment_steps("bottleneck", len(encoders), "bottleneck", *_conv_blocks(self.bottleneck))
        ups = self.upsamples[::-1]  # ups[i] merges the skip of level i, as in DynUNet's skip layers
        for i in reversed(range(len(encoders))):
            steps += segment_steps(f"decoder{i}", i, "decoder", *_up_blocks(ups[i]))
            if 0 < i <= self._n_heads():
                steps += segment_steps(f"head{i}", i, "head", dict(fn=self.deep_supervision_heads[i - 1], emit=True))
        steps += segment_steps("head0", 0, "head", dict(fn=self.output_block))
        return steps

    def _level_sizes(self, n: int, d: int) -> list[int]:
        """Spatial size ``n`` along dimension ``d`` at each level, the input first: each strided conv gives
        floor((n + 2p - k) / s) + 1."""
        levels = [n]
        for k, s in zip(self.kernel_size, self.strides):
            k, s = ensure_tuple_rep(k, self.spatial_dims)[d], ensure_tuple_rep(s, self.spatial_dims)[d]
            p = (k - s + 1) // 2  # MONAI's get_padding, without numpy (Dynamo traces it)
            levels.append((levels[-1] + 2 * p - k) // s + 1)
        return levels

    def _accepts(self, sizes: tuple[int, ...]) -> bool:
        """Whether the parent can run this spatial size: each transposed conv gives s times its input, and every
        skip merge must line up."""
        strides = [ensure_tuple_rep(s, self.spatial_dims) for s in self.strides]
        for d, n in enumerate(sizes):
            levels = self._level_sizes(n, d)
            if min(levels) < 1:
                return False
            # the up block of level i upsamples level i+2 by strides[i+1] and merges level i+1
            for i in range(len(strides) - 1):
                if levels[i + 2] * strides[i + 1][d] != levels[i + 1]:
                    return False
        return True

    def _deepest_sizes(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple([self._level_sizes(n, d)[-1] for d, n in enumerate(sizes)])

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size should be a multiple of (the product of the strides)."""
        strides = [ensure_tuple_rep(s, self.spatial_dims) for s in self.strides]
        return tuple([math.prod([int(s[d]) for s in strides]) for d in range(self.spatial_dims)])


    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        out, emitted = run_chain(self._chain_steps(), self._checkpoint_groups, x)
        heads = emitted[::-1]  # emitted from the bottom up; the parent's list is top-down
        for i, head in enumerate(heads):
            self.heads[i] = head
        if self.deep_supervision:
            return torch.stack([out] + [interpolate(h, out.shape[2:]) for h in heads], dim=1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        # DynUNet.forward, verbatim (TorchScript cannot call super())
        out = self.skip_layers(x)
        out = self.output_block(out)
        if self.training and self.deep_supervision:
            out_all = [out]
            for feature_map in self.heads:
                out_all.append(interpolate(feature_map, out.shape[2:]))
            return torch.stack(out_all, dim=1)
        return out
