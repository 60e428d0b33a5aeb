"""The chain profile the planner's model reads: per block of the network's chain, the bytes it keeps and passes on
(`monai_ckpt.profiling.block_costs` on fake tensors at the planned size), the tensors pushed between blocks, and
each block's recompute time as a fraction of a plain step (timed for real at a small size on the network's
device)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..profiling import BlockCost, LabelBatch, block_costs, device_clock, make_optimizer, replica, training_step
from .step import PlannedStep, make_step

__all__ = ["TIME_QUANTUM", "TIME_VOXELS", "ChainProfile", "chain_times", "profile_chain", "pushed_items", "quantized",
           "step_seconds", "timed_input_shape"]

TIME_VOXELS = 48**3  # largest batch x volume timed for real when planning: time ratios vary little with size
TIME_QUANTUM = 0.002  # recompute times are rounded to this fraction of a step: timing noise below it cannot
# change a plan, and equal sums tie exactly (ties are then broken by the smaller peak, then the policy's text)


@dataclass
class ChainProfile:
    """What the dynamic program needs, per block of the chain, in execution order."""

    costs: list[BlockCost]
    segments: list[tuple[str, list[int]]]  # segment name, its block indices
    items: list[tuple[int, int | None, int, bool]]  # pushed tensors: producer, consumer (None: the loss), bytes,
    # whether it is the producer's output itself (a skip) rather than a residual branch or a side head
    fixed_bytes: int  # parameters, optimizer state, the batch and the label batch
    recompute_s: dict[str, list[float]]  # per mode ("full", "cheap"), recompute time of each block as a fraction
    # of a plain step
    tail_s: dict[str, list[float]]  # per mode, of that time what a checkpoint ending with the block does not rerun
    loss_bytes: int = 0  # what the loss adds above everything the forward kept (its forward or backward peak)


def pushed_items(network: nn.Module, costs: list[BlockCost]) -> list[tuple[int, int | None, int, bool]]:
    """Tensors a block pushes for a later one (a skip, a residual branch) or emits (a side head)."""
    stack: list[int] = []
    items: list[list] = []
    for i, step in enumerate(network._chain_steps()):
        for _ in range(step.pops):
            items[stack.pop()][1] = i
        if step.emit:
            items.append([i, None, costs[i].side_bytes, False])
            continue
        if step.extra:
            for _ in range(step.extra):
                stack.append(len(items))
                items.append([i, None, costs[i].side_bytes // step.extra, False])
        if step.push:
            stack.append(len(items))
            items.append([i, None, costs[i].next_bytes, True])
    return [tuple(item) for item in items]


def timed_input_shape(input_shape: tuple[int, ...], multiple: tuple[int, ...]) -> tuple[int, ...]:
    """The input timed for real: one patch of ``input_shape`` shrunk (keeping its aspect) to about
    TIME_VOXELS, no side under two multiples of the network's size multiple (its deepest level needs > 1 voxel
    for instance norm)."""
    _, channels, *spatial = input_shape
    scale = min(1.0, (TIME_VOXELS / math.prod(spatial)) ** (1 / len(spatial)))
    return (1, channels, *(min(s, max(2 * m, round(s * scale / m) * m)) for s, m in zip(spatial, multiple)))


def step_seconds(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str,
                  device: torch.device, step: PlannedStep, runs: int = 4) -> float:
    """Median time of a plain training step (the user's loss included) on ``device``, after a warm-up step:
    process CPU time on the CPU, CUDA events on CUDA."""
    model = replica(network, "none").train().to(device)
    opt, x = make_optimizer(model, optimizer), torch.randn(*input_shape, device=device)
    label = None
    if step.label is not None:
        label = LabelBatch((input_shape[0], step.label.shape[1], *input_shape[2:]), step.label.dtype).make(device)
    clock = device_clock(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            training_step(model, x, opt, amp, loss=step.user_loss, label=label)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = clock()
            training_step(model, x, opt, amp, loss=step.user_loss, label=label)
            times.append(clock() - t0)
    return statistics.median(times[1:])


def quantized(fractions: list[float]) -> list[float]:
    return [round(f / TIME_QUANTUM) * TIME_QUANTUM for f in fractions]


def chain_times(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str, device: torch.device,
                step: PlannedStep, progress: Callable[[str], None] | None = None,
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each block's recompute time and tail (per mode, `ChainProfile`), as fractions of a plain training step, timed
    for real on ``device`` at the reduced input `timed_input_shape` (identical blocks timed once, `block_costs`)."""
    report = progress or (lambda message: None)
    time_shape = timed_input_shape(input_shape, network.size_multiple())
    report(f"timing the blocks at {time_shape} on {device} (each distinct block once, identical ones reuse its times)")
    timed = block_costs(lambda: replica(network, "none"), time_shape, amp=amp, repeats=2, device=device)
    report(f"timing plain training steps at {time_shape} on {device}")
    step_s = step_seconds(network, time_shape, amp, optimizer, device, step)
    recompute_s = {"full": quantized([c.forward_s / step_s for c in timed]),
                   "cheap": quantized([c.cheap_recompute_s / step_s for c in timed])}
    tail_s = {"full": quantized([c.tail_s / step_s for c in timed]),
              "cheap": quantized([c.cheap_tail_s / step_s for c in timed])}
    return recompute_s, tail_s


def profile_chain(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str, timing: bool,
             step: PlannedStep | None = None, device: torch.device | None = None) -> ChainProfile:
    step = step or make_step(network, input_shape, amp, None, None)
    device = device or torch.device("cpu")
    costs = block_costs(lambda: replica(network, "none"), input_shape, estimate=True, amp=amp)
    zeros = [0.0] * len(costs)
    recompute_s, tail_s = {"full": zeros, "cheap": zeros}, {"full": zeros, "cheap": zeros}
    if timing:  # recompute time of each block as a fraction of a plain training step, on the network's device
        recompute_s, tail_s = chain_times(network, input_shape, amp, optimizer, device, step)
    names = [c.segment for c in costs]
    segments = [(name, [i for i, n in enumerate(names) if n == name]) for name in dict.fromkeys(names)]
    param_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    opt_states = {"adam": 2, "sgd": 0, "none": 0}.get(optimizer, 2)
    label_bytes = 0 if step.label is None else math.prod(step.label.shape) * step.label.make("meta").element_size()
    return ChainProfile(
        costs=costs,
        segments=segments,
        items=pushed_items(network, costs),
        fixed_bytes=(1 + opt_states) * param_bytes + math.prod(input_shape) * 4 + label_bytes,
        recompute_s=recompute_s,
        tail_s=tail_s,
        loss_bytes=max(step.memory.forward_peak, step.memory.backward_peak),
    )
