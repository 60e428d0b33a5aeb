"""The planner: fit a volume and batch into a memory budget with the least recomputation.

``plan(network, spatial_shape, budget_gb)`` profiles the network's blocks (bytes each keeps for backward,
what it passes on, what a ``"cheap"`` checkpoint keeps, forward and recompute time; fake tensors where the
real size would not fit), then chooses how to run every segment (plainly, checkpointed whole, checkpointed
"cheap", or cut into runs of consecutive blocks, each run plain/full/cheap) with an exact dynamic program over
the chain: for each prefix of segments it keeps the Pareto front of (bytes kept for backward, recompute time), and a
choice is admissible only if the backward peak it implies fits (the peak of a block's backward is what the
blocks before it keep, its own activations and gradients, the skip gradients waiting for their encoder,
parameters, gradients and optimizer state). The front's fastest admissible end is optimal for that memory
model (as rotor does for chains), not a rule of thumb.

The model is then checked against the measurement it stands for: the chosen policy's whole training step is
run under MemTracker on fake tensors (exact live-tensor bytes, see DESIGN.md), and the model's budget is
tightened until that measured peak fits. The plan's ``predicted_peak_bytes`` is this measured figure; the
fixed policies are measured too and the plan is never slower than the fastest one that fits.

Sizes are in GiB (2**30 bytes), as GPU memory is counted.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .policies import PolicySpec, resolve_policy
from .profiling import BlockCost, block_costs, make_optimizer, measure_step_memory, training_step
from .profiling import replica as _replica

__all__ = ["FIXED_POLICIES", "Plan", "capacity_table", "max_batch_size", "max_patch_edge", "plan"]

GiB = 2**30
_log = logging.getLogger(__name__)
FIXED_POLICIES: tuple[PolicySpec, ...] = ("none", "cheap", "all", "blocks", "sqrt", "encoder", "decoder",
                                          {"every": 2})
GRAD_FACTOR = 1.5  # gradient working set of a block's backward, in units of its input + output bytes
TIME_VOXELS = 48**3  # largest batch x volume timed for real when planning: time ratios vary little with size


@dataclass
class Plan:
    """How to run one training step of a network within a memory budget.

    Attributes:
        policy: the checkpoint policy spec (give it to ``network.checkpoint_policy``).
        checkpointed: segment and block names it checkpoints, in execution order.
        predicted_peak_bytes: peak live-tensor bytes of a whole training step (forward, backward, optimizer)
            with this policy, measured on fake tensors with MemTracker.
        predicted_time_ratio: step time relative to no checkpointing, from measured block times.
        fits: whether the predicted peak is within the budget.
        budget_bytes: the budget.
        plain_peak_bytes: the peak without checkpointing.
        input_shape: (batch, channels, *spatial).
        amp: autocast (bf16 on CPU, fp16 on CUDA) in the forward.
        optimizer: optimizer whose state counts towards the peak.
    """

    policy: PolicySpec
    checkpointed: list[str]
    predicted_peak_bytes: int
    predicted_time_ratio: float
    fits: bool
    budget_bytes: int
    plain_peak_bytes: int
    input_shape: tuple[int, ...]
    amp: bool = False
    optimizer: str = "adam"

    def __str__(self) -> str:
        return "\n".join([
            f"input {self.input_shape}, budget {_size(self.budget_bytes)}, amp={self.amp}, optimizer={self.optimizer}",
            f"without checkpointing: peak {_size(self.plain_peak_bytes)}",
            f"plan: peak {_size(self.predicted_peak_bytes)} ({'fits' if self.fits else 'does NOT fit'}), "
            f"step time x{self.predicted_time_ratio:.2f}",
            f"checkpointed: {', '.join(self.checkpointed) or 'nothing'}",
            f"checkpoint_policy = {self.policy!r}",
        ])


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


# --- profile ---------------------------------------------------------------------------------------------


@dataclass
class _Profile:
    """What the dynamic program needs, per block of the chain, in execution order."""

    costs: list[BlockCost]
    segments: list[tuple[str, list[int]]]  # segment name, its block indices
    items: list[tuple[int, int | None, int, bool]]  # pushed tensors: producer, consumer (None: the loss), bytes,
    # whether it is the producer's output itself (a skip) rather than a residual branch or a side head
    fixed_bytes: int  # parameters, optimizer state and the batch
    recompute_s: dict[str, list[float]]  # per mode ("full", "cheap"), recompute time of each block as a fraction
    # of a plain step
    tail_s: dict[str, list[float]]  # per mode, of that time what a checkpoint ending with the block does not rerun


def _items(network: nn.Module, costs: list[BlockCost]) -> list[tuple[int, int | None, int, bool]]:
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


def _time_shape(input_shape: tuple[int, ...], multiple: tuple[int, ...]) -> tuple[int, ...]:
    """The input timed for real: one patch of ``input_shape`` shrunk (keeping its aspect) to about
    TIME_VOXELS, no side under two multiples of the network's size multiple (its deepest level needs > 1 voxel
    for instance norm)."""
    _, channels, *spatial = input_shape
    scale = min(1.0, (TIME_VOXELS / math.prod(spatial)) ** (1 / len(spatial)))
    return (1, channels, *(min(s, max(2 * m, round(s * scale / m) * m)) for s, m in zip(spatial, multiple)))


def _step_seconds(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str) -> float:
    """Median CPU time of a plain training step, after a warm-up step."""
    model = _replica(network, "none").train()
    opt, x = make_optimizer(model, optimizer), torch.randn(*input_shape)
    times = []
    for _ in range(3):
        t0 = time.process_time()
        training_step(model, x, opt, amp)
        times.append(time.process_time() - t0)
    return statistics.median(times[1:])


def _profile(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str, timing: bool) -> _Profile:
    costs = block_costs(lambda: _replica(network, "none"), input_shape, estimate=True, amp=amp)
    zeros = [0.0] * len(costs)
    recompute_s, tail_s = {"full": zeros, "cheap": zeros}, {"full": zeros, "cheap": zeros}
    if timing:  # recompute time of each block as a fraction of a plain training step, measured on the CPU
        time_shape = _time_shape(input_shape, network.size_multiple())
        timed = block_costs(lambda: _replica(network, "none"), time_shape, amp=amp, repeats=2)
        step_s = _step_seconds(network, time_shape, amp, optimizer)
        recompute_s = {"full": [c.forward_s / step_s for c in timed],
                       "cheap": [c.cheap_recompute_s / step_s for c in timed]}
        tail_s = {"full": [c.tail_s / step_s for c in timed], "cheap": [c.cheap_tail_s / step_s for c in timed]}
    names = [c.segment for c in costs]
    segments = [(name, [i for i, n in enumerate(names) if n == name]) for name in dict.fromkeys(names)]
    param_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    opt_states = {"adam": 2, "sgd": 0, "none": 0}.get(optimizer, 2)
    return _Profile(
        costs=costs,
        segments=segments,
        items=_items(network, costs),
        fixed_bytes=(1 + opt_states) * param_bytes + math.prod(input_shape) * 4,
        recompute_s=recompute_s,
        tail_s=tail_s,
    )


# --- memory model and dynamic program ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One way to run one segment: its units (block indices, mode), what it keeps, its backward peak above
    what earlier segments keep, and its recompute time."""

    units: tuple[tuple[tuple[int, ...], str], ...]
    kept: int
    peak: int
    time: float


