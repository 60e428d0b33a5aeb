"""The chain executor: a network run as a flat chain of blocks, each group of them checkpointed as one unit.

A U-shaped network is run, while checkpointing, as a flat chain of steps in the parent's execution order,
one step per block (a segment such as ``decoder0`` is one or more blocks). A step is ``fn(x, *skips) -> x``:
it may consume skip tensors (a decoder's merge), push its output for a later step (an encoder's skip) or
carry extra tensors to a later block of its segment (a residual branch); a side head (deep supervision) is
``fn(x) -> head output`` and leaves ``x`` as it is. A checkpoint group of consecutive blocks becomes one call
of `monai_ckpt.checkpoint` whose inputs are the running tensor and the skips the group consumes, and whose
outputs are the running tensor, the skips it leaves for later and what it emits: every head output is an
output of its checkpoint, so it gets its gradient (a side effect inside a checkpoint would silently get
none). By default groups never nest, so each block is recomputed at most once per backward; a nested group
(the opt-in policy mode ``"nested"``) checkpoints runs of its blocks again inside its own recomputation, so
those run at most three times per step. Module names never change: the chain only calls the parent's own
modules, in the parent's order (dropout masks included).

Core: it knows no MONAI network (torch, `checkpoint` and `policies` only). Networks describe themselves as
chains (`monai_ckpt.networks`); `monai_ckpt.profiling` runs the same chain block by block (`run_steps`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import checkpoint
from .policies import CheckpointGroup, Segment

__all__ = ["ChainStep", "run_chain", "run_groups", "run_steps", "segment_steps", "skips_needed"]


@dataclass(frozen=True)
class ChainStep:
    """One block of a network as a step of the flat chain.

    ``fn(x, *popped)`` returns the next ``x``, or ``(x, *extra)`` when ``extra`` > 0: tensors to push for a
    later step of the same segment (a residual branch). ``push`` pushes the output itself (an encoder's skip);
    ``emit`` marks a side head: ``fn(x)`` is emitted and ``x`` goes on unchanged.
    """

    segment: Segment
    block: str
    fn: Callable[..., Any]
    pops: int = 0
    push: bool = False
    emit: bool = False
    extra: int = 0


def segment_steps(name: str, level: int, kind: str, *blocks: dict) -> list[ChainStep]:
    """The chain steps of one segment made of ``blocks`` (each the keyword arguments of a `ChainStep`
    without ``segment``); blocks are named ``name.0``, ``name.1``... when there are several."""
    parts = tuple(f"{name}.{i}" for i in range(len(blocks))) if len(blocks) > 1 else ()
    segment = Segment(name, level, kind, parts)
    return [ChainStep(segment, block, **kw) for block, kw in zip(segment.blocks, blocks)]


def run_steps(steps: Sequence[ChainStep], x: torch.Tensor, *skips: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run steps; returns ``(x, *skips left on the stack, *emitted outputs)``."""
    stack = list(skips)
    emitted = []
    for step in steps:
        if step.emit:
            emitted.append(step.fn(x))
            continue
        popped = [stack.pop() for _ in range(step.pops)]
        x = step.fn(x, *popped)
        if step.extra:
            x, *extra = x
            stack += extra
        if step.push:
            stack.append(x)
    return (x, *stack, *emitted)


def skips_needed(steps: Sequence[ChainStep]) -> int:
    """How many skip tensors from before ``steps`` they pop."""
    depth = need = 0
    for step in steps:
        depth -= step.pops
        need = max(need, -depth)
        depth += step.push + step.extra
    return need


def run_groups(
    steps: Sequence[ChainStep], groups: Sequence[CheckpointGroup], x: torch.Tensor, *skips: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Run ``steps`` like `run_steps`, checkpointing each group of consecutive steps as one unit; returns
    ``(x, *skips left on the stack, *emitted outputs)``.

    A nested group (one with ``inner`` runs) is one checkpoint whose function runs its steps with each inner
    run checkpointed again: its recomputation keeps only the inner runs' boundaries, and each inner run is
    recomputed once more in its own backward.
    """
    starts = {group.names[0]: group for group in groups}
    stack: list[torch.Tensor] = list(skips)
    emitted: list[torch.Tensor] = []
    i = 0
    while i < len(steps):
        group = starts.get(steps[i].block)
        chunk = steps[i : i + (len(group.names) if group else 1)]
        need = skips_needed(chunk)
        kept, given = stack[: len(stack) - need], stack[len(stack) - need :]
        if group is None:
            outs = run_steps(chunk, x, *given)
        elif group.inner:
            inner = [CheckpointGroup(run) for run in group.inner]
            outs = checkpoint(run_groups, chunk, inner, x, *given, mode=group.mode)
        else:
            outs = checkpoint(run_steps, chunk, x, *given, mode=group.mode)
        n_emit = sum(step.emit for step in chunk)
        x, pushed = outs[0], list(outs[1 : len(outs) - n_emit])
        emitted += outs[len(outs) - n_emit :]
        stack = kept + pushed
        i += len(chunk)
    return (x, *stack, *emitted)


def run_chain(
    steps: Sequence[ChainStep], groups: Sequence[CheckpointGroup], x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``steps`` on ``x``, checkpointing each group of consecutive steps as one unit (see `run_groups`).

    Returns:
        the final tensor and the emitted (side head) outputs in execution order.
    """
    n_emit = sum(step.emit for step in steps)
    outs = run_groups(steps, groups, x)
    return outs[0], list(outs[len(outs) - n_emit :])
