"""What the checkpoint-aware networks share: ``checkpoint_policy``, ``checkpoint_segments()`` and the input check.

A network describes itself as a chain of blocks (`monai_ckpt.chain`: one `ChainStep` per block, in the parent's
execution order) by implementing ``_chain_steps()``; `CheckpointPolicyMixin` resolves the policy into groups of
blocks and runs the chain with them while training.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..chain import ChainStep, run_chain, segment_steps
from ..policies import CheckpointGroup, PolicySpec, Segment, is_budget_policy, resolve_policy, validate_policy

__all__ = ["ChainStep", "CheckpointPolicyMixin", "InputShapeError", "run_chain", "segment_steps"]


class InputShapeError(ValueError, RuntimeError):
    """A training input the network cannot take (wrong rank, channels or spatial size). It is a ValueError (a bad
    argument) and a RuntimeError, which is what MONAI's parent networks raise for such inputs (``Sizes of tensors
    must match``), so code written for the parent still catches it."""


class CheckpointPolicyMixin:
    """Adds ``checkpoint_policy`` and ``checkpoint_segments()`` to a network that implements
    ``_chain_steps()``. The network's forward calls ``_checkpointing(x)`` and then ``_checkpointed_forward``.
    """

    __jit_unused_properties__ = ["checkpoint_policy", "checkpoint_plan"]
    __jit_ignored_attributes__ = ["_checkpoint_spec", "_checkpoint_groups", "_checkpoint_plans", "_checkpoint_plan_key",
                                  "_checkpoint_added"]

    def _parent_extras(self) -> dict[str, Any]:
        """Attributes the chain or the input check reads that the MONAI parent does not set (``in_channels``,
        ``spatial_dims``...), derived from the parent's own modules. Networks whose parent lacks some override it."""
        return {}

    def _init_checkpointing(self, checkpoint_policy: PolicySpec) -> None:
        """What this class adds to a built parent: the `_parent_extras` it lacks, then the policy. ``__init__`` calls it
        after the parent's, and `monai_ckpt.enable_checkpointing` on an existing parent instance (whose class it has
        just swapped), so the two never differ."""
        added = {name: value for name, value in self._parent_extras().items() if name not in self.__dict__}
        for name, value in added.items():
            setattr(self, name, value)
        nn.Module.__setattr__(self, "_checkpoint_added", tuple(added))
        self.checkpoint_policy = checkpoint_policy

    def extra_repr(self) -> str:
        """The parent's, then the active ``checkpoint_policy`` (``repr(net)`` shows it below the class name)."""
        parent = super().extra_repr()  # type: ignore[misc]
        policy = f"checkpoint_policy={self._checkpoint_spec!r}"
        return f"{parent}, {policy}" if parent else policy

    def _chain_steps(self) -> list[ChainStep]:
        raise NotImplementedError

    def size_multiple(self) -> tuple[int, ...]:
        """What each spatial input size should be a multiple of."""
        raise NotImplementedError

    def _accepts(self, sizes: tuple[int, ...]) -> bool:
        """Whether the parent can run this spatial size; networks refine this when the parent accepts more
        than the multiples of `size_multiple`."""
        for s, m in zip(sizes, self.size_multiple()):
            if s % m:
                return False
        return True

    def _deepest_sizes(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial size of the deepest level for an input of spatial size ``sizes`` that `_accepts` takes:
        each size over `size_multiple`, rounded up; networks whose down-sampling rounds otherwise refine this."""
        return tuple([-(-s // m) for s, m in zip(sizes, self.size_multiple())])

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        """In training, raise an `InputShapeError` that says what is wrong and what would be right when the
        parent cannot take ``x``. Outside training it does nothing: the parent's forward runs untouched and
        fails (or not) exactly as the parent does. Plain loops and ints only, so that Dynamo traces it
        (``torch.compile(net, fullgraph=True)``)."""
        if not self.training:  # type: ignore[attr-defined]
            return
        multiple, in_channels = self.size_multiple(), self.in_channels  # type: ignore[attr-defined]
        if x.ndim != len(multiple) + 2 or x.shape[1] != in_channels:
            expected = f"(batch, {in_channels}, " + ", ".join([f"k*{m}" for m in multiple]) + ")"
            raise InputShapeError(f"{type(self).__name__} expects an input of shape {expected}, got {tuple(x.shape)}.")
        sizes = tuple(x.shape[2:])
        if not self._accepts(sizes):
            sizes = tuple([int(s) for s in sizes])
            padded = self._padded(sizes)
            raise InputShapeError(
                f"{type(self).__name__} cannot take spatial size {sizes}: each spatial size must be a multiple of "
                f"{tuple(multiple)} (the product of its strides), e.g. pad to "
                f"{self._trainable_size(padded, self._single_voxel_norm(int(x.shape[0]))) or padded} "
                "(monai.transforms.DivisiblePad or a sliding-window roi_size of such a size)."
            )
        if math.prod(self._deepest_sizes(sizes)) == 1:
            self._check_single_voxel(x)

    @torch.jit.unused
    def _single_voxel_norm(self, batch: int) -> str | None:
        """Which norm of the deepest level (the ``bottleneck`` segments) cannot train on a single voxel at this
        batch size: instance norm (one value per sample and channel), batch norm with a batch of 1, or none."""
        deepest = [m for step in self._chain_steps() if step.segment.kind == "bottleneck" for m in _modules_of(step.fn)]
        kinds = {type(m) for module in deepest for m in module.modules()}
        if any(issubclass(k, nn.modules.instancenorm._InstanceNorm) for k in kinds):
            return "instance norm"
        if batch == 1 and any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds):
            return "batch norm with a batch of 1"
        return None

    def _padded(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Each spatial size padded up to a multiple of `size_multiple` (at least one multiple)."""
        return tuple([max(m, -(-s // m) * m) for s, m in zip(sizes, self.size_multiple())])

    @torch.jit.unused
    def _trainable_size(self, sizes: tuple[int, ...], single_voxel_norm: str | None) -> tuple[int, ...] | None:
        """The first of ``sizes``, ``sizes`` with one spatial size doubled, and the same padded to multiples of
        `size_multiple`, that the parent takes and trains on (a deepest level of one voxel only where
        ``single_voxel_norm``, see `_single_voxel_norm`, is None); None if none."""
        candidates = [c for base in (sizes, self._padded(sizes))
                      for c in [base] + [base[:d] + (2 * base[d],) + base[d + 1:] for d in range(len(base))]]
        for candidate in candidates:
            if self._accepts(candidate) and (single_voxel_norm is None
                                             or math.prod(self._deepest_sizes(candidate)) > 1):
                return candidate
        return None

    @torch.jit.unused
    def _check_single_voxel(self, x: torch.Tensor) -> None:
        """The deepest level of ``x`` is one voxel: raise, where a norm there cannot train on it, what torch would
        raise halfway through the forward, saying which inputs train instead."""
        sizes, batch = tuple([int(s) for s in x.shape[2:]]), int(x.shape[0])
        norm = self._single_voxel_norm(batch)
        if norm is None:
            return
        larger = self._trainable_size(sizes, norm)
        instead = "a larger spatial size" if larger is None else (
            f"a spatial size whose deepest level has two voxels or more, such as {larger}")
        if norm.startswith("batch"):
            instead = f"a batch of 2 or more, or {instead}"
        raise InputShapeError(
            f"{type(self).__name__} cannot train on spatial size {sizes}: its deepest level is a single voxel "
            f"({'x'.join(['1'] * len(sizes))} after down-sampling by {tuple(self.size_multiple())}), and {norm} cannot "
            f"normalise a single value per channel in training. Use {instead} (monai.transforms.SpatialPad, or a "
            "larger patch or sliding-window roi_size)."
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
        key = _plan_key(x)
        if key not in self._checkpoint_plans:
            if torch.compiler.is_compiling():
                _plan_outside_the_graph(self, x)
            else:
                self.plan_checkpoints(x)
        nn.Module.__setattr__(self, "_checkpoint_plan_key", key)
        nn.Module.__setattr__(self, "_checkpoint_groups", self._checkpoint_plans[key][1])

    @torch.jit.unused
    def plan_checkpoints(self, x: torch.Tensor) -> Any:
        """With a ``{"budget_gb": X}`` policy, plan now for training inputs shaped like ``x`` (same shape, dtype
        and autocast state) instead of on the first training forward, and return the
        `monai_ckpt.planner.Plan`. Needed before ``torch.compile(net, fullgraph=True)``: planning measures the
        network, which cannot happen inside a compiled graph (without fullgraph it runs at a graph break).
        Only the shape, dtype and device of ``x`` matter."""
        if not is_budget_policy(self._checkpoint_spec):
            raise ValueError(f"plan_checkpoints needs a {{'budget_gb': X}} checkpoint_policy, not {self._checkpoint_spec!r}.")
        key = _plan_key(x)
        if key not in self._checkpoint_plans:
            from ..planner import plan_for_network

            # planning runs the network: it must not move the RNG, or this step's dropout masks would change
            devices = [] if x.device.type == "cpu" else [x.device]
            with torch.random.fork_rng(devices=devices, device_type=x.device.type):
                plan = plan_for_network(self, x, key[2], self._checkpoint_spec)
            self._checkpoint_plans[key] = (plan, resolve_policy(plan.policy, self.checkpoint_segments()))
        return self._checkpoint_plans[key][0]

    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_chain(self._chain_steps(), self._checkpoint_groups, x)[0]


def _modules_of(fn: Callable[..., Any]) -> list[nn.Module]:
    """The modules a chain step's function runs: the function itself, or those bound into it (by
    ``functools.partial``, nested or not, or as a method's owner)."""
    if isinstance(fn, nn.Module):
        return [fn]
    if isinstance(fn, functools.partial):
        return [m for part in (fn.func, *fn.args, *fn.keywords.values()) for m in _modules_of(part)]
    owner = getattr(fn, "__self__", None)
    return [owner] if isinstance(owner, nn.Module) else []


def _plan_key(x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.dtype, torch.is_autocast_enabled(x.device.type)


_plan_outside_the_graph = torch.compiler.disable(
    CheckpointPolicyMixin.plan_checkpoints,
    reason="monai_ckpt: a {'budget_gb': X} policy plans by measuring the network, which cannot run inside a "
    "compiled graph: it plans at a graph break on the first compiled training forward of each input shape. "
    "Under torch.compile(fullgraph=True) call net.plan_checkpoints(x) before the first step.",
)
