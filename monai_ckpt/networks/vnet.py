"""Checkpoint-aware drop-in subclass of MONAI's VNet."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets import VNet
from monai.utils import deprecated_arg
from torch import nn

from ..chain import ChainStep, segment_steps
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin

__all__ = ["CheckpointVNet"]

_DOWN = ("in_tr", "down_tr32", "down_tr64", "down_tr128")
_UP = ("up_tr256", "up_tr128", "up_tr64", "up_tr32")


def _down_first(t: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    down = t.act_function1(t.bn1(t.down_conv(x)))
    out = t.dropout(down) if t.dropout is not None else down
    return out, down


def _up_first(t: nn.Module, x: torch.Tensor, skipx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = t.dropout(x) if t.dropout is not None else x
    skipxdo = t.dropout2(skipx)
    out = t.act_function1(t.bn1(t.up_conv(out)))
    xcat = torch.cat((out, skipxdo), 1)
    return xcat, xcat


def _lu_last(lu: nn.Module, act: nn.Module, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    return act(torch.add(lu(x), res))


def _transition_blocks(t: nn.Module, first: Callable, pops: int) -> list[dict]:
    """A Down/UpTransition as blocks: the (up/down) conv, each LUConv, the last one with the residual add.
    The first block carries the residual branch to the last; exactly VNet's op order."""
    ops = list(t.ops)
    return [
        dict(fn=functools.partial(first, t), pops=pops, extra=1),
        *[dict(fn=lu) for lu in ops[:-1]],
        dict(fn=functools.partial(_lu_last, ops[-1], t.act_function2), pops=1),
    ]


class CheckpointVNet(CheckpointPolicyMixin, VNet):
    """MONAI's `VNet` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as
    `monai.networks.nets.VNet`; outputs, gradients and BatchNorm statistics (VNet normalises with BatchNorm
    everywhere) equal the parent's, dropout masks included. In ``eval()``, without autograd or under
    TorchScript the forward is the parent's. Segments, in execution order: ``encoder0`` (``in_tr``),
    ``encoder1``..``encoder3`` (``down_tr32``..``down_tr128``), ``bottleneck`` (``down_tr256``),
    ``decoder3``..``decoder0`` (``up_tr256``..``up_tr32``), ``head0`` (``out_tr``). The blocks of a
    transition: its (up/down) convolution, then each LUConv (the last with the residual add).

    The parent's arguments (spatial_dims, in_channels, out_channels, act, dropout_prob, dropout_prob_down,
    dropout_prob_up, dropout_dim, bias) are those of `monai.networks.nets.VNet`, plus:

    Args:
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointVNet

        net = CheckpointVNet(spatial_dims=3, in_channels=2, out_channels=3, checkpoint_policy="sqrt")
        net.load_state_dict(plain_vnet.state_dict())
    """

    @deprecated_arg(
        name="dropout_prob", since="1.2", new_name="dropout_prob_down",
        msg_suffix="please use `dropout_prob_down` instead.",
    )  # fmt: skip
    @deprecated_arg(
        name="dropout_prob", since="1.2", new_name="dropout_prob_up", msg_suffix="please use `dropout_prob_up` instead."
    )
    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        act: tuple[str, dict] | str = ("elu", {"inplace": True}),
        dropout_prob: float | None = 0.5,  # deprecated, as in the parent
        dropout_prob_down: float | None = 0.5,
        dropout_prob_up: tuple[float | None, float] = (0.5, 0.5),
        dropout_dim: int = 3,
        bias: bool = False,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, act=act,
            dropout_prob_down=dropout_prob_down, dropout_prob_up=dropout_prob_up, dropout_dim=dropout_dim, bias=bias,
        )  # fmt: skip
        self._init_checkpointing(checkpoint_policy)

    def _parent_extras(self) -> dict[str, Any]:
        return {"spatial_dims": self.in_tr.spatial_dims, "in_channels": self.in_tr.in_channels}

    def _chain_steps(self) -> list[ChainStep]:
        steps = segment_steps("encoder0", 0, "encoder", dict(fn=self.in_tr, push=True))
        for i, name in enumerate(_DOWN[1:], start=1):
            blocks = _transition_blocks(getattr(self, name), _down_first, pops=0)
            blocks[-1]["push"] = True
            steps += segment_steps(f"encoder{i}", i, "encoder", *blocks)
        steps += segment_steps("bottleneck", len(_DOWN), "bottleneck", *_transition_blocks(self.down_tr256, _down_first, 0))
        for i, name in zip(reversed(range(len(_UP))), _UP):
            steps += segment_steps(f"decoder{i}", i, "decoder", *_transition_blocks(getattr(self, name), _up_first, 1))
        steps += segment_steps("head0", 0, "head", dict(fn=self.out_tr))
        return steps

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size must be a multiple of: four stride-2 convolutions (kernel 2, no
        padding) halve with floor, and every skip merge must line up."""
        return (16,) * self.spatial_dims


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
            if self._checkpointing(x):
                return self._checkpointed_forward(x)
        # VNet.forward, verbatim (TorchScript cannot call super())
        out16 = self.in_tr(x)
        out32 = self.down_tr32(out16)
        out64 = self.down_tr64(out32)
        out128 = self.down_tr128(out64)
        out256 = self.down_tr256(out128)
        x = self.up_tr256(out256, out128)
        x = self.up_tr128(x, out64)
        x = self.up_tr64(x, out32)
        x = self.up_tr32(x, out16)
        x = self.out_tr(x)
        return x
