"""Checkpoint-aware drop-in subclasses of nnU-Net's networks: ``dynamic_network_architectures``' `PlainConvUNet`
(nnU-Net's default plans) and `ResidualEncoderUNet` (the ResEnc M/L/XL presets).

They run on the same chain executor as the MONAI networks (`monai_ckpt.chain`): one chain step per
``ConvDropoutNormReLU`` (a residual block as two steps, its input carried to the addition; a decoder stage's first
step with its transposed convolution and the skip merge), segments ``encoder{s}``, ``bottleneck``, ``decoder{s}``
and ``head{s}`` by resolution stage. Nothing is added, renamed or wrapped: state_dict keys (with nnU-Net's duplicate
``conv``/``all_modules.0`` and ``decoder.encoder.*`` keys) and parameter names are the parent's, so nnU-Net
checkpoints load both ways.
"""

from __future__ import annotations

import contextlib
import functools
import math
import pydoc
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn

from ..chain import ChainStep, run_chain, segment_steps
from ..checkpoint import recomputed_by_cheap
from ..networks.base import CheckpointPolicyMixin
from ..networks.inplace import activate
from ..networks.merge import conv_of_concatenation
from ..policies import PolicySpec

__all__ = ["CheckpointPlainConvUNet", "CheckpointResidualEncoderUNet"]

# A convolution that reads at most a quarter as many channels as it writes (the stem, from the image's modalities)
# costs at most a quarter of a same-width one to rerun: "cheap" recomputes it rather than keep its output.
_THIN = 4


def _overwrites_conv_output(block: ConvDropoutNormReLU) -> bool:
    """Whether an in-place module (an activation with ``nonlin_first`` or without norm, an in-place dropout) writes
    into the convolution's output, which a "cheap" checkpoint keeps (torch refuses a kept tensor that changed)."""
    for module in list(block.all_modules)[1:]:
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0 and not module.inplace:
            continue  # returns its input
        return bool(getattr(module, "inplace", False))
    return False


