"""A network whose forward is a graph of tensors (dense skips, as in UNet++) as a chain of steps.

The chain executor (`monai_ckpt.chain`) has one running tensor and a stack of skips: a step pops the skips it
takes and may push tensors for later steps (``extra``). A tensor that several later steps read (UNet++'s
``x_0_0`` feeds five nodes) is popped by each reader and pushed back while a later one still needs it, so a
graph written as `Node` s, in the parent's execution order, becomes ordinary `ChainStep` s: each node's step pops
down to the deepest tensor it reads, runs the node, leaves the tensor the next node reads first as the running
tensor and pushes back what is still needed later. Nothing is copied: a tensor that passes through a checkpoint
comes out as itself.

A side head (deep supervision) is an emitting node: it reads the running tensor and its output is emitted, so
it is an output of its checkpoint and gets its gradient. Where two emitting nodes read different tensors, a
step that only moves the next one into place (no operator) is put before the second, in its segment.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..chain import ChainStep, segment_steps

__all__ = ["Node", "dense_steps"]


@dataclass(frozen=True)
class Node:
    """One block of a graph network: ``out = fn(*args)`` (tensors named by strings).

    Attributes:
        segment: ``(name, level, kind)`` of the segment it belongs to; a segment's nodes are consecutive.
        out: the name of the tensor it makes ("" for an emitting node, whose output leaves the chain).
        fn: what it runs (only the parent's own modules, op for op as the parent's forward); None for a move.
        args: the names of the tensors it reads.
        emit: a side head: it reads one tensor and its output is emitted.
    """

    segment: tuple[str, int, str]
    out: str
    fn: Callable[..., Any] | None
    args: tuple[str, ...]
    emit: bool = False


def _run_node(fn: Callable[..., Any] | None, arg_at: tuple[int, ...], next_at: int, push_at: tuple[int, ...],
              x: Any, *popped: Any) -> Any:
    """One node as a chain step: its tensors are ``(x, *popped, out)``; returns the next running tensor and
    those to push back."""
    env = [x, *popped]
    if fn is not None:
        env.append(fn(*[env[i] for i in arg_at]))
    if not push_at:
        return env[next_at]
    return (env[next_at], *[env[i] for i in push_at])


def dense_steps(nodes: Sequence[Node], source: str) -> list[ChainStep]:
    """The chain steps of the graph ``nodes`` (in the parent's execution order) run on the input ``source``.

    The last non-emitting node's output is the chain's result; emitted outputs come out in node order.

    Raises:
        ValueError: when a node reads a tensor that no earlier node made.
    """
    # an emitting node reads the running tensor: put a move before one that would find another one there
    order: list[Node] = []
    for node in nodes:
        before = order[-1] if order else None
        if node.emit and before is not None and before.emit and before.args != node.args:
            order.append(Node(node.segment, "", None, ()))
        order.append(node)
    made = {source}
    for node in order:
        missing = [a for a in node.args if a not in made]
        if missing:
            raise ValueError(f"node of segment {node.segment[0]!r} reads {missing}, which no earlier node makes")
        made.add(node.out)
    last_out = [n.out for n in order if not n.emit][-1]
    # the tensor each node wants as the running one: what it reads first (a move: the next node's)
    wants = [n.args[0] if n.args else "" for n in order]
    for i in reversed(range(len(order))):
        if not wants[i]:
            wants[i] = wants[i + 1]
    x, stack = source, []
    steps: list[tuple[tuple[str, int, str], dict]] = []
    for i, node in enumerate(order):
        if node.emit:
            steps.append((node.segment, dict(fn=node.fn, emit=True)))
            continue
        later = {a for n in order[i + 1 :] for a in n.args} | {last_out}
        nxt = wants[i + 1] if i + 1 < len(order) else node.out
        reads = [a for a in node.args if a != x]
        if nxt not in (x, node.out):
            reads.append(nxt)
        pops = len(stack) - min(stack.index(a) for a in reads) if reads else 0
        popped = stack[len(stack) - pops :]  # bottom to top
        env = [x, *reversed(popped)] + ([node.out] if node.fn is not None else [])
        keep = [n for n in dict.fromkeys([*popped, x, node.out]) if n in later and n != nxt and n in env]
        steps.append((node.segment, dict(
            fn=functools.partial(_run_node, node.fn, tuple(env.index(a) for a in node.args), env.index(nxt),
                                 tuple(env.index(n) for n in keep)),
            pops=pops, extra=len(keep))))
        x, stack = nxt, stack[: len(stack) - pops] + keep
    out: list[ChainStep] = []
    i = 0
    while i < len(steps):
        j = i
        while j < len(steps) and steps[j][0] == steps[i][0]:
            j += 1
        out += segment_steps(*steps[i][0], *(kw for _, kw in steps[i:j]))
        i = j
    return out
