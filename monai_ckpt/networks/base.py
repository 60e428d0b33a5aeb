"""What the checkpoint-aware networks share: a policy attribute and a block-chain executor.

A U-shaped network is run, while checkpointing, as a flat chain of steps in the parent's execution order,
one step per block (a segment such as ``decoder0`` is one or more blocks). A step is ``fn(x, *skips) -> x``:
it may consume skip tensors (a decoder's merge), push its output for a later step (an encoder's skip) or
carry extra tensors to a later block of its segment (a residual branch); a side head (deep supervision) is
``fn(x) -> head output`` and leaves ``x`` as it is. A checkpoint group of consecutive blocks becomes one call
of `monai_ckpt.checkpoint` whose inputs are the running tensor and the skips the group consumes, and whose
outputs are the running tensor, the skips it leaves for later and what it emits: every head output is an
output of its checkpoint, so it gets its gradient (a side effect inside a checkpoint would silently get
none). Groups never nest, so each block is recomputed at most once per backward, and module names never
change: the chain only calls the parent's own modules, in the parent's order (dropout masks included).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint import checkpoint
from ..policies import CheckpointGroup, PolicySpec, Segment, is_budget_policy, resolve_policy, validate_policy

__all__ = ["ChainStep", "CheckpointPolicyMixin", "run_chain", "segment_steps"]


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


def _run_steps(steps: Sequence[ChainStep], x: torch.Tensor, *skips: torch.Tensor) -> tuple[torch.Tensor, ...]:
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


def _skips_needed(steps: Sequence[ChainStep]) -> int:
    depth = need = 0
    for step in steps:
        depth -= step.pops
        need = max(need, -depth)
        depth += step.push + step.extra
    return need


def run_chain(
    steps: Sequence[ChainStep], groups: Sequence[CheckpointGroup], x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``steps`` on ``x``, checkpointing each group of consecutive steps as one unit.

    Returns:
        the final tensor and the emitted (side head) outputs in execution order.
    """
    starts = {group.names[0]: group for group in groups}
    stack: list[torch.Tensor] = []
    emitted: list[torch.Tensor] = []
    i = 0
    while i < len(steps):
        group = starts.get(steps[i].block)
        chunk = steps[i : i + (len(group.names) if group else 1)]
        need = _skips_needed(chunk)
        kept, given = stack[: len(stack) - need], stack[len(stack) - need :]
        if group is None:
            outs = _run_steps(chunk, x, *given)
        else:
            outs = checkpoint(_run_steps, chunk, x, *given, mode=group.mode)
        n_emit = sum(step.emit for step in chunk)
        x, pushed = outs[0], list(outs[1 : len(outs) - n_emit])
        emitted += outs[len(outs) - n_emit :]
        stack = kept + pushed
        i += len(chunk)
    return x, emitted


class CheckpointPolicyMixin:
    """Adds ``checkpoint_policy`` and ``checkpoint_segments()`` to a network that implements
    ``_chain_steps()``. The network's forward calls ``_checkpointing(x)`` and then ``_checkpointed_forward``.
    """

    __jit_unused_properties__ = ["checkpoint_policy", "checkpoint_plan"]
    __jit_ignored_attributes__ = ["_checkpoint_spec", "_checkpoint_groups", "_checkpoint_plans", "_checkpoint_plan_key"]

    def _chain_steps(self) -> list[ChainStep]:
        raise NotImplementedError

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size should be a multiple of."""
        raise NotImplementedError

    def _accepts(self, sizes: tuple[int, ...]) -> bool:
        """Whether the parent can run this spatial size; networks refine this when the parent accepts more
        than the multiples of `size_multiple`."""
        return not any(s % m for s, m in zip(sizes, self.size_multiple()))

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what is wrong and what would be right when the parent cannot take ``x``."""
        name, multiple, in_channels = type(self).__name__, self.size_multiple(), self.in_channels  # type: ignore[attr-defined]
        expected = f"(batch, {in_channels}, " + ", ".join(f"k*{m}" for m in multiple) + ")"
        if x.ndim != len(multiple) + 2 or x.shape[1] != in_channels:
            raise ValueError(f"{name} expects an input of shape {expected}, got {tuple(x.shape)}.")
        sizes = tuple(int(s) for s in x.shape[2:])
        if not self._accepts(sizes):
            fixed = tuple(max(m, -(-s // m) * m) for s, m in zip(sizes, multiple))
            raise ValueError(
                f"{name} cannot take spatial size {sizes}: each spatial size must be a multiple of "
                f"{tuple(multiple)} (the product of its strides), e.g. pad to {fixed} "
                "(monai.transforms.DivisiblePad or a sliding-window roi_size of such a size)."
            )

    def checkpoint_segments(self) -> list[Segment]:
        """The ordered segments a policy chooses from (name, level, kind, parts), in execution order."""
        return list(dict.fromkeys(step.segment for step in self._chain_steps()))

    @property
    def checkpoint_policy(self) -> PolicySpec:
        """The checkpoint policy spec (see `monai_ckpt.policies`); assign a new one at any time."""
        return self._checkpoint_spec

    @checkpoint_policy.setter
    def checkpoint_policy(self, spec: PolicySpec) -> None:
        groups = [] if is_budget_policy(validate_policy(spec)) else resolve_policy(spec, self.checkpoint_segments())
        nn.Module.__setattr__(self, "_checkpoint_groups", groups)
        nn.Module.__setattr__(self, "_checkpoint_spec", spec)
        nn.Module.__setattr__(self, "_checkpoint_plans", {})
        nn.Module.__setattr__(self, "_checkpoint_plan_key", None)

    @property
    def checkpoint_plan(self) -> Any:
        """With a ``{"budget_gb": X}`` policy, the `monai_ckpt.planner.Plan` for the last training input shape
        (None before the first training forward, or for other policies)."""
        planned = self._checkpoint_plans.get(self._checkpoint_plan_key)
        return None if planned is None else planned[0]

    def checkpoint_groups(self) -> list[CheckpointGroup]:
        """The groups of segments the current policy recomputes together, in execution order (for a budget
        policy: those of the plan for the last training input shape)."""
        return list(self._checkpoint_groups)

    @torch.jit.unused
    def _checkpointing(self, x: torch.Tensor) -> bool:
        if not (self.training and torch.is_grad_enabled()):  # type: ignore[attr-defined]
            return False
        if is_budget_policy(self._checkpoint_spec):
            self._use_plan(x)
        return bool(self._checkpoint_groups)

    @torch.jit.unused
    def _use_plan(self, x: torch.Tensor) -> None:
        """Plan for this input (once per shape, dtype and autocast state) and use the plan's groups."""
        amp = torch.is_autocast_enabled(x.device.type)
        key = (tuple(x.shape), x.dtype, amp)
        if key not in self._checkpoint_plans:
            from ..planner import plan_for_network

            plan = plan_for_network(self, x, amp, self._checkpoint_spec)
            self._checkpoint_plans[key] = (plan, resolve_policy(plan.policy, self.checkpoint_segments()))
        nn.Module.__setattr__(self, "_checkpoint_plan_key", key)
        nn.Module.__setattr__(self, "_checkpoint_groups", self._checkpoint_plans[key][1])

    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_chain(self._chain_steps(), self._checkpoint_groups, x)[0]
