"""What a loss adds to a training step (`loss_memory`), and a stand-in that replays it on fake tensors
(`LossStandIn`).

A loss that reads data (MONAI's ``.tolist()`` of reduction axes, one-hot checks) cannot run on fake tensors;
`loss_memory` then measures it for real at small output sizes and scales its output-sized terms exactly, and
`LossStandIn` replays that profile in a fake step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .step import LabelBatch, autocast_dtype, fake_mode
from .tracker import step_tracker

__all__ = ["LossMemory", "LossStandIn", "loss_memory"]

@dataclass(frozen=True)
class LossMemory:
    """What a loss (forward and backward) adds to a training step, in bytes above what is alive when it starts
    (the network's output and the label batch included), for one output shape.

    Attributes:
        forward_peak: its forward's peak.
        saved: what its forward leaves alive until its backward (saved tensors, the loss value).
        backward_peak: its backward's peak, the gradient it passes to the output included.
        grad_bytes: that gradient (output-sized, the output's dtype).
        method: how it was measured: ``"fake tensors"`` (exact, at the real size) or ``"real at output sizes
            ..., scaled"`` (exact at small sizes, scaled by the output's voxels).
    """

    forward_peak: int
    saved: int
    backward_peak: int
    grad_bytes: int
    method: str = "fake tensors"


def _loss_phases(loss: Callable[..., torch.Tensor], out: torch.Tensor | list[torch.Tensor], label: torch.Tensor,
                 amp: bool | torch.dtype) -> tuple[int, int, int]:
    """(forward peak, saved, backward peak) of ``loss(out, label).mean()`` above the live bytes at its start."""
    seen = {"forward": 0, "backward": 0}
    phase = ["forward"]

    class _Phases(step_tracker()):
        def after_operator(self, func: Any, out: Any) -> None:
            seen[phase[0]] = max(seen[phase[0]], self.live_bytes())

    tracker = _Phases()
    heads = out if isinstance(out, list) else [out]
    tracker.track_external(*heads, label)
    device = heads[0].device.type
    dtype = amp if isinstance(amp, torch.dtype) else autocast_dtype(device)
    with tracker:
        base = tracker.live_bytes()
        with torch.autocast(device, dtype=dtype, enabled=bool(amp)):
            value = loss(out, label).mean()
        saved = tracker.live_bytes() - base
        phase[0] = "backward"
        value.backward()
    return max(seen["forward"] - base, saved), saved, max(seen["backward"] - base, 0)


def loss_memory(
    loss: Callable[..., torch.Tensor],
    out_shape: Sequence[int] | list[Sequence[int]],
    label: LabelBatch,
    *,
    spatial_dims: int,
    out_dtype: torch.dtype = torch.float32,
    amp: bool | torch.dtype = False,
    sizes: Sequence[int] = (8, 12, 16),
) -> LossMemory:
    """The memory ``loss(out, label)`` adds to a training step whose network output has ``out_shape``.

    First on fake tensors at the real size (exact). A loss that reads data cannot run there (MONAI's losses
    call ``.tolist()`` on their reduction axes); it is then run for real on zero labels at small outputs (the
    last ``spatial_dims`` sizes of output and label set to each of ``sizes``), where its memory is exact, and
    each figure is extended to the real number of voxels along the line through the smallest and largest size.
    A segmentation loss's temporaries are output- or label-sized (softmax, one-hot, products) or per channel
    (sums), so the line is exact; the middle size checks it, and where it is off (a loss with other terms) each
    figure takes the largest of the three lines' values instead, an upper bound for such a term.

    ``out_shape`` a list of shapes: the network's training output is a list (deep-supervision heads, UNet++'s or
    SegResNetDS's), and the loss is called on the list, as the training step calls it; at small sizes each head
    keeps its size relative to the first (the label's).

    Raises:
        ValueError: when the loss fails on an output and label of these shapes (the message says which).
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    listed = bool(out_shape) and not isinstance(out_shape[0], int)
    shapes = [tuple(int(n) for n in shape) for shape in (out_shape if listed else [out_shape])]
    out_shape = shapes[0]
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    grad_bytes = sum(math.prod(shape) for shape in shapes) * itemsize

    def outputs(head_shapes: list[tuple[int, ...]]) -> torch.Tensor | list[torch.Tensor]:
        heads = [torch.randn(shape, dtype=out_dtype, requires_grad=True) for shape in head_shapes]
        return heads if listed else heads[0]

    try:
        with fake_mode():
            forward, saved, backward = _loss_phases(loss, outputs(shapes), label.make(), amp)
        return LossMemory(forward, saved, backward, grad_bytes)
    except (DataDependentOutputException, DynamicOutputShapeException, NotImplementedError):
        pass  # a loss that reads data (or an operator fake tensors lack): measured for real at small sizes
    except Exception as error:  # noqa: BLE001 - the user's loss; its own message says what is wrong
        raise _loss_error(loss, out_shape, label, error) from error

    def small(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
        """``shape`` with the first head's spatial sizes set to ``size``, and another head's in proportion."""
        scaled = [max(1, round(size * s / f)) for s, f in zip(shape[len(shape) - spatial_dims:],
                                                              out_shape[len(out_shape) - spatial_dims:])]
        return (*shape[: len(shape) - spatial_dims], *scaled)

    points = []
    for size in sizes:
        out = outputs([small(shape, size) for shape in shapes])
        first = out[0] if listed else out
        try:
            points.append((first.numel(), _loss_phases(loss, out, LabelBatch(small(label.shape, size),
                                                                             label.dtype).make(), amp)))
        except Exception as error:  # noqa: BLE001
            raise _loss_error(loss, first.shape, label, error) from error
    target = math.prod(out_shape)
    lines = [(points[i], points[j]) for i, j in ((0, -1), (0, 1), (1, -1))]

    def at(k: int, line: tuple) -> float:
        (v0, f0), (v1, f1) = line
        return f0[k] + (f1[k] - f0[k]) * (target - v0) / (v1 - v0)

    straight = all(abs(at(k, lines[0]) - at(k, lines[1])) <= 64 + 1e-3 * abs(at(k, lines[0])) for k in range(3))
    figures = [math.ceil(at(k, lines[0]) if straight else max(at(k, line) for line in lines)) for k in range(3)]
    method = (f"real at output sizes {', '.join('x'.join([str(s)] * spatial_dims) for s in sizes)}, scaled by voxels"
              + ("" if straight else " (not linear: upper bound)"))
    forward, saved, backward = figures
    return LossMemory(max(forward, saved), saved, max(backward, grad_bytes), grad_bytes, method)


def _loss_error(loss: Any, out_shape: Sequence[int], label: LabelBatch, error: Exception) -> ValueError:
    return ValueError(
        f"the loss {type(loss).__name__} fails on the network's output of shape {tuple(out_shape)} and a label batch "
        f"of shape {label.shape} ({str(label.dtype).replace('torch.', '')}): {type(error).__name__}: {error}. "
        "Describe the label batch as the loss expects it: label='index' (B, 1, *spatial class indices, for "
        "to_onehot_y / cross-entropy losses), 'channels' (B, out_channels, *spatial, for sigmoid or one-hot "
        "targets), or an example tensor; and give a loss that takes the network's output as it is (a DynUNet "
        "with deep supervision outputs (B, 1 + deep_supr_num, C, *spatial) in training)."
    )


class _StandInFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory: LossMemory, *outs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = outs[0]
        kept = out.new_empty((memory.saved,), dtype=torch.uint8)
        out.new_empty((max(0, memory.forward_peak - memory.saved),), dtype=torch.uint8)  # freed at once
        ctx.kept, ctx.memory, ctx.heads = kept, memory, [(o.shape, o.dtype) for o in outs]
        return out.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        memory = ctx.memory
        grads = [grad.new_zeros(shape, dtype=dtype) for shape, dtype in ctx.heads]
        rest = memory.backward_peak - memory.saved - memory.grad_bytes
        grad.new_empty((max(0, rest),), dtype=torch.uint8)  # freed at once
        ctx.kept = None
        return None, *grads


class LossStandIn:
    """A loss that uses, in a training step, the memory `loss_memory` measured for a real one: its forward
    allocates what the loss's forward peaks at and keeps what it saves, its backward what the loss's backward
    peaks at, and it returns a gradient of the output's shape and dtype. It runs on fake tensors, so a step with
    a loss that reads data can be measured at clinical sizes."""

    def __init__(self, memory: LossMemory) -> None:
        self.memory = memory

    def __call__(self, out: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return _StandInFunction.apply(self.memory, *(out if isinstance(out, (list, tuple)) else [out]))