def _conv_norm_act(block: ConvDropoutNormReLU, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``block(x)``: its ``all_modules`` in their order (conv, dropout, norm, nonlin, or nonlin before norm), the
    activation through `activate` (in place on instance norm's base); of a tuple, the convolution of its
    concatenation along the channels, keeping the parts for backward (`conv_of_concatenation`)."""
    conv, *rest = block.all_modules
    concatenated = not isinstance(x, torch.Tensor)
    thin = not concatenated and conv.in_channels * _THIN <= conv.out_channels
    with recomputed_by_cheap() if thin or _overwrites_conv_output(block) else contextlib.nullcontext():
        y = conv_of_concatenation(x, 1, conv) if concatenated else conv(x)
    nonlin = getattr(block, "nonlin", None)
    for module in rest:
        y = activate(module, y) if module is nonlin else module(y)
    return y


def _up_and_merge(transpconv: nn.Module, first: ConvDropoutNormReLU, x: torch.Tensor,
                  skip: torch.Tensor) -> torch.Tensor:
    """A decoder stage up to its first convolution: ``first(cat((transpconv(x), skip), 1))``."""
    # a transposed convolution with kernel = stride reads each input once per output: "cheap" reruns it
    with recomputed_by_cheap():
        up = transpconv(x)
    return _conv_norm_act(first, (up, skip))


def _residual_first(b: BasicBlockD | BottleneckD, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual block's skip (average pooling and 1x1 projection, or the identity), computed first as the parent
    does (the block's input then collects its gradients in the parent's order), and its first convolution."""
    residual = b.skip(x)
    return _conv_norm_act(b.conv1, x), residual


def _residual_middle(conv: ConvDropoutNormReLU, x: torch.Tensor,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _conv_norm_act(conv, x), residual


def _residual_last(b: BasicBlockD | BottleneckD, last: ConvDropoutNormReLU, nonlin: Any, x: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor:
    """The rest of BasicBlockD/BottleneckD.forward: the last convolution, stochastic depth, squeeze-excitation,
    ``out += residual`` and the activation."""
    out = _conv_norm_act(last, x)
    if b.apply_stochastic_depth:
        out = b.drop_path(out)
    if b.apply_se:
        out = b.squeeze_excitation(out)
    return activate(nonlin, out, residual)


def _residual_blocks(b: nn.Module) -> list[dict]:
    """A BasicBlockD (two convolutions) or BottleneckD (three) as one step per convolution, the residual carried
    from the first to the last, where it is added."""
    convs = [b.conv1, b.conv2] + ([b.conv3] if isinstance(b, BottleneckD) else [])
    nonlin = b.nonlin3 if isinstance(b, BottleneckD) else b.nonlin2
    steps = [dict(fn=functools.partial(_residual_first, b), extra=1)]
    steps += [dict(fn=functools.partial(_residual_middle, conv), pops=1, extra=1) for conv in convs[1:-1]]
    return steps + [dict(fn=functools.partial(_residual_last, b, convs[-1], nonlin), pops=1)]


def _blocks(module: nn.Module) -> list[dict]:
    """The chain blocks of an encoder stage (or the stem), exactly its op order: each convolution with its norm and
    activation, each residual block as `_residual_blocks`; anything else (a pooling) as one block."""
    if isinstance(module, ConvDropoutNormReLU):
        return [dict(fn=functools.partial(_conv_norm_act, module))]
    if isinstance(module, StackedConvBlocks):
        return [b for conv in module.convs for b in _blocks(conv)]
    if isinstance(module, StackedResidualBlocks):
        return [b for block in module.blocks for b in _blocks(block)]
    if isinstance(module, (BasicBlockD, BottleneckD)):
        return _residual_blocks(module)
    if isinstance(module, nn.Sequential):
        return [b for child in module for b in _blocks(child)]
    return [dict(fn=module)]


class _UNetChain(CheckpointPolicyMixin):
    """The chain, size rule and forward the two nnU-Net networks share (encoder stages with skips, UNetDecoder)."""

    def _stem_blocks(self) -> list[dict]:
        return []

    def _chain_steps(self) -> list[ChainStep]:
        encoder, decoder = self.encoder, self.decoder  # type: ignore[attr-defined]
        n = len(encoder.stages)
        steps = []
        for s, stage in enumerate(encoder.stages):
            blocks = (self._stem_blocks() if s == 0 else []) + _blocks(stage)
            if s < n - 1:
                blocks[-1] = dict(blocks[-1], push=True)
                steps += segment_steps(f"encoder{s}", s, "encoder", *blocks)
            else:
                steps += segment_steps("bottleneck", s, "bottleneck", *blocks)
        for j, (up, stage) in enumerate(zip(decoder.transpconvs, decoder.stages)):
            level = n - 2 - j
            first, *rest = stage.convs
            blocks = [dict(fn=functools.partial(_up_and_merge, up, first), pops=1)]
            blocks += [b for conv in rest for b in _blocks(conv)]
            steps += segment_steps(f"decoder{level}", level, "decoder", *blocks)
            if decoder.deep_supervision and level > 0:
                steps += segment_steps(f"head{level}", level, "head", dict(fn=decoder.seg_layers[j], emit=True))
        steps += segment_steps("head0", 0, "head", dict(fn=decoder.seg_layers[-1]))
        return steps

    @property
    def checkpoint_policy(self) -> PolicySpec:
        """The checkpoint policy spec (see `monai_ckpt.policies`); assign a new one at any time. Its groups follow
        ``decoder.deep_supervision`` (nnU-Net switches it off for validation and on again)."""
        return self._checkpoint_spec

    @checkpoint_policy.setter
    def checkpoint_policy(self, spec: PolicySpec) -> None:
        CheckpointPolicyMixin.checkpoint_policy.fset(self, spec)  # type: ignore[attr-defined]
        nn.Module.__setattr__(self, "_groups_deep_supervision", bool(self.decoder.deep_supervision))

    @torch.jit.unused
    def _checkpointing(self, x: torch.Tensor) -> bool:
        if bool(self.decoder.deep_supervision) != self._groups_deep_supervision:
            self.checkpoint_policy = self._checkpoint_spec  # the heads changed: resolve the policy again
        return super()._checkpointing(x)

    def _kernels_and_strides(self, d: int) -> list[tuple[int, int]]:
        encoder = self.encoder  # type: ignore[attr-defined]
        kernels = [k if isinstance(k, int) else k[d] for k in encoder.kernel_sizes]
        return [(int(k), int(s[d])) for k, s in zip(kernels, encoder.strides)]

    def _stage_sizes(self, n: int, d: int) -> list[int]:
        """Spatial size ``n`` along dimension ``d`` after each stage: a strided convolution with padding
        (k - 1) // 2 gives (n + 2 * ((k - 1) // 2) - k) // s + 1."""
        sizes = []
        for k, s in self._kernels_and_strides(d):
            n = (n + 2 * ((k - 1) // 2) - k) // s + 1
            sizes.append(n)
        return sizes

    def _accepts(self, sizes: tuple[int, ...]) -> bool:
        """Whether the parent can run this spatial size: each transposed convolution gives its stride times its input,
        and every skip it is concatenated with must be that size (a residual stage's average-pooled skip, too)."""
        for d, n in enumerate(sizes):
            levels = [n, *self._stage_sizes(n, d)]
            if min(levels) < 1:
                return False
            for s, (_, stride) in enumerate(self._kernels_and_strides(d)):
                if stride > 1 and self._pools_skip() and levels[s] // stride != levels[s + 1]:
                    return False
                if s > 0 and levels[s + 1] * stride != levels[s]:
                    return False
        return True

    def _pools_skip(self) -> bool:
        return False

    def _deepest_sizes(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple([self._stage_sizes(n, d)[-1] for d, n in enumerate(sizes)])

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size should be a multiple of (the product of the stages' strides)."""
        return tuple([math.prod([s for _, s in self._kernels_and_strides(d)]) for d in range(self.spatial_dims)])

    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out, heads = run_chain(self._chain_steps(), self._checkpoint_groups, x)
        if self.decoder.deep_supervision:  # type: ignore[attr-defined]
            return [out, *heads[::-1]]  # the parent's list: the full resolution first
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.training and torch.is_grad_enabled() and len(self.decoder.stages):  # type: ignore[attr-defined]
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        return super().forward(x)  # type: ignore[misc]


class CheckpointPlainConvUNet(_UNetChain, PlainConvUNet):
    """nnU-Net's `PlainConvUNet` (``dynamic_network_architectures``; what ``nnUNetPlans`` trains) with gradient
    checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as the parent; outputs
    (with deep supervision: the parent's list of heads, each an output of its checkpoint that gets the parent's
    gradient), gradients and norm statistics equal the parent's, dropout included. Outside training with autograd
    the forward is the parent's.

    Segments, in execution order: ``encoder0``..``encoder{n-2}`` (``encoder.stages[s]``), ``bottleneck`` (the last
    stage), then from the bottom up ``decoder{s}`` (the decoder stage whose transposed convolution comes back to
    stage s and merges its skip), each followed with deep supervision by ``head{s}`` (s >= 1), and ``head0`` (the
    last segmentation layer). Blocks: each ``ConvDropoutNormReLU`` (a decoder stage's first one with the transposed
    convolution and the concatenation).

    Args:
        input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
        num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
        nonlin, nonlin_kwargs, deep_supervision, nonlin_first: as for
        `dynamic_network_architectures.architectures.unet.PlainConvUNet`.
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from torch import nn
        from monai_ckpt.nnunet import CheckpointPlainConvUNet

        net = CheckpointPlainConvUNet(1, 5, (32, 64, 128, 256, 320), nn.Conv3d, 3, (1, 2, 2, 2, 2), 2, 3, 2,
                                      conv_bias=True, norm_op=nn.InstanceNorm3d,
                                      norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                                      nonlin_kwargs={"inplace": True}, deep_supervision=True,
                                      checkpoint_policy="all")
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: int | list[int] | tuple[int, ...],
        conv_op: type[nn.modules.conv._ConvNd],
        kernel_sizes: int | list[int] | tuple[int, ...],
        strides: int | list[int] | tuple[int, ...],
        n_conv_per_stage: int | list[int] | tuple[int, ...],
        num_classes: int,
        n_conv_per_stage_decoder: int | tuple[int, ...] | list[int],
        conv_bias: bool = False,
        norm_op: None | type[nn.Module] = None,
        norm_op_kwargs: dict | None = None,
        dropout_op: None | type[nn.modules.dropout._DropoutNd] = None,
        dropout_op_kwargs: dict | None = None,
        nonlin: None | type[nn.Module] = None,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
        nonlin_first: bool = False,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(
            input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
            num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
            nonlin, nonlin_kwargs, deep_supervision, nonlin_first,
        )  # fmt: skip
        self.in_channels = input_channels
        self.spatial_dims = convert_conv_op_to_dim(conv_op)
        self.checkpoint_policy = checkpoint_policy


class CheckpointResidualEncoderUNet(_UNetChain, ResidualEncoderUNet):
    """nnU-Net's `ResidualEncoderUNet` (``dynamic_network_architectures``; the ResEnc M/L/XL presets) with gradient
    checkpointing driven by a segment policy.

    A drop-in replacement, as `CheckpointPlainConvUNet`. Segments as there; ``encoder0`` begins with the stem.
    Blocks: the stem's convolution, each convolution of a residual block (the block's input carried to its last
    one, where the skip, the addition and the activation run), each decoder convolution (the first with the
    transposed convolution and the concatenation).

    Args:
        input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_blocks_per_stage,
        num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
        nonlin, nonlin_kwargs, deep_supervision, block, bottleneck_channels, stem_channels: as for
        `dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`.
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from torch import nn
        from monai_ckpt.nnunet import CheckpointResidualEncoderUNet

        # nnUNetPlannerResEncL's 3d_fullres network for an abdominal CT (160x224x192 patch)
        net = CheckpointResidualEncoderUNet(
            1, 6, (32, 64, 128, 256, 320, 320), nn.Conv3d, 3, (1, 2, 2, 2, 2, (1, 2, 2)), (1, 3, 4, 6, 6, 6), 3,
            (1, 1, 1, 1, 1), conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True, checkpoint_policy="all")
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: int | list[int] | tuple[int, ...],
        conv_op: type[nn.modules.conv._ConvNd],
        kernel_sizes: int | list[int] | tuple[int, ...],
        strides: int | list[int] | tuple[int, ...],
        n_blocks_per_stage: int | list[int] | tuple[int, ...],
        num_classes: int,
        n_conv_per_stage_decoder: int | tuple[int, ...] | list[int],
        conv_bias: bool = False,
        norm_op: None | type[nn.Module] = None,
        norm_op_kwargs: dict | None = None,
        dropout_op: None | type[nn.modules.dropout._DropoutNd] = None,
        dropout_op_kwargs: dict | None = None,
        nonlin: None | type[nn.Module] = None,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
        block: type[BasicBlockD] | type[BottleneckD] = BasicBlockD,
        bottleneck_channels: int | list[int] | tuple[int, ...] | None = None,
        stem_channels: int | None = None,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(
            input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_blocks_per_stage,
            num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
            nonlin, nonlin_kwargs, deep_supervision, block, bottleneck_channels, stem_channels,
        )  # fmt: skip
        self.in_channels = input_channels
        self.spatial_dims = convert_conv_op_to_dim(conv_op)
        self.checkpoint_policy = checkpoint_policy

    def _stem_blocks(self) -> list[dict]:
        return [] if self.encoder.stem is None else _blocks(self.encoder.stem)

    def _pools_skip(self) -> bool:
        return True


def nnunet_network_classes() -> dict[str, type[nn.Module]]:
    """The nnU-Net network classes (by the name nnU-Net's plans give them) and their checkpoint-aware subclasses."""
    return {f"{PlainConvUNet.__module__}.{PlainConvUNet.__name__}": CheckpointPlainConvUNet,
            f"{ResidualEncoderUNet.__module__}.{ResidualEncoderUNet.__name__}": CheckpointResidualEncoderUNet}


def checkpoint_class_for(network_class_name: str) -> type[nn.Module] | None:
    """Our subclass of the network class a plans file names (by its full name, or by any name ``pydoc`` locates,
    such as a re-export), or None when there is none."""
    located = pydoc.locate(network_class_name)
    name = f"{located.__module__}.{located.__name__}" if isinstance(located, type) else network_class_name
    return nnunet_network_classes().get(name)
