"""Checkpoint-aware drop-in subclasses of MONAI's BasicUNet and BasicUNetPlusPlus (UNet++, dense skips)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import BasicUNet, BasicUNetPlusPlus
from torch import nn

from ..chain import ChainStep, segment_steps
from ..checkpoint import recomputed_by_cheap
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin, InputShapeError
from .dense import Node, dense_steps
from .inplace import adn as activate_adn
from .merge import conv_of_concatenation

__all__ = ["CheckpointBasicUNet", "CheckpointBasicUNetPlusPlus"]

# four 2x max-poolings: every spatial size must be at least 16 (any size from there on runs, padded in UpCat; with
# instance norm, training needs a deepest level of two voxels or more)
_LEVELS = 4


# A convolution that reads at most a quarter as many channels as it writes (the first one, from the image's
# modalities) costs at most a quarter of a same-width one to rerun: "cheap" recomputes it rather than keep its output.
_THIN = 4


def _convolution(block: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A MONAI Convolution (norm, dropout, activation in that order); of a tuple, the convolution of its
    concatenation along the channels, which keeps the parts for backward instead (`conv_of_concatenation`).
    Without norm and dropout (a dropout of p=0 returns its input) its in-place activation overwrites the
    convolution's output, which a "cheap" checkpoint would keep (torch refuses a kept tensor that changed): there,
    and for a convolution from a few channels, the convolution is recomputed instead."""
    adn = getattr(block, "adn", None)
    parts = adn._modules if adn is not None else {}
    overwrites = (adn is not None and "N" not in parts and getattr(parts.get("D"), "p", 0) == 0
                  and getattr(parts.get("A"), "inplace", False))
    concatenated = not isinstance(x, torch.Tensor)
    thin = not concatenated and block.conv.in_channels * _THIN <= block.conv.out_channels
    with recomputed_by_cheap() if overwrites or thin else contextlib.nullcontext():
        y = conv_of_concatenation(x, 1, block.conv) if concatenated else block.conv(x)
    return y if adn is None else activate_adn(adn, y)