def _unit_kept(p: _Profile, blocks: tuple[int, ...], mode: str) -> int:
    """Bytes a unit leaves alive until its backward: everything it keeps when plain; when checkpointed, what
    it passes on (its output, and what it pushes for blocks after it), plus the conv outputs when cheap."""
    if mode == "plain":
        return sum(p.costs[b].kept_bytes for b in blocks)
    last = blocks[-1]
    out = p.costs[last].next_bytes + sum(
        nbytes for prod, cons, nbytes, is_x in p.items
        if prod in blocks and (cons is None or cons > last) and not (is_x and prod == last)
    )
    if mode == "cheap":
        out += sum(p.costs[b].cheap_bytes for b in blocks)
    return out


def _pending(p: _Profile, block: int) -> int:
    """Gradients of pushed tensors that wait, during this block's backward, for their producer's backward."""
    return sum(nbytes for prod, cons, nbytes, _ in p.items if prod < block and (cons is None or cons > block))


def _option(p: _Profile, units: tuple[tuple[tuple[int, ...], str], ...], grads_after: list[int]) -> _Option:
    kept = peak = 0
    rtime = 0.0
    for blocks, mode in units:
        inside = 0
        for b in blocks:
            c = p.costs[b]
            inside += c.kept_bytes
            peak = max(peak, kept + inside + GRAD_FACTOR * (c.next_bytes + c.input_bytes) + _pending(p, b) + grads_after[b])
        kept += _unit_kept(p, blocks, mode)
        if mode != "plain":  # torch stops recomputing once every saved tensor is back: the last block's tail is free
            rtime += sum(p.recompute_s[mode][b] for b in blocks) - p.tail_s[mode][blocks[-1]]
    return _Option(units, kept, peak, rtime)


