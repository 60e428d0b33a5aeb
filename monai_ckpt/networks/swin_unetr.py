"""Checkpoint-aware drop-in subclass of MONAI's SwinUNETR."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformerBlock, compute_mask, get_window_size
from monai.utils import optional_import
from torch import nn
from torch.nn import LayerNorm

from ..chain import ChainStep, run_chain, segment_steps
from ..checkpoint import recomputed_by_cheap
from ..policies import PolicySpec
from .base import CheckpointPolicyMixin
from .dynunet import _conv_blocks, _up_blocks, conv_block_forward

rearrange, _ = optional_import("einops", name="rearrange")

__all__ = ["CheckpointSwinUNETR"]

_CHANNELS_LAST = {5: ("b c d h w -> b d h w c", "b d h w c -> b c d h w"), 4: ("b c h w -> b h w c", "b h w c -> b c h w")}


def _stage_start(x: torch.Tensor) -> torch.Tensor:
    """BasicLayer.forward up to its blocks: channels last."""
    return rearrange(x.contiguous(), _CHANNELS_LAST[x.ndim][0])


def _stage_mask(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stage's shifted-window attention mask for its channels-last input ``x``, as BasicLayer.forward computes
    it (an empty tensor when the windows are not shifted at this size: no block then reads it)."""
    spatial = tuple(x.shape[1:-1])
    window_size, shift_size = get_window_size(spatial, layer.window_size, layer.shift_size)
    if not any(s > 0 for s in shift_size):
        return x.new_empty((0,))  # a tuple: MONAI's MetaTensor.new_empty takes no bare int
    padded = [int(np.ceil(s / w)) * w for s, w in zip(spatial, window_size)]
    return compute_mask(padded, window_size, shift_size, x.device)