def _pool_then_conv(down: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _convolution(down.convs.conv_0, down.max_pooling(x))


def _upcat_first(up: nn.Module, x: torch.Tensor, *x_e: torch.Tensor) -> torch.Tensor:
    """UpCat.forward up to its first convolution: upsample, pad to the encoder's size, concatenate, convolve.
    Several encoder tensors (UNet++) are concatenated with it at once (BasicUNetPlusPlus.forward concatenates them
    first: the same values), and the convolution keeps the parts, not their concatenation."""
    skip = x_e[0]
    # a transposed convolution with kernel = stride reads each input once per output (64 multiply-adds an output
    # at the top level, a 27th of a 3x3x3 convolution's): "cheap" reruns it rather than keep its output
    with recomputed_by_cheap() if hasattr(up.upsample, "deconv") else contextlib.nullcontext():
        x_0 = up.upsample(x)
    if up.is_pad:
        # handling spatial shapes due to the 2x maxpooling with odd edge lengths (as UpCat does)
        dimensions = len(x.shape) - 2
        sp = [0] * (dimensions * 2)
        for i in range(dimensions):
            if skip.shape[-i - 1] != x_0.shape[-i - 1]:
                sp[i * 2 + 1] = 1
        if any(sp):  # UpCat pads by nothing too: a copy of the same values
            x_0 = torch.nn.functional.pad(x_0, sp, "replicate")
    return _convolution(up.convs.conv_0, (*x_e, x_0))


def _encoder(block: nn.Module) -> list[dict]:
    """A TwoConv (the first level) or a Down (max-pooling + TwoConv) as its two Convolutions."""
    if hasattr(block, "max_pooling"):
        return [dict(fn=functools.partial(_pool_then_conv, block)), dict(fn=functools.partial(_convolution,
                                                                                           block.convs.conv_1))]
    return [dict(fn=functools.partial(_convolution, block.conv_0)), dict(fn=functools.partial(_convolution,
                                                                                             block.conv_1))]


def _first_conv_extras(first: nn.Module) -> dict[str, Any]:
    """``spatial_dims`` and ``in_channels``, which BasicUNet and BasicUNetPlusPlus do not keep, read from their first
    TwoConv's first Convolution."""
    return {"spatial_dims": first.conv_0.spatial_dims, "in_channels": first.conv_0.in_channels}


class _BasicUNetCheck(CheckpointPolicyMixin):
    """The size rule the two networks share: four max-poolings (each size at least 16), any size beyond."""

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial size should be a multiple of to avoid UpCat's padding (any size >= 16 runs)."""
        return (2**_LEVELS,) * self.spatial_dims  # type: ignore[attr-defined]

    def _accepts(self, sizes: tuple[int, ...]) -> bool:
        return True  # every size of at least 16; `_check_input` says so for smaller ones

    def _deepest_sizes(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple([s // 2**_LEVELS for s in sizes])  # max-pooling rounds down

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        """As the base check (rank, channels), and each spatial size at least 16: below, the fourth
        max-pooling has nothing left to pool."""
        super()._check_input(x)
        if not self.training or all(int(s) >= 2**_LEVELS for s in x.shape[2:]):  # type: ignore[attr-defined]
            return
        sizes = tuple([int(s) for s in x.shape[2:]])
        padded = tuple([max(s, 2**_LEVELS) for s in sizes])
        padded = self._trainable_size(padded, self._single_voxel_norm(int(x.shape[0]))) or padded
        raise InputShapeError(
            f"{type(self).__name__} cannot take spatial size {sizes}: each spatial size must be at least "
            f"{2**_LEVELS} (four 2x max-poolings; any larger size works, multiples of {2**_LEVELS} need no padding), "
            f"e.g. pad to {padded} (monai.transforms.SpatialPad or DivisiblePad)."
        )


class CheckpointBasicUNet(_BasicUNetCheck, BasicUNet):
    """MONAI's `BasicUNet` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as
    `monai.networks.nets.BasicUNet`; outputs, gradients and normalisation statistics equal the parent's, dropout
    masks included. In ``eval()``, without autograd or under TorchScript the forward is the parent's.

    Segments, in execution order: ``encoder0`` (``conv_0``), ``encoder1``..``encoder3`` (``down_1``..``down_3``),
    ``bottleneck`` (``down_4``), ``decoder3``..``decoder0`` (``upcat_4``..``upcat_1``, each merging the skip of
    its level), ``head0`` (``final_conv``). Blocks: each Convolution of a TwoConv (a Down's first one with its
    max-pooling, an UpCat's first one with its upsampling, padding and concatenation).

    Args:
        spatial_dims, in_channels, out_channels, features, act, norm, bias, dropout, upsample: as for
            `monai.networks.nets.BasicUNet`.
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointBasicUNet

        net = CheckpointBasicUNet(spatial_dims=3, in_channels=1, out_channels=2, checkpoint_policy="sqrt")
        net.load_state_dict(plain_basic_unet.state_dict())
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        bias: bool = True,
        dropout: float | tuple = 0.0,
        upsample: str = "deconv",
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, act, norm, bias, dropout, upsample)
        self._init_checkpointing(checkpoint_policy)

    def _parent_extras(self) -> dict[str, Any]:
        return _first_conv_extras(self.conv_0)

    def _chain_steps(self) -> list[ChainStep]:
        encoders = [self.conv_0, self.down_1, self.down_2, self.down_3]
        steps = []
        for i, block in enumerate(encoders):
            blocks = _encoder(block)
            blocks[-1]["push"] = True
            steps += segment_steps(f"encoder{i}", i, "encoder", *blocks)
        steps += segment_steps("bottleneck", _LEVELS, "bottleneck", *_encoder(self.down_4))
        ups = [self.upcat_1, self.upcat_2, self.upcat_3, self.upcat_4]  # ups[i] merges the skip of level i
        for i in reversed(range(_LEVELS)):
            steps += segment_steps(f"decoder{i}", i, "decoder",
                                   dict(fn=functools.partial(_upcat_first, ups[i]), pops=1),
                                   dict(fn=functools.partial(_convolution, ups[i].convs.conv_1)))
        steps += segment_steps("head0", 0, "head", dict(fn=self.final_conv))
        return steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        # BasicUNet.forward, verbatim (TorchScript cannot call super())
        x0 = self.conv_0(x)

        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)

        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        u2 = self.upcat_2(u3, x1)
        u1 = self.upcat_1(u2, x0)

        logits = self.final_conv(u1)
        return logits


class CheckpointBasicUNetPlusPlus(_BasicUNetCheck, BasicUNetPlusPlus):
    """MONAI's `BasicUNetPlusPlus` (UNet++) with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as
    `monai.networks.nets.BasicUNetPlusPlus`; outputs (the same list), gradients and normalisation statistics equal
    the parent's, dropout masks included. With deep supervision every head's output is an output of its
    checkpoint and gets its gradient. In ``eval()``, without autograd or under TorchScript the forward is the
    parent's.

    Its dense skips run on the chain executor as a graph (`monai_ckpt.networks.dense`): a tensor that several
    nodes read (``x_0_0`` feeds five) passes through the checkpoints between them as itself, never copied.

    Segments, in the parent's execution order: ``encoder0`` (``conv_0_0``), ``encoder1`` (``conv_1_0``),
    ``decoder0_1`` (``upcat_0_1``), ``encoder2``, ``decoder1_1``, ``decoder0_2``, ``encoder3``, ``decoder2_1``,
    ``decoder1_2``, ``decoder0_3``, ``bottleneck`` (``conv_4_0``), ``decoder3_1``, ``decoder2_2``, ``decoder1_3``,
    ``decoder0_4``, then with deep supervision ``head1``..``head3`` (``final_conv_0_1``..``final_conv_0_3``), and
    ``head0`` (``final_conv_0_4``). Without deep supervision the parent's three unused heads are not run (they
    get no gradient in the parent either). Blocks: each Convolution of a TwoConv, as in `CheckpointBasicUNet`.

    Args:
        spatial_dims, in_channels, out_channels, features, deep_supervision, act, norm, bias, dropout, upsample: as
            for `monai.networks.nets.BasicUNetPlusPlus`.
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointBasicUNetPlusPlus

        net = CheckpointBasicUNetPlusPlus(spatial_dims=3, deep_supervision=True, checkpoint_policy="sqrt")
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        deep_supervision: bool = False,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        bias: bool = True,
        dropout: float | tuple = 0.0,
        upsample: str = "deconv",
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, deep_supervision, act, norm, bias,
                         dropout, upsample)
        self._init_checkpointing(checkpoint_policy)

    def _parent_extras(self) -> dict[str, Any]:
        return _first_conv_extras(self.conv_0_0)

    def _nodes(self) -> list[Node]:
        """The parent's forward as a graph, node for node in its order."""
        nodes: list[Node] = []

        def encoder(i: int, name: str, level: int, kind: str) -> None:
            first, second = _encoder(getattr(self, f"conv_{i}_0"))
            src = "x" if i == 0 else f"x_{i - 1}_0"
            nodes.append(Node((name, level, kind), f"h_{i}_0", first["fn"], (src,)))
            nodes.append(Node((name, level, kind), f"x_{i}_0", second["fn"], (f"h_{i}_0",)))

        def decoder(i: int, j: int) -> None:
            up = getattr(self, f"upcat_{i}_{j}")
            seg = (f"decoder{i}_{j}", i, "decoder")
            skips = tuple(f"x_{i}_{k}" for k in range(j))
            nodes.append(Node(seg, f"h_{i}_{j}", functools.partial(_upcat_first, up), (f"x_{i + 1}_{j - 1}", *skips)))
            nodes.append(Node(seg, f"x_{i}_{j}", functools.partial(_convolution, up.convs.conv_1), (f"h_{i}_{j}",)))

        # BasicUNetPlusPlus.forward's order (dropout masks are drawn in it)
        encoder(0, "encoder0", 0, "encoder")
        encoder(1, "encoder1", 1, "encoder")
        decoder(0, 1)
        encoder(2, "encoder2", 2, "encoder")
        decoder(1, 1)
        decoder(0, 2)
        encoder(3, "encoder3", 3, "encoder")
        decoder(2, 1)
        decoder(1, 2)
        decoder(0, 3)
        encoder(4, "bottleneck", _LEVELS, "bottleneck")
        decoder(3, 1)
        decoder(2, 2)
        decoder(1, 3)
        decoder(0, 4)
        if self.deep_supervision:
            for j in (1, 2, 3):
                nodes.append(Node((f"head{j}", 0, "head"), "", getattr(self, f"final_conv_0_{j}"), (f"x_0_{j}",),
                                  emit=True))
        nodes.append(Node(("head0", 0, "head"), "out", self.final_conv_0_4, ("x_0_4",)))
        return nodes

    def _chain_steps(self) -> list[ChainStep]:
        return dense_steps(self._nodes(), "x")

    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        from ..chain import run_chain

        out, heads = run_chain(self._chain_steps(), self._checkpoint_groups, x)
        return [*heads, out]

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - the parent's signature, TorchScript-typed
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        # BasicUNetPlusPlus.forward, verbatim (TorchScript cannot call super())
        x_0_0 = self.conv_0_0(x)
        x_1_0 = self.conv_1_0(x_0_0)
        x_0_1 = self.upcat_0_1(x_1_0, x_0_0)

        x_2_0 = self.conv_2_0(x_1_0)
        x_1_1 = self.upcat_1_1(x_2_0, x_1_0)
        x_0_2 = self.upcat_0_2(x_1_1, torch.cat([x_0_0, x_0_1], dim=1))

        x_3_0 = self.conv_3_0(x_2_0)
        x_2_1 = self.upcat_2_1(x_3_0, x_2_0)
        x_1_2 = self.upcat_1_2(x_2_1, torch.cat([x_1_0, x_1_1], dim=1))
        x_0_3 = self.upcat_0_3(x_1_2, torch.cat([x_0_0, x_0_1, x_0_2], dim=1))

        x_4_0 = self.conv_4_0(x_3_0)
        x_3_1 = self.upcat_3_1(x_4_0, x_3_0)
        x_2_2 = self.upcat_2_2(x_3_1, torch.cat([x_2_0, x_2_1], dim=1))
        x_1_3 = self.upcat_1_3(x_2_2, torch.cat([x_1_0, x_1_1, x_1_2], dim=1))
        x_0_4 = self.upcat_0_4(x_1_3, torch.cat([x_0_0, x_0_1, x_0_2, x_0_3], dim=1))

        output_0_1 = self.final_conv_0_1(x_0_1)
        output_0_2 = self.final_conv_0_2(x_0_2)
        output_0_3 = self.final_conv_0_3(x_0_3)
        output_0_4 = self.final_conv_0_4(x_0_4)

        if self.deep_supervision:
            output = [output_0_1, output_0_2, output_0_3, output_0_4]
        else:
            output = [output_0_4]

        return output