def _runs_of(blocks: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
    """Every way to cut ``blocks`` into runs of consecutive blocks."""
    if len(blocks) <= 1:
        return [(blocks,)]
    return [(blocks[:k], *rest) for k in range(1, len(blocks)) for rest in _runs_of(blocks[k:])] + [(blocks,)]


def _segment_options(p: _Profile, blocks: list[int], grads_after: list[int]) -> list[_Option]:
    """Every way to run a segment: cut into runs of consecutive blocks, each run plain, full or cheap (plain
    runs as their single blocks)."""
    choices = []
    for runs in _runs_of(tuple(blocks)):
        for modes in itertools.product(("plain", "full", "cheap"), repeat=len(runs)):
            units = []
            for run, mode in zip(runs, modes):
                units += [((b,), "plain") for b in run] if mode == "plain" else [(run, mode)]
            choices.append(tuple(units))
    return [_option(p, units, grads_after) for units in dict.fromkeys(choices)]


def _grads_after(p: _Profile) -> list[int]:
    """Parameter gradients alive during each block's backward (those of this block and the ones after it)."""
    out, acc = [0] * len(p.costs), 0
    for b in reversed(range(len(p.costs))):
        acc += p.costs[b].param_bytes
        out[b] = acc
    return out


def _solve(p: _Profile, limit: int, options: list[list[_Option]]) -> tuple[list[_Option], int, float] | None:
    """Fastest choice of one option per segment whose modelled peak stays within ``limit`` bytes.

    Dynamic program over the segments in order; state = bytes kept by the segments so far, with the Pareto
    front of (kept, time) and the choices that led there. Returns (options, modelled peak, time) or None.
    """
    front: list[tuple[int, float, int, tuple]] = [(0, 0.0, 0, ())]  # kept, time, modelled peak, choices
    for seg_options in options:
        grown = []
        for kept, rtime, peak, chosen in front:
            for opt in seg_options:
                need = p.fixed_bytes + kept + opt.peak
                if need <= limit:
                    grown.append((kept + opt.kept, rtime + opt.time, max(peak, need), chosen + (opt,)))
        grown.sort(key=lambda s: (s[0], s[1]))
        front, best = [], math.inf
        for state in grown:
            if state[1] < best - 1e-12:
                front.append(state)
                best = state[1]
        if not front:
            return None
    kept, rtime, peak, chosen = min(front, key=lambda s: (s[1], s[2]))
    return list(chosen), peak, rtime


def _units_of(p: _Profile, groups: Sequence) -> tuple[tuple[tuple[int, ...], str], ...]:
    """The chain's units (block indices, mode) under the checkpoint groups of a policy."""
    index = {c.block: i for i, c in enumerate(p.costs)}
    first = {g.names[0]: g for g in groups}
    inside = {n for g in groups for n in g.names}
    units = []
    for i, c in enumerate(p.costs):
        if c.block in first:
            g = first[c.block]
            units.append((tuple(index[n] for n in g.names), g.mode))
        elif c.block not in inside:
            units.append(((i,), "plain"))
    return tuple(units)


def _policy_of(p: _Profile, chosen: Sequence[_Option]) -> tuple[PolicySpec, list[str]]:
    """The policy spec (and the checkpointed names) of one option per segment."""
    by_mode: dict[str, list] = {"full": [], "cheap": []}
    for (name, blocks), option in zip(p.segments, chosen):
        for unit, mode in option.units:
            if mode != "plain":
                unit_blocks = [p.costs[b].block for b in unit]
                by_mode[mode].append(name if len(unit) == len(blocks) else unit_blocks[0] if len(unit) == 1
                                     else unit_blocks)
    names = by_mode["full"] + by_mode["cheap"]
    if not names:
        return "none", []
    labels = [n if isinstance(n, str) else "+".join(n) for n in names]
    if not by_mode["cheap"]:
        return by_mode["full"], labels
    spec = [{"names": by_mode["full"]}] if by_mode["full"] else []
    return spec + [{"names": by_mode["cheap"], "mode": "cheap"}], labels


def _group_labels(groups: Sequence, segments: Sequence) -> list[str]:
    """A name per checkpoint group: its segments (or blocks), joined with '+' when it spans several."""
    whole = {s.blocks: s.name for s in segments}
    labels = []
    for g in groups:
        names, rest = [], list(g.names)
        for s in segments:
            if rest[: len(s.blocks)] == list(s.blocks):
                names.append(whole[s.blocks])
                rest = rest[len(s.blocks):]
        labels.append("+".join(names + rest))
    return labels


def _input_shape(network: nn.Module, spatial_shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    if not hasattr(network, "checkpoint_segments"):
        raise TypeError(f"plan() needs a monai_ckpt network (CheckpointUNet, CheckpointVNet, CheckpointDynUNet), "
                        f"got {type(network).__name__}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    dims = len(network.size_multiple())
    spatial = tuple(int(s) for s in spatial_shape)
    if len(spatial) != dims:
        raise ValueError(f"spatial_shape must have {dims} sizes for this {dims}D network, got {tuple(spatial_shape)}.")
    shape = (batch_size, network.in_channels, *spatial)
    network._check_input(torch.empty(shape, device="meta"))
    return shape


def _budget_bytes(budget_gb: float) -> int:
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not budget_gb > 0:
        raise ValueError(f"budget_gb must be a positive number of GiB, got {budget_gb!r}.")
    return int(budget_gb * GiB)


def _measured_peak(network: nn.Module, policy: PolicySpec, input_shape: tuple[int, ...], amp: bool,
                   optimizer: str) -> int:
    """Exact peak of one training step with ``policy`` (MemTracker on fake tensors: nothing is allocated)."""
    return measure_step_memory(lambda: _replica(network, policy), input_shape, estimate=True, amp=amp,
                               optimizer=optimizer).peak


class _Planner:
    """Profiles once, then answers: the measured peak of a policy, and the fastest policy under a budget."""

    def __init__(self, network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str,
                 timing: bool = True) -> None:
        self.network, self.input_shape, self.amp, self.optimizer = network, input_shape, amp, optimizer
        self.profile = _profile(network, input_shape, amp, optimizer, timing)
        self.grads_after = _grads_after(self.profile)
        self._peaks: dict[str, int] = {}
        # Calibrate the model's constant on two measured points, so that it is not below either.
        self.profile.fixed_bytes += max(self.peak(policy) - self.modelled_peak(policy) for policy in ("none", "all"))
        self.options = [_segment_options(self.profile, blocks, self.grads_after) for _, blocks in self.profile.segments]

    def peak(self, policy: PolicySpec) -> int:
        """Exact peak of one training step with ``policy`` (MemTracker on fake tensors)."""
        key = repr(policy)
        if key not in self._peaks:
            self._peaks[key] = _measured_peak(self.network, policy, self.input_shape, self.amp, self.optimizer)
        return self._peaks[key]

    def _modelled(self, policy: PolicySpec) -> _Option:
        groups = resolve_policy(policy, self.network.checkpoint_segments())
        return _option(self.profile, _units_of(self.profile, groups), self.grads_after)

    def modelled_peak(self, policy: PolicySpec) -> int:
        return self.profile.fixed_bytes + self._modelled(policy).peak

    def time_ratio(self, policy: PolicySpec) -> float:
        return 1.0 + self._modelled(policy).time

    def fastest(self, budget: int, tries: int = 6) -> tuple[PolicySpec, list[str]] | None:
        """The dynamic program's fastest choice whose measured peak fits ``budget``: the model's limit starts
        at the budget and moves by the measured excess (or slack) of each choice, bracketed, ``tries`` times."""
        lo, hi, limit = 0, math.inf, budget  # model limits known to give a fitting / a non-fitting choice
        best: tuple[float, PolicySpec, list[str]] | None = None
        for _ in range(tries):
            solved = _solve(self.profile, limit, self.options)
            if solved is None:
                lo = limit
                if hi - lo <= budget // 200:
                    break
                limit = min(hi, limit + budget // 20)
                continue
            chosen, _, rtime = solved
            policy, names = _policy_of(self.profile, chosen)
            measured = self.peak(policy)
            if measured <= budget:
                if best is None or rtime < best[0]:
                    best = (rtime, policy, names)
                lo = limit
                step = budget - measured
            else:
                hi = limit
                step = -(measured - budget) - budget // 200
            if abs(step) <= budget // 200 and measured <= budget:
                break
            limit = limit + step
            if not lo < limit < hi:
                limit = (lo + hi) // 2 if hi < math.inf else limit
            if hi - lo <= budget // 200:
                break
        return None if best is None else (best[1], best[2])

    def plan(self, budget: int) -> Plan:
        """The fastest choice of the dynamic program or of the fixed policies whose measured peak fits."""
        best = self.fastest(budget)
        best_time = self.time_ratio(best[0]) if best else math.inf
        segments = self.network.checkpoint_segments()
        for fixed in FIXED_POLICIES:  # never slower than a fixed policy that fits
            fixed_time = self.time_ratio(fixed)
            if fixed_time < best_time - 1e-9 and self.peak(fixed) <= budget:
                best, best_time = (fixed, _group_labels(resolve_policy(fixed, segments), segments)), fixed_time
        plain = self.peak("none")
        if best is None:
            policy, peak = self.smallest()
            raise ValueError(
                f"nothing fits {budget / GiB:.4g} GiB for input {self.input_shape} (amp={self.amp}, optimizer="
                f"{self.optimizer!r}): the smallest peak reachable is {_size(peak)}, with checkpoint_policy={policy!r} "
                f"(without checkpointing {_size(plain)}). Raise the budget, or reduce the batch or patch size, or use "
                "amp."
            )
        policy, names = best
        return Plan(policy, names, self.peak(policy), best_time, True, budget, plain, self.input_shape, self.amp,
                    self.optimizer)

    def smallest(self) -> tuple[PolicySpec, int]:
        """The policy with the smallest measured peak among the fixed policies, "all" with the top decoders
        split into blocks, and the model's least-memory choice."""
        candidates: list[PolicySpec] = list(FIXED_POLICIES)
        segments = self.network.checkpoint_segments()
        top = sorted((s for s in segments if s.kind == "decoder" and s.parts), key=lambda s: s.level)
        for k in (1, 2):  # the highest-resolution decoders block by block: their activations dominate the peak
            split = {s.name for s in top[:k]}
            candidates.append([n for s in segments for n in (s.parts if s.name in split else (s.name,))])
        lo, hi = self.profile.fixed_bytes, self.peak("none")
        least = None
        while hi - lo > max(1, hi // 1000):  # the least modelled peak, by bisection on the model budget
            mid = (lo + hi) // 2
            solved = _solve(self.profile, mid, self.options)
            if solved is None:
                lo = mid
            else:
                hi, least = mid, solved[0]
        if least is not None:
            candidates.append(_policy_of(self.profile, least)[0])
        modelled = {repr(c): (self.modelled_peak(c), c) for c in candidates}
        least = min(m for m, _ in modelled.values())
        # measure only the candidates the model puts near the least (it is within ~15% of the measurement)
        measured = [(self.peak(c), c) for m, c in modelled.values() if m <= 1.2 * least]
        peak, policy = min(measured, key=lambda pc: pc[0])
        return policy, peak


def plan(
    network: nn.Module,
    spatial_shape: Sequence[int],
    budget_gb: float,
    *,
    batch_size: int = 1,
    amp: bool = False,
    optimizer: str = "adam",
) -> Plan:
    """The fastest checkpoint policy with which one training step of ``network`` fits in ``budget_gb``.

    Args:
        network: a monai_ckpt network (CheckpointUNet, CheckpointVNet, CheckpointDynUNet); it is not changed.
        spatial_shape: the patch, (D, H, W) or (H, W); channels come from the network.
        budget_gb: memory for one whole training step (forward, backward, optimizer step), in GiB.
        batch_size: patches per step.
        amp: the forward runs under autocast (bf16 on CPU, fp16 on CUDA).
        optimizer: ``"adam"`` (two states per parameter), ``"sgd"`` or ``"none"``.

    Returns:
        a `Plan`; ``plan.policy`` goes to ``network.checkpoint_policy``.

    Raises:
        ValueError: when nothing fits (the message gives the smallest peak reachable and its policy), and for
            a shape the network cannot take or a non-positive budget.

    Example::

        net = CheckpointUNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
        p = plan(net, (256, 256, 256), budget_gb=8, batch_size=2)
        net.checkpoint_policy = p.policy
    """
    budget = _budget_bytes(budget_gb)
    input_shape = _input_shape(network, spatial_shape, batch_size)
    make_optimizer(nn.Linear(1, 1), optimizer)  # a clear error for an unknown optimizer
    plain = _measured_peak(network, "none", input_shape, amp, optimizer)
    if plain <= budget:
        return Plan("none", [], plain, 1.0, True, budget, plain, input_shape, amp, optimizer)
    planner = _Planner(network, input_shape, amp, optimizer)
    planner._peaks[repr("none")] = plain
    return planner.plan(budget)


def plan_for_network(network: nn.Module, x: torch.Tensor, amp: bool, spec: dict) -> Plan:
    """The plan a network with a ``{"budget_gb": X}`` policy uses for the training input ``x``. Under
    torch.distributed, rank 0 plans and every rank uses its plan, so that all ranks run the same policy."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    result: list = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            result[0] = plan(network, tuple(x.shape[2:]), spec["budget_gb"], batch_size=int(x.shape[0]), amp=amp,
                             optimizer=spec.get("optimizer", "adam"))
        except ValueError as error:
            result[0] = error
    if distributed:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], Exception):
        raise result[0]
    _log.info("checkpoint_policy %r for input %s: %s", spec, tuple(x.shape), str(result[0]).replace("\n", "; "))
    return result[0]


# --- capacity ------------------------------------------------------------------------------------------------

DEFAULT_BUDGETS_GB = (8, 10, 12, 16, 24, 32, 40, 48, 80)


class _Capacity:
    """Peaks of one network at many sizes, for one policy: exact (fake-tensor MemTracker) measurements, with
    a straight line through two of them (activations grow with the voxels) to guess where to measure."""

    def __init__(self, network: nn.Module, policy: PolicySpec, amp: bool, optimizer: str) -> None:
        self.network, self.policy, self.amp, self.optimizer = network, policy, amp, optimizer
        self._peaks: dict[tuple[int, ...], int] = {}

    def peak(self, input_shape: tuple[int, ...]) -> int:
        if input_shape not in self._peaks:
            self._peaks[input_shape] = _measured_peak(self.network, self.policy, input_shape, self.amp, self.optimizer)
        return self._peaks[input_shape]

    def largest(self, sizes: Sequence[int], shape_of: Callable[[int], tuple[int, ...]], budget: int) -> int:
        """The largest of the increasing ``sizes`` whose input ``shape_of(size)`` fits ``budget`` (0 if none)."""
        if not sizes or self.peak(shape_of(sizes[0])) > budget:
            return 0
        i0, i1 = 0, min(len(sizes) - 1, max(1, len(sizes) // 8))
        v0, v1 = (math.prod(shape_of(sizes[i])) for i in (i0, i1))
        slope = (self.peak(shape_of(sizes[i1])) - self.peak(shape_of(sizes[i0]))) / max(1, v1 - v0)
        base = self.peak(shape_of(sizes[i0])) - slope * v0
        i = max((k for k, size in enumerate(sizes) if base + slope * math.prod(shape_of(size)) <= budget), default=0)
        while i + 1 < len(sizes) and self.peak(shape_of(sizes[i + 1])) <= budget:
            i += 1
        while i > 0 and self.peak(shape_of(sizes[i])) > budget:
            i -= 1
        return sizes[i]


def _least_memory_policy(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str) -> PolicySpec:
    return _Planner(network, input_shape, amp, optimizer, timing=False).smallest()[0]


def _edges(network: nn.Module, max_edge: int) -> list[int]:
    dims = len(network.size_multiple())
    step = math.lcm(*network.size_multiple())
    # from two steps up: at one step the deepest level is a single voxel, which instance norm cannot train on
    return [e for e in range(2 * step, max_edge + 1, step) if network._accepts((e,) * dims)]


def _reference_edge(edges: Sequence[int]) -> int:
    """A patch edge at which to choose the least-memory policy: ~256, where activations dominate the peak as
    they do at the patch sizes a capacity search ends at (at ~96 the fixed costs weigh more, and the policy
    chosen there keeps more at large patches: 432^3 instead of 464^3 in 8 GiB for the benchmark UNet)."""
    return min(edges, key=lambda e: abs(e - 256))


def max_patch_edge(
    network: nn.Module,
    budget_gb: float,
    *,
    checkpointing: bool = True,
    batch_size: int = 1,
    amp: bool = False,
    optimizer: str = "adam",
    max_edge: int = 1024,
) -> int:
    """The largest cubic (square in 2D) patch edge the network takes whose training step fits ``budget_gb``.

    With ``checkpointing`` the policy is the one with the smallest peak (as in `plan`'s error message), so
    the edge is the largest that fits with some policy; `plan` then finds the fastest policy for it. Returns 0
    when not even the smallest patch fits.
    """
    budget = _budget_bytes(budget_gb)
    edges = _edges(network, max_edge)
    dims = len(network.size_multiple())
    shape_of = lambda e: _input_shape(network, (e,) * dims, batch_size)
    policy = _least_memory_policy(network, shape_of(_reference_edge(edges)), amp, optimizer) if checkpointing else "none"
    return _Capacity(network, policy, amp, optimizer).largest(edges, shape_of, budget)


def max_batch_size(
    network: nn.Module,
    spatial_shape: Sequence[int],
    budget_gb: float,
    *,
    checkpointing: bool = True,
    amp: bool = False,
    optimizer: str = "adam",
    max_batch: int = 1024,
) -> int:
    """The largest batch of ``spatial_shape`` patches whose training step fits ``budget_gb`` (0 if none)."""
    budget = _budget_bytes(budget_gb)
    shape_of = lambda b: _input_shape(network, spatial_shape, b)
    policy = _least_memory_policy(network, shape_of(1), amp, optimizer) if checkpointing else "none"
    return _Capacity(network, policy, amp, optimizer).largest(list(range(1, max_batch + 1)), shape_of, budget)


def capacity_table(
    network: nn.Module,
    budgets_gb: Sequence[float] = DEFAULT_BUDGETS_GB,
    *,
    batch_size: int = 1,
    optimizer: str = "adam",
    max_edge: int = 1024,
) -> list[dict]:
    """For each budget, the largest cubic patch edge without and with checkpointing, each without and with
    AMP: rows ``{"budget_gb", "plain", "checkpointed", "plain_amp", "checkpointed_amp", "max_edge"}`` (0: nothing
    fits; ``max_edge``: the largest edge searched)."""
    for budget in budgets_gb:
        _budget_bytes(budget)
    edges = _edges(network, max_edge)
    dims = len(network.size_multiple())
    shape_of = lambda e: _input_shape(network, (e,) * dims, batch_size)
    reference = shape_of(_reference_edge(edges))
    columns = {}
    for amp in (False, True):
        columns[("plain", amp)] = _Capacity(network, "none", amp, optimizer)
        columns[("checkpointed", amp)] = _Capacity(network, _least_memory_policy(network, reference, amp, optimizer),
                                                   amp, optimizer)
    return [
        {"budget_gb": budget, **{name + ("_amp" if amp else ""): capacity.largest(edges, shape_of, int(budget * GiB))
                                 for (name, amp), capacity in columns.items()}, "max_edge": edges[-1]}
        for budget in budgets_gb
    ]


def format_capacity_table(rows: Sequence[dict], dims: int = 3) -> str:
    """A markdown table of `capacity_table` rows: the largest patch per budget."""
    def cell(edge: int, row: dict) -> str:
        text = "-" if not edge else "x".join([str(edge)] * dims)
        return f">= {text}" if edge and edge == row.get("max_edge") else text  # the search's upper end

    lines = ["| budget (GiB) | no checkpointing | checkpointing | AMP | checkpointing + AMP |", "|---|---|---|---|---|"]
    lines += [f"| {r['budget_gb']} | " + " | ".join(cell(r[k], r) for k in ("plain", "checkpointed", "plain_amp",
                                                                            "checkpointed_amp")) + " |" for r in rows]
    return "\n".join(lines)