def _swin_block(block: nn.Module, own_checkpoint: bool, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One block of a Swin stage. ``own_checkpoint=False`` runs a SwinTransformerBlock without its
    ``use_checkpoint`` (inside one of our checkpoints: no nesting)."""
    attn_mask = None if mask is None or mask.numel() == 0 else mask
    if own_checkpoint or not isinstance(block, SwinTransformerBlock):
        return block(x, attn_mask)
    # SwinTransformerBlock.forward with use_checkpoint=False
    shortcut = x
    x = shortcut + block.drop_path(block.forward_part1(x, attn_mask))
    return x + block.forward_part2(x)


def _stage_end(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BasicLayer.forward after its blocks: patch merging, channels first."""
    if layer.downsample is not None:
        x = layer.downsample(x)
    return rearrange(x, _CHANNELS_LAST[x.ndim][1])


def _embed(swin: nn.Module, normalize: bool, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Patch embedding; pushes the input (for the level-0 skip encoder, run late) and the level-1 hidden state."""
    x0 = swin.pos_drop(swin.patch_embed(x))
    return x0, x, swin.proj_out(x0, normalize)


def _contiguous_then(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return fn(x.contiguous())


def _uses_mask(layer: nn.Module, block: nn.Module) -> bool:
    """Whether a block of this stage shifts its windows (then it reads the stage's attention mask)."""
    return not layer.use_hyena and any(s > 0 for s in getattr(block, "shift_size", ()))


def _stage_blocks(swin: nn.Module, i: int, normalize: bool, name: str, inside: frozenset[str],
                  use_checkpoint: bool, push_hidden: bool = True, after: int = 0) -> list[dict]:
    """Swin stage i (``layers{i+1}``, after its ``layers{i+1}c`` convolution block in v2) as blocks: each
    transformer block; the first also goes channels last, the first that shifts its windows also builds the
    attention mask (carried to the later blocks that shift theirs), the last also merges patches and pushes the
    stage's hidden state (``push_hidden=False``: passes on only the hidden state, as the last stage does); the
    segment ``name`` has ``after`` more blocks after them. A block named in ``inside`` runs within one of our
    checkpoints that recomputes: its Swin block then skips MONAI's own ``use_checkpoint`` and, when that was asked
    for, is recomputed by a ``"cheap"`` checkpoint too (its attention and MLP outputs are not kept: no policy keeps
    more of a Swin block than MONAI's own checkpointing did)."""
    layer = getattr(swin, f"layers{i + 1}")[0]
    out = []
    if swin.use_v2:
        out.append(dict(fn=functools.partial(_contiguous_then, getattr(swin, f"layers{i + 1}c")[0])))
    n, first = len(layer.blocks), len(out)
    total = first + n + after
    shifting = [j for j, block in enumerate(layer.blocks) if _uses_mask(layer, block)]
    for j, block in enumerate(layer.blocks):
        block_name = f"{name}.{first + j}" if total > 1 else name
        own = use_checkpoint and block_name not in inside
        replaced = use_checkpoint and block_name in inside  # MONAI's checkpoint, replaced by ours
        makes = bool(shifting) and j == shifting[0]
        takes = bool(shifting) and shifting[0] < j <= shifting[-1]
        passes = bool(shifting) and shifting[0] <= j < shifting[-1]

        def fn(x, *popped, block=block, j=j, own=own, replaced=replaced, makes=makes):  # noqa: ANN001, ANN202
            if j == 0:
                x = _stage_start(x)
            mask = _stage_mask(layer, x) if makes else (popped[0] if popped else None)
            with recomputed_by_cheap() if replaced else contextlib.nullcontext():
                x = _swin_block(block, own, x, mask)
            if j == n - 1:
                x = _stage_end(layer, x)
                return (x, swin.proj_out(x, normalize)) if push_hidden else swin.proj_out(x, normalize)
            return (x, mask) if passes else x

        out.append(dict(fn=fn, pops=int(takes), extra=int(passes) + int(j == n - 1 and push_hidden)))
    return out


def _skip_encoder(encoder: nn.Module, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A skip's CNN encoder on the hidden state on top of the stack, while the decoder's running tensor waits. One
    block: its halves as two would keep the tensor between them from here to its backward, across the decoder's."""
    return x, conv_block_forward(encoder.layer, hidden)  # UnetrBasicBlock.forward


class CheckpointSwinUNETR(CheckpointPolicyMixin, SwinUNETR):
    """MONAI's `SwinUNETR` with gradient checkpointing driven by a segment policy.

    A drop-in replacement: same constructor, modules, parameter names and state_dict keys as
    `monai.networks.nets.SwinUNETR` (``load_from`` of pretrained Swin weights works as in the parent); outputs,
    gradients and normalisation statistics equal the parent's, dropout, attention dropout and stochastic depth
    included. In ``eval()``, without autograd or under TorchScript the forward is the parent's.

    Segments, in execution order, by resolution level (level l is 1/2**l of the input): ``encoder1`` (patch
    embedding), ``encoder2``..``encoder4`` (Swin stages ``layers1``..``layers3``), ``bottleneck`` (``layers4``, then
    ``encoder10``), ``decoder4`` (MONAI's ``decoder5``), then for l = 3..0 ``skip{l}`` (the CNN encoder of the level-l
    skip: MONAI's ``encoder{l+1}``, kind "encoder") and ``decoder{l}`` (MONAI's ``decoder{l+1}``), and ``head0``
    (``out``). Blocks: each Swin transformer block (the first of a stage also goes channels last, the first that
    shifts its windows also builds the attention mask, the last also merges patches), each half of a residual CNN
    block of the bottleneck and the decoders; a skip encoder is one block. The skips' CNN encoders run where their
    skip is merged, after the Swin stages as in the parent, so their backward comes before the stages' (run right
    after a stage, the level-0 skip's gradient would wait through the whole transformer's backward); they consume
    no random numbers, so every dropout mask is the parent's.

    MONAI's own ``use_checkpoint=True`` (each Swin block checkpoints its attention and its MLP) keeps working:
    it is the parent's forward under ``checkpoint_policy="none"``, and it stays in effect in every Swin block
    that our policy leaves alone or offloads; a Swin block inside one of our checkpoints that recomputes runs without
    it, so no block is recomputed twice, and is recomputed in full there, under ``"cheap"`` too (which otherwise keeps
    the attention's and MLP's matrix products): with ``use_checkpoint=True`` no policy keeps more of a Swin block than
    MONAI's own checkpointing. `builtin_checkpoint` reports which it is.

    The parent's arguments (in_channels, out_channels, patch_size, depths, num_heads, window_size, qkv_bias,
    mlp_ratio, feature_size, norm_name, drop_rate, attn_drop_rate, dropout_path_rate, normalize, norm_layer,
    patch_norm, use_checkpoint, spatial_dims, downsample, use_v2, use_hyena, hyena_*, use_flash_attention) are those
    of `monai.networks.nets.SwinUNETR`, plus:

    Args:
        checkpoint_policy: which segments to checkpoint and how, see `monai_ckpt.policies`. Defaults to "all".

    Examples::

        from monai_ckpt import CheckpointSwinUNETR

        net = CheckpointSwinUNETR(in_channels=1, out_channels=14, feature_size=48, checkpoint_policy="sqrt")
        net.load_state_dict(plain_swin_unetr.state_dict())
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        patch_size: int = 2,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] | int = 7,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        feature_size: int = 24,
        norm_name: tuple | str = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        norm_layer: type[LayerNorm] = nn.LayerNorm,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
        downsample: str | nn.Module = "merging",
        use_v2: bool = False,
        use_hyena: bool = False,
        hyena_stages: Sequence[bool] | None = None,
        hyena_kernel_size: int = 3,
        hyena_kernel_mlp_dim: int = 32,
        hyena_kernel_layers: int = 3,
        hyena_mask_max_attenuation: float = 0.95,
        hyena_fft_padding: str = "circular",
        hyena_grid_type: str = "single",
        hyena_use_chunked_fft: bool = False,
        hyena_use_fft_short_conv: bool = False,
        hyena_omega_0: float = 10.0,
        hyena_l_cache: int = 32,
        hyena_short_conv_fft_chunks: int = 0,
        use_flash_attention: bool = False,
        *,
        checkpoint_policy: PolicySpec = "all",
    ) -> None:
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, patch_size=patch_size, depths=depths,
            num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio,
            feature_size=feature_size, norm_name=norm_name, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, dropout_path_rate=dropout_path_rate, normalize=normalize,
            norm_layer=norm_layer, patch_norm=patch_norm, use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims, downsample=downsample, use_v2=use_v2, use_hyena=use_hyena,
            hyena_stages=hyena_stages, hyena_kernel_size=hyena_kernel_size,
            hyena_kernel_mlp_dim=hyena_kernel_mlp_dim, hyena_kernel_layers=hyena_kernel_layers,
            hyena_mask_max_attenuation=hyena_mask_max_attenuation, hyena_fft_padding=hyena_fft_padding,
            hyena_grid_type=hyena_grid_type, hyena_use_chunked_fft=hyena_use_chunked_fft,
            hyena_use_fft_short_conv=hyena_use_fft_short_conv, hyena_omega_0=hyena_omega_0,
            hyena_l_cache=hyena_l_cache, hyena_short_conv_fft_chunks=hyena_short_conv_fft_chunks,
            use_flash_attention=use_flash_attention
        )
        self._init_checkpointing(checkpoint_policy)

    def _parent_extras(self) -> dict[str, Any]:
        """``in_channels`` and ``spatial_dims`` from the patch embedding's convolution; ``use_checkpoint`` (MONAI's
        own switch, which the parent hands to its Swin stages) from the first stage."""
        proj = self.swinViT.patch_embed.proj
        return {"in_channels": proj.in_channels, "spatial_dims": len(proj.kernel_size),
                "use_checkpoint": bool(self.swinViT.layers1[0].use_checkpoint)}

    @property
    def builtin_checkpoint(self) -> str:
        """What MONAI's own ``use_checkpoint`` does in this network: "none", or "swin blocks" (each Swin block
        checkpoints its attention and its MLP, except inside the segments our policy checkpoints)."""
        return "swin blocks" if self.use_checkpoint else "none"

    def _chain_steps(self, inside: frozenset[str] = frozenset()) -> list[ChainStep]:
        """The chain; blocks named in ``inside`` run within one of our checkpoints (their Swin blocks then
        skip MONAI's own ``use_checkpoint``)."""
        swin, norm = self.swinViT, self.normalize
        steps = segment_steps("encoder1", 1, "encoder", dict(fn=functools.partial(_embed, swin, norm), extra=2))
        for i in range(3):
            name = f"encoder{i + 2}"
            steps += segment_steps(name, i + 2, "encoder", *_stage_blocks(swin, i, norm, name, inside,
                                                                            self.use_checkpoint))
        bottom = _conv_blocks(self.encoder10.layer)
        blocks = _stage_blocks(swin, 3, norm, "bottleneck", inside, self.use_checkpoint, push_hidden=False,
                               after=len(bottom)) + bottom
        steps += segment_steps("bottleneck", 5, "bottleneck", *blocks)
        steps += segment_steps("decoder4", 4, "decoder", *_up_blocks(self.decoder5))
        # the skips' CNN encoders run where their skip is merged (the parent runs them after the whole Swin
        # transformer): their backward then comes before the transformer's, not after it
        for level, encoder, up in zip(range(3, -1, -1), (self.encoder4, self.encoder3, self.encoder2, self.encoder1),
                                      (self.decoder4, self.decoder3, self.decoder2, self.decoder1)):
            steps += segment_steps(f"skip{level}", level, "encoder",
                                   dict(fn=functools.partial(_skip_encoder, encoder), pops=1, extra=1))
            steps += segment_steps(f"decoder{level}", level, "decoder", *_up_blocks(up))
        steps += segment_steps("head0", 0, "head", dict(fn=self.out))
        return steps

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size must be a multiple of: ``patch_size ** 5`` (the patch embedding and
        four patch mergings), as the parent checks."""
        return (self.patch_size**5,) * self.spatial_dims

    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # "offload" recomputes nothing: MONAI's own checkpoint stays on inside it (it is not nested in a recomputation)
        inside = frozenset(name for group in self._checkpoint_groups if group.mode != "offload" for name in group.names)
        return run_chain(self._chain_steps(inside), self._checkpoint_groups, x)[0]

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            self._check_input(x_in)
            if self._checkpointing(x_in):
                return self._checkpointed_forward(x_in)
        return super().forward(x_in)
