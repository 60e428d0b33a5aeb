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

Only when no such policy fits does it search the opt-in nested mode (`_Planner.smallest` with ``nested``): groups
whose recomputation checkpoints runs of their blocks again, each candidate measured.

The model is then checked against the measurement it stands for: the chosen policy's whole training step is
run under MemTracker on fake tensors (exact live-tensor bytes, see DESIGN.md), and the model's budget is
tightened until that measured peak fits. The plan's ``predicted_peak_bytes`` is this measured figure; the
fixed policies are measured too and the plan is never slower than the fastest one that fits.

Sizes are in GiB (2**30 bytes), as GPU memory is counted.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import math
import statistics
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .policies import PolicySpec, resolve_policy
from .profiling import (
    BlockCost,
    LabelBatch,
    LossMemory,
    LossStandIn,
    block_costs,
    device_clock,
    loss_memory,
    make_optimizer,
    mean_square,
    measure_step_memory,
    training_step,
)
from .profiling import replica as _replica

__all__ = ["FIXED_POLICIES", "Plan", "capacity_table", "max_batch_size", "max_patch_edge", "plan", "planning_loss"]

GiB = 2**30
_log = logging.getLogger(__name__)
FIXED_POLICIES: tuple[PolicySpec, ...] = ("none", "cheap", "all", "blocks", "sqrt", "encoder", "decoder",
                                          {"every": 2})
GRAD_FACTOR = 1.5  # gradient working set of a block's backward, in units of its input + output bytes
TIME_VOXELS = 48**3  # largest batch x volume timed for real when planning: time ratios vary little with size
TIME_QUANTUM = 0.002  # recompute times are rounded to this fraction of a step: timing noise below it cannot
# change a plan, and equal sums tie exactly (ties are then broken by the smaller peak, then the policy's text)
CUDA_HEADROOM_FRACTION = 0.10  # default CUDA headroom: this fraction of the budget (caching-allocator
CUDA_HEADROOM_MIN_GB = 0.25  # rounding and fragmentation) and at least this much (cuDNN workspaces); see docs


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
        loss: the loss of the planned step (``"mean(out**2)"`` when none was given) and how its memory was
            measured.
        label_shape: the label batch the loss took (None for the default loss).
        device: where the network trains (times were measured there).
        headroom_bytes: what the budget keeps back for what the device adds beyond live tensors (CUDA: the
            caching allocator's rounding and fragmentation, cuDNN workspaces); tensors are planned into
            ``budget_bytes - headroom_bytes``.
        expected_allocated_bytes: what ``torch.cuda.max_memory_allocated`` should report for the step (the
            live-tensor peak).
        expected_reserved_bytes: what ``torch.cuda.max_memory_reserved`` should stay under (peak + headroom).
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
    loss: str = "mean(out**2)"
    label_shape: tuple[int, ...] | None = None
    device: str = "cpu"
    headroom_bytes: int = 0
    expected_allocated_bytes: int = field(default=0)
    expected_reserved_bytes: int = field(default=0)

    def __post_init__(self) -> None:
        self.expected_allocated_bytes = self.expected_allocated_bytes or self.predicted_peak_bytes
        self.expected_reserved_bytes = self.expected_reserved_bytes or self.predicted_peak_bytes + self.headroom_bytes

    def __str__(self) -> str:
        headroom = (f", headroom {_size(self.headroom_bytes)} (tensors get {_size(self.budget_bytes - self.headroom_bytes)})"
                    if self.headroom_bytes else "")
        return "\n".join([
            f"input {self.input_shape}, budget {_size(self.budget_bytes)}{headroom}, amp={self.amp}, "
            f"optimizer={self.optimizer}, device={self.device}",
            f"loss: {self.loss}" + (f", label batch {self.label_shape}" if self.label_shape else ""),
            f"without checkpointing: peak {_size(self.plain_peak_bytes)}",
            f"plan: peak {_size(self.predicted_peak_bytes)} ({'fits' if self.fits else 'does NOT fit'}), "
            f"step time x{self.predicted_time_ratio:.2f}",
            f"expected: allocated {_size(self.expected_allocated_bytes)}, reserved <= "
            f"{_size(self.expected_reserved_bytes)}",
            f"checkpointed: {', '.join(self.checkpointed) or 'nothing'}",
            f"checkpoint_policy = {self.policy!r}",
        ])


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


# --- profile ---------------------------------------------------------------------------------------------


@dataclass
class _Step:
    """The training step planned: the loss a measured step runs (None: ``mean(out**2)``; a `LossStandIn` for a
    loss that cannot run on fake tensors), the user's own loss (timed on real tensors), the label batch, the
    loss's memory (for the model) and a description."""

    loss: Callable | None
    user_loss: Callable | None
    label: LabelBatch | None
    memory: LossMemory
    description: str

    @property
    def key(self) -> tuple:
        return (id(self.user_loss), self.label)


def _parameter_device(network: nn.Module) -> torch.device:
    return next((p.device for p in network.parameters()), torch.device("cpu"))


def _training_output(network: nn.Module, input_shape: tuple[int, ...], amp: bool) -> Any:
    """The network's training output for ``input_shape``, as fake tensors (shapes and dtypes only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = _parameter_device(network)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    with FakeTensorMode(), torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
        return _replica(network, "none").train()(torch.randn(input_shape, device=device))


def _label_batch(label: Any, input_shape: tuple[int, ...], channels: int, dims: int) -> LabelBatch:
    """The label batch a description stands for: ``"index"``, ``"channels"``, or an example (tensor or
    `LabelBatch`) whose batch and spatial sizes are the input's and whose channels are 1 or the output's."""
    batch, spatial = input_shape[0], tuple(input_shape[2:])
    if isinstance(label, str) and label in ("index", "channels"):
        if label == "index":
            return LabelBatch((batch, 1, *spatial), torch.int64)
        return LabelBatch((batch, channels, *spatial), torch.float32)
    if not isinstance(label, (torch.Tensor, LabelBatch)):
        raise ValueError(f"label must be 'index' (class indices, (B, 1, *spatial), int64), 'channels' (one channel per "
                         f"class, (B, {channels}, *spatial), float32) or an example tensor, got {label!r}.")
    shape, dtype = tuple(int(n) for n in label.shape), label.dtype
    want = f"(batch {batch}, 1 or {channels} channels, {', '.join(map(str, spatial))})"
    if len(shape) != dims + 2 or shape[0] != batch or shape[2:] != spatial:
        raise ValueError(f"the label batch has shape {shape} but the input is {input_shape}: it should be {want}.")
    if shape[1] not in (1, channels):
        raise ValueError(f"the label batch has {shape[1]} channels but the network outputs {channels} classes: give "
                         f"1 channel (class indices) or {channels} (one per class), shape {want}.")
    return LabelBatch(shape, dtype)


def _make_step(network: nn.Module, input_shape: tuple[int, ...], amp: bool, loss: Callable | None,
               label: Any) -> _Step:
    out = _training_output(network, input_shape, amp)
    dims = len(input_shape) - 2
    first = out[0] if isinstance(out, (list, tuple)) else out
    if loss is None:
        memory = loss_memory(mean_square, tuple(first.shape), LabelBatch((1,)), spatial_dims=dims,
                             out_dtype=first.dtype, amp=amp)
        return _Step(None, None, None, memory, "mean(out**2) (the default: give loss= for your own)")
    if not callable(loss):
        raise ValueError(f"loss must be a callable loss(output, label), e.g. monai.losses.DiceCELoss(to_onehot_y=True, "
                         f"softmax=True), got {loss!r}.")
    if not isinstance(first, torch.Tensor) or first.ndim < dims + 2:
        raise ValueError(f"the network's training output is {type(out).__name__}; plan(loss=...) needs a tensor output.")
    batch = _label_batch(label, input_shape, int(first.shape[-dims - 1]), dims)
    memory = loss_memory(loss, tuple(first.shape), batch, spatial_dims=dims, out_dtype=first.dtype, amp=amp)
    measured = loss if memory.method == "fake tensors" else LossStandIn(memory)
    name = getattr(loss, "__name__", None) or type(loss).__name__
    return _Step(measured, loss, batch, memory, f"{name} (memory: {memory.method})")


@dataclass
class _Profile:
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


def _step_seconds(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str,
                  device: torch.device, step: _Step, runs: int = 4) -> float:
    """Median time of a plain training step (the user's loss included) on ``device``, after a warm-up step:
    process CPU time on the CPU, CUDA events on CUDA."""
    model = _replica(network, "none").train().to(device)
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


def _quantized(fractions: list[float]) -> list[float]:
    return [round(f / TIME_QUANTUM) * TIME_QUANTUM for f in fractions]


def _profile(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str, timing: bool,
             step: _Step | None = None, device: torch.device | None = None) -> _Profile:
    step = step or _make_step(network, input_shape, amp, None, None)
    device = device or torch.device("cpu")
    costs = block_costs(lambda: _replica(network, "none"), input_shape, estimate=True, amp=amp)
    zeros = [0.0] * len(costs)
    recompute_s, tail_s = {"full": zeros, "cheap": zeros}, {"full": zeros, "cheap": zeros}
    if timing:  # recompute time of each block as a fraction of a plain training step, on the network's device
        time_shape = _time_shape(input_shape, network.size_multiple())
        timed = block_costs(lambda: _replica(network, "none"), time_shape, amp=amp, repeats=2, device=device)
        step_s = _step_seconds(network, time_shape, amp, optimizer, device, step)
        recompute_s = {"full": _quantized([c.forward_s / step_s for c in timed]),
                       "cheap": _quantized([c.cheap_recompute_s / step_s for c in timed])}
        tail_s = {"full": _quantized([c.tail_s / step_s for c in timed]),
                  "cheap": _quantized([c.cheap_tail_s / step_s for c in timed])}
    names = [c.segment for c in costs]
    segments = [(name, [i for i, n in enumerate(names) if n == name]) for name in dict.fromkeys(names)]
    param_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    opt_states = {"adam": 2, "sgd": 0, "none": 0}.get(optimizer, 2)
    label_bytes = 0 if step.label is None else math.prod(step.label.shape) * step.label.make("meta").element_size()
    return _Profile(
        costs=costs,
        segments=segments,
        items=_items(network, costs),
        fixed_bytes=(1 + opt_states) * param_bytes + math.prod(input_shape) * 4 + label_bytes,
        recompute_s=recompute_s,
        tail_s=tail_s,
        loss_bytes=max(step.memory.forward_peak, step.memory.backward_peak),
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


def _undominated(options: list[_Option]) -> list[_Option]:
    """The options no other option beats or ties on all of kept bytes, backward peak and recompute time (in their
    order). The dynamic program needs only these: swapping a dominated option for its better keeps a choice
    admissible and no slower. A segment of many blocks (SegResNet's bottleneck: 9) has ~10^5 options, a few of them
    undominated."""
    front: list[tuple[int, _Option]] = []
    for i, opt in sorted(enumerate(options), key=lambda o: (o[1].time, o[1].kept, o[1].peak, o[0])):
        if not any(f.kept <= opt.kept and f.peak <= opt.peak for _, f in front):
            front.append((i, opt))
    return [opt for _, opt in sorted(front, key=lambda f: f[0])]


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
    # the loss runs on top of everything the forward kept
    ends = [(kept, rtime, max(peak, p.fixed_bytes + kept + p.loss_bytes), chosen) for kept, rtime, peak, chosen in front
            if p.fixed_bytes + kept + p.loss_bytes <= limit]
    if not ends:
        return None
    kept, rtime, peak, chosen = min(ends, key=lambda s: (round(s[1], 9), s[2]))
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
    return _policy_of_units(p, [unit for option in chosen for unit in option.units])


def _policy_of_units(p: _Profile, units: Sequence[tuple[tuple[int, ...], str]]) -> tuple[PolicySpec, list[str]]:
    """The policy spec (and the checkpointed names) of units of the whole chain: a unit of whole segments names
    them, a unit of one block names the block, other units are inner lists (runs across segment boundaries
    included)."""
    segment_of = {b: name for name, blocks in p.segments for b in blocks}
    blocks_of = dict(p.segments)
    by_mode: dict[str, list] = {"full": [], "cheap": []}
    for unit, mode in units:
        if mode == "plain":
            continue
        entries, i = [], 0
        while i < len(unit):
            seg = blocks_of[segment_of[unit[i]]]
            if list(unit[i : i + len(seg)]) == seg:
                entries.append(segment_of[unit[i]])
                i += len(seg)
            else:
                entries.append(p.costs[unit[i]].block)
                i += 1
        by_mode[mode].append(entries[0] if len(entries) == 1 else entries)
    names = by_mode["full"] + by_mode["cheap"]
    if not names:
        return "none", []
    labels = [n if isinstance(n, str) else "+".join(n) for n in names]
    if not by_mode["cheap"]:
        return by_mode["full"], labels
    spec = [{"names": by_mode["full"]}] if by_mode["full"] else []
    return spec + [{"names": by_mode["cheap"], "mode": "cheap"}], labels


def _merge_deep(p: _Profile, units: tuple, level: int) -> tuple:
    """``units`` with every run of consecutive checkpointed units whose blocks are all at ``level`` or deeper
    merged into one fully recomputed run."""
    out: list = []
    for blocks, mode in units:
        deep = mode != "plain" and all(p.costs[b].level >= level for b in blocks)
        if deep and out and out[-1][1] == "deep":
            out[-1] = (out[-1][0] + blocks, "deep")
        else:
            out.append((blocks, "deep" if deep else mode))
    return tuple((blocks, "full" if mode == "deep" else mode) for blocks, mode in out)


def _neighbours(units: tuple) -> Iterator[tuple]:
    """Policies one move away (as units of the whole chain): change a unit's mode, split a checkpointed unit,
    merge two neighbouring units into one checkpointed run (across segment boundaries too), move a cut between
    two checkpointed runs by one block."""
    units = list(units)
    for i, (blocks, mode) in enumerate(units):
        for other in ("plain", "full", "cheap"):
            if other != mode:
                new = [((b,), "plain") for b in blocks] if other == "plain" else [(blocks, other)]
                yield tuple(units[:i] + new + units[i + 1 :])
        if mode != "plain":
            for k in range(1, len(blocks)):
                yield tuple(units[:i] + [(blocks[:k], mode), (blocks[k:], mode)] + units[i + 1 :])
        if i + 1 < len(units):
            (nxt, nmode) = units[i + 1]
            for merged in {mode, nmode} - {"plain"} or {"full"}:
                yield tuple(units[:i] + [(blocks + nxt, merged)] + units[i + 2 :])
            if mode != "plain" and nmode != "plain":
                if len(blocks) > 1:
                    yield tuple(units[:i] + [(blocks[:-1], mode), (blocks[-1:] + nxt, nmode)] + units[i + 2 :])
                if len(nxt) > 1:
                    yield tuple(units[:i] + [(blocks + nxt[:1], mode), (nxt[1:], nmode)] + units[i + 2 :])


def _nested_spec(p: _Profile, units: Sequence[tuple[tuple[int, ...], str]],
                 nested: Sequence[tuple[tuple[int, ...], ...]]) -> PolicySpec:
    """The policy of ``units`` (as `_policy_of_units`) plus ``nested`` groups, each given by its inner runs (block
    indices): ``{"names": [[run, run, ...], ...], "mode": "nested"}`` next to the non-nested groups."""
    spec, _ = _policy_of_units(p, units)
    if not nested:
        return spec
    spec = [] if spec == "none" else [{"names": spec}] if isinstance(spec[0], (str, list)) else list(spec)
    groups = [[[p.costs[b].block for b in run] for run in runs] for runs in nested]
    return spec + [{"names": groups, "mode": "nested"}]


def _nesting_moves(p: _Profile, outer: list[tuple[tuple[int, ...], ...]]) -> Iterator[list]:
    """Nested policies one move away, highest resolution first: two neighbouring fully recomputed groups become
    one group whose recomputation checkpoints them again (their runs become its inner runs), or an inner run is
    split into its segments, or (a short one) into its blocks."""
    level = {i: min(p.costs[b].level for run in runs for b in run) for i, runs in enumerate(outer)}
    moves = []
    for i in range(len(outer) - 1):
        if outer[i][-1][-1] + 1 == outer[i + 1][0][0]:
            moves.append((max(level[i], level[i + 1]), 0, outer[:i] + [outer[i] + outer[i + 1]] + outer[i + 2:]))
    for i, runs in enumerate(outer):
        if len(runs) == 1:
            continue
        for k, run in enumerate(runs):
            segments = [tuple(b for b in run if p.costs[b].segment == name) for name in
                        dict.fromkeys(p.costs[b].segment for b in run)]
            for split in {tuple(segments), tuple((b,) for b in run) if len(run) <= 3 else ()}:
                if len(split) > 1:
                    moves.append((level[i], 1, outer[:i] + [runs[:k] + split + runs[k + 1:]] + outer[i + 1:]))
    for _, _, move in sorted(moves, key=lambda m: m[:2]):
        yield move


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
                   optimizer: str, step: _Step | None = None) -> int:
    """Exact peak of one training step with ``policy`` (MemTracker on fake tensors: nothing is allocated)."""
    return measure_step_memory(lambda: _replica(network, policy), input_shape, estimate=True, amp=amp,
                               optimizer=optimizer, loss=step.loss if step else None,
                               label=step.label if step else None, device=_parameter_device(network)).peak


def _network_key(network: nn.Module) -> tuple:
    """What a plan depends on in a network: its structure and parameter shapes (not its weights)."""
    return (type(network).__qualname__, repr(network),
            tuple((tuple(t.shape), str(t.dtype)) for t in network.parameters()))


_LEAST: dict[tuple, list[PolicySpec]] = {}  # per network: least-memory policies found so far, tried at every shape


def _spec_text(policy: PolicySpec) -> str:
    import json

    return json.dumps(policy, sort_keys=True)


class _Planner:
    """Profiles once (on first use), then answers: the measured peak of a policy, the model's peak and time,
    and the fastest policy under a budget. Every policy it measures is a candidate of every plan it makes."""

    def __init__(self, network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str,
                 timing: bool = True, step: _Step | None = None, device: torch.device | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.network, self.input_shape, self.amp, self.optimizer = network, input_shape, amp, optimizer
        self.timing, self.device = timing, device or torch.device("cpu")
        self.step = step or _make_step(network, input_shape, amp, None, None)
        self.progress = progress or (lambda message: None)
        self._peaks: dict[str, int] = {}
        self._policies: dict[str, PolicySpec] = {}
        self._profile: _Profile | None = None
        self._smallest: tuple[PolicySpec, int] | None = None
        self._smallest_nested_found: tuple[PolicySpec, int] | None = None
        self._smallest_nested_done = False
        self._nested_search: tuple[list, list] = ([], [])  # outer groups and other units where the search stopped

    @property
    def profile(self) -> _Profile:
        if self._profile is None:
            self.progress(f"profiling the blocks at {self.input_shape}" + (" and timing them" if self.timing else ""))
            self._profile = _profile(self.network, self.input_shape, self.amp, self.optimizer, self.timing, self.step,
                                     self.device)
            self.grads_after = _grads_after(self._profile)
            # Calibrate the model on two measured points. Without checkpointing the loss is where the step peaks
            # (everything the forward kept is alive): the loss term is set so that this point equals the
            # measurement; then the constant so that the model is not below either point.
            plain = _option(self._profile, self._units("none"), self.grads_after)
            self._profile.loss_bytes += min(0, self.peak("none") - self._profile.fixed_bytes - plain.kept
                                            - self._profile.loss_bytes)
            self._profile.fixed_bytes += max(self.peak(policy) - self.modelled_peak(policy) for policy in ("none", "all"))
            self.options = [_undominated(_segment_options(self._profile, blocks, self.grads_after))
                            for _, blocks in self._profile.segments]
        return self._profile

    def peak(self, policy: PolicySpec) -> int:
        """Exact peak of one training step with ``policy`` (MemTracker on fake tensors)."""
        key = _spec_text(policy)
        if key not in self._peaks:
            self._peaks[key] = _measured_peak(self.network, policy, self.input_shape, self.amp, self.optimizer,
                                              self.step)
            self._policies[key] = policy
        return self._peaks[key]

    def _units(self, policy: PolicySpec) -> tuple:
        return _units_of(self.profile, resolve_policy(policy, self.network.checkpoint_segments()))

    def _units_peak(self, units: tuple) -> int:
        option = _option(self.profile, units, self.grads_after)
        return self.profile.fixed_bytes + max(option.peak, option.kept + self.profile.loss_bytes)

    def modelled_peak(self, policy: PolicySpec) -> int:
        return self._units_peak(self._units(policy))

    def time_ratio(self, policy: PolicySpec) -> float:
        """The model's step time with ``policy`` as a ratio to the plain step; a nested group's inner runs add
        their recomputation once more."""
        p = self.profile
        groups = resolve_policy(policy, self.network.checkpoint_segments())
        index = {c.block: i for i, c in enumerate(p.costs)}
        extra = sum(sum(p.recompute_s["full"][index[n]] for n in run) - p.tail_s["full"][index[run[-1]]]
                    for g in groups for run in g.inner)
        return 1.0 + _option(p, _units_of(p, groups), self.grads_after).time + extra

    def fastest(self, budget: int, tries: int = 5) -> tuple[PolicySpec, list[str]] | None:
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

    def _fastest_measured(self, limit: int) -> PolicySpec | None:
        """Of every policy measured so far, the fastest (by the model) whose peak fits; ties go to the smaller
        peak, then to the policy's text: the same measurements always give the same answer."""
        self.profile  # noqa: B018 - profiled (and calibrated: two more measurements) before the candidates are read
        fitting = [(round(self.time_ratio(policy), 6), self._peaks[key], key, policy)
                   for key, policy in list(self._policies.items())
                   if self._peaks[key] <= limit and '"nested"' not in key]  # nesting: only when nothing else fits
        return min(fitting, key=lambda f: f[:3])[3] if fitting else None

    def plan(self, budget: int, headroom: int = 0) -> Plan:
        """The fastest policy whose measured peak fits ``budget - headroom``: the dynamic program's choices, the
        fixed policies and the least-memory search's candidates are all candidates."""
        limit = budget - headroom
        plain = self.peak("none")
        extras = (self.step.description, self.step.label.shape if self.step.label else None, str(self.device), headroom)
        if plain <= limit:
            return Plan("none", [], plain, 1.0, True, budget, plain, self.input_shape, self.amp, self.optimizer, *extras)
        self.progress(f"searching the fastest policy under {_size(limit)}")
        tight = limit < self.peak("all")  # below "all": the least-memory search's ground, which tries these too
        found = self.fastest(limit, tries=3 if tight else 5)
        best_time = self.time_ratio(found[0]) if found else math.inf
        for fixed in () if tight else FIXED_POLICIES:  # never slower than a fixed policy that fits (the model is
            # within ~10% of the measured peak: one it puts further above the budget is not measured)
            if self.time_ratio(fixed) < best_time - 1e-9 and self.modelled_peak(fixed) <= 1.1 * limit:
                self.peak(fixed)
        if self._fastest_measured(limit) is None:
            self.progress(f"nothing measured fits {_size(limit)} yet: searching the least-memory policy")
            least, peak = self.smallest(hopeless=limit)
            if tight and peak <= limit:
                # something fits, but the model's error at this budget outran three brackets (AttentionUnet at
                # 128^3: 0.17 GiB): bracket further, the least-memory policy is the fallback
                self.fastest(limit, tries=8)
        policy = self._fastest_measured(limit)
        if policy is None and peak > limit >= 0.5 * peak:
            # the opt-in nested mode, only now that no policy recomputing each block at most once fits
            self.progress(f"nothing without nesting fits {_size(limit)}: searching nested policies")
            least, peak = self.smallest(nested=True, stop_at=limit)
            policy = least if peak <= limit else None
        if policy is None:
            raise ValueError(
                f"nothing fits {budget / GiB:.4g} GiB" + (f" ({_size(limit)} for tensors after {_size(headroom)} "
                                                          "headroom)" if headroom else "")
                + f" for input {self.input_shape} (amp={self.amp}, optimizer={self.optimizer!r}, loss "
                f"{self.step.description}): the smallest peak reachable is {_size(peak)}, with "
                f"checkpoint_policy={least!r} (without checkpointing {_size(plain)}). Raise the budget, or reduce the "
                "batch or patch size, or use amp."
            )
        segments = self.network.checkpoint_segments()
        names = [] if policy == "none" else _group_labels(resolve_policy(policy, segments), segments)
        ratio = 1.0 if policy == "none" else self.time_ratio(policy)
        return Plan(policy, names, self.peak(policy), ratio, True, budget, plain, self.input_shape, self.amp,
                    self.optimizer, *extras)

    def smallest(self, rounds: int = 4, per_round: int = 2, hopeless: int | None = None, nested: bool = False,
                 stop_at: int | None = None, measurements: int = 24) -> tuple[PolicySpec, int]:
        """The policy with the smallest measured peak: the least of the fixed policies, "all" with the top
        decoders split into blocks, the model's least-memory choice and the least-memory policies found for this
        network at other shapes; then a local search from the least of them (change a mode, split, merge runs
        across segment boundaries, move a cut), each round measuring the ``per_round`` moves the model ranks
        lowest, until no move lowers the measured peak.

        With ``nested`` (the opt-in mode ``"nested"``), from that policy on: a greedy search over nested groups
        (`_nesting_moves`, highest resolution first, each measured; the first move that lowers the peak is
        taken) until no move helps, the peak is at most ``stop_at`` bytes, or ``measurements`` are spent.
        Returns the least found, nested or not."""
        if nested:
            return self._smallest_nested(stop_at, measurements)
        if self._smallest is not None:
            return self._smallest
        candidates: list[PolicySpec] = list(FIXED_POLICIES) + list(_LEAST.get(_network_key(self.network), []))
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
        modelled = sorted({_spec_text(c): (self.modelled_peak(c), _spec_text(c), c) for c in candidates}.values(),
                          key=lambda m: m[:2])
        # measure the candidates the model puts near the least (it is within ~15% of the measurement)
        measured = [(self.peak(c), _spec_text(c), c) for m, _, c in modelled[:4] if m <= 1.2 * modelled[0][0]]
        measured += [(self.peak(c), _spec_text(c), c) for c in candidates if _spec_text(c) in self._peaks]
        peak, _, policy = min(measured, key=lambda m: m[:2])
        if hopeless is not None and hopeless < 0.5 * peak:  # no move saves half: the search would not change the answer
            return policy, peak
        units = self._units(policy)
        # the deep levels as one run (what passes between their groups is then not kept): measured whatever the
        # model says, which cannot tell these apart (it counts a run's boundaries, not what its backward holds)
        for level in sorted({c.level for c in self.profile.costs}, reverse=True)[1:-1]:
            deep = _merge_deep(self.profile, units, level)
            spec = _policy_of_units(self.profile, deep)[0]
            if self.peak(spec) < peak:
                peak, policy, units = self.peak(spec), spec, deep
        for _ in range(rounds):
            moves = {}
            for nxt in _neighbours(units):
                spec = _policy_of_units(self.profile, nxt)[0]
                if _spec_text(spec) not in self._peaks:
                    kept = _option(self.profile, nxt, self.grads_after).kept  # among equal peaks: keeps less
                    moves.setdefault(_spec_text(spec), (self._units_peak(nxt), kept, _spec_text(spec), spec, nxt))
            tried = [(peak_, text, spec, nxt) for peak_, _, text, spec, nxt in
                     sorted(moves.values(), key=lambda m: m[:3])[:per_round]]
            if not tried:
                break
            self.progress(f"least-memory search: {_size(peak)} so far, measuring {len(tried)} neighbours")
            better = min(((self.peak(spec), text, spec, nxt) for _, text, spec, nxt in tried), key=lambda m: m[:2])
            if better[0] >= peak:
                break
            peak, _, policy, units = better
        known = _LEAST.setdefault(_network_key(self.network), [])
        if all(_spec_text(policy) != _spec_text(k) for k in known):
            known.append(policy)
        self._smallest = (policy, peak)
        return self._smallest

    def _smallest_nested(self, stop_at: int | None, measurements: int) -> tuple[PolicySpec, int]:
        found = self._smallest_nested_found
        if found is not None and (stop_at is None or found[1] <= stop_at or self._smallest_nested_done):
            return found
        p = self.profile
        if found is None:  # start from the least policy without nesting: its full groups are the outer groups
            policy, peak = self.smallest()
            units = self._units(policy)
            outer = [(blocks,) for blocks, mode in units if mode == "full"]
            others = [u for u in units if u[1] != "full"]
        else:  # go on where the last search stopped (its budget of measurements spent)
            (policy, peak), (outer, others) = found, self._nested_search
        done, spent = True, 0
        while stop_at is None or peak > stop_at:
            improved = False
            for move in _nesting_moves(p, outer):
                if spent >= measurements:
                    done = False
                    break
                flat = [(tuple(b for run in runs for b in run), "full") for runs in move if len(runs) == 1]
                spec = _nested_spec(p, sorted(others + flat), [runs for runs in move if len(runs) > 1])
                if _spec_text(spec) in self._peaks:
                    continue
                spent += 1
                self.progress(f"nested least-memory search: {_size(peak)} so far, measuring a move")
                measured = self.peak(spec)
                if measured < peak:
                    peak, policy, outer, improved = measured, spec, move, True
                    break
            if not improved:
                break
        self._nested_search = (outer, others)
        self._smallest_nested_found, self._smallest_nested_done = (policy, peak), done
        return policy, peak


_PLANNERS: OrderedDict[tuple, _Planner] = OrderedDict()  # the last few planners of this process, by question
_PLANNER_CACHE_SIZE = 8


def _planner(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str, loss: Callable | None,
             label: Any, device: torch.device, timing: bool = True,
             progress: Callable[[str], None] | None = None) -> _Planner:
    """The planner for this question, made once per process (the profile, its times and every measured peak are
    kept): the same question gets the same answer."""
    label_key = label if isinstance(label, str) else (tuple(label.shape), label.dtype)
    key = (_network_key(network), input_shape, amp, optimizer, id(loss), label_key, str(device), timing)
    if key in _PLANNERS:
        _PLANNERS.move_to_end(key)
        planner = _PLANNERS[key]
        planner.network, planner.progress = network, progress or (lambda message: None)
        return planner
    step = _make_step(network, input_shape, amp, loss, label)
    planner = _PLANNERS[key] = _Planner(network, input_shape, amp, optimizer, timing, step, device, progress)
    while len(_PLANNERS) > _PLANNER_CACHE_SIZE:
        _PLANNERS.popitem(last=False)
    return planner


def _device_of(network: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device the network's parameters are on; ``device``, when given, must be that one."""
    on = _parameter_device(network)
    if device is None:
        return on
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:0'): {error}") from None
    if wanted.type != on.type or (wanted.index is not None and on.index is not None and wanted.index != on.index):
        raise ValueError(f"the network's parameters are on {on}, not {wanted}: plan where it trains (move it first, "
                         f"network.to({str(wanted)!r})), or leave device out to plan for {on}.")
    return on


def _headroom_bytes(headroom_gb: float | None, budget: int, device: torch.device) -> int:
    """What the budget keeps back beyond live tensors: ``headroom_gb``, else the device's default (CUDA:
    CUDA_HEADROOM_FRACTION of the budget, at least CUDA_HEADROOM_MIN_GB; CPU: none)."""
    if headroom_gb is None:
        if device.type != "cuda":
            return 0
        return int(max(CUDA_HEADROOM_FRACTION * budget, CUDA_HEADROOM_MIN_GB * GiB))
    if isinstance(headroom_gb, bool) or not isinstance(headroom_gb, (int, float)) or not headroom_gb > 0:
        raise ValueError(f"headroom_gb must be a positive number of GiB (what the device needs beyond live tensors: "
                         f"allocator rounding, cuDNN workspaces), got {headroom_gb!r}; leave it out for the default "
                         f"(CUDA: {CUDA_HEADROOM_FRACTION:.0%} of the budget, at least {CUDA_HEADROOM_MIN_GB} GiB; "
                         "CPU: none).")
    headroom = int(headroom_gb * GiB)
    if headroom >= budget:
        raise ValueError(f"headroom_gb={headroom_gb} leaves nothing of the {budget / GiB:.4g} GiB budget for tensors; "
                         "give a headroom below the budget.")
    return headroom


def _stderr_progress(message: str) -> None:
    print(f"[plan] {message}", file=sys.stderr, flush=True)


def plan(
    network: nn.Module,
    spatial_shape: Sequence[int],
    budget_gb: float,
    *,
    batch_size: int = 1,
    amp: bool = False,
    optimizer: str = "adam",
    loss: Callable[..., torch.Tensor] | None = None,
    label: str | torch.Tensor | LabelBatch = "index",
    headroom_gb: float | None = None,
    device: str | torch.device | None = None,
    progress: bool | Callable[[str], None] = False,
) -> Plan:
    """The fastest checkpoint policy with which one training step of ``network`` fits in ``budget_gb``.

    Args:
        network: a monai_ckpt network (CheckpointUNet, CheckpointVNet, CheckpointDynUNet); it is not changed.
        spatial_shape: the patch, (D, H, W) or (H, W); channels come from the network.
        budget_gb: memory for one whole training step (forward, loss, backward, optimizer step), in GiB.
        batch_size: patches per step.
        amp: the forward runs under autocast (bf16 on CPU, fp16 on CUDA).
        optimizer: ``"adam"`` (two states per parameter), ``"sgd"`` or ``"none"``.
        loss: your loss, called as ``loss(output, label)`` on the network's whole training output (as MONAI's
            trainers call it), e.g. ``DiceCELoss(to_onehot_y=True, softmax=True)``; for a DynUNet with deep
            supervision, e.g. ``lambda out, y: DeepSupervisionLoss(DiceCELoss(...))(torch.unbind(out, 1), y)``.
            None (the default): ``mean(out**2)``, which has fewer output-sized temporaries than most
            segmentation losses: with many classes give your loss, or the plan may not fit.
        label: the label batch the loss takes: ``"index"`` (B, 1, *spatial) int64 class indices (for
            ``to_onehot_y`` and cross-entropy losses), ``"channels"`` (B, classes, *spatial) float32 (sigmoid
            losses, one-hot labels), or an example tensor (its shape and dtype). Only its shape and dtype matter.
        headroom_gb: what of the budget the device needs beyond live tensors. Default: on CUDA 10% of the budget
            and at least 0.25 GiB (the caching allocator's rounding and fragmentation, cuDNN workspaces); on the
            CPU none. Tensors are planned into ``budget_gb - headroom_gb``.
        device: where the network trains; default (and the only device allowed) the device of its parameters.
            Block and step times are measured there (CPU: process time; CUDA: synchronised wall time and CUDA
            events, after a warm-up).
        progress: report the search's steps on stderr (True) or to a callable.

    Returns:
        a `Plan`; ``plan.policy`` goes to ``network.checkpoint_policy``. The same question in one process gets
        the same plan (the profile is kept, times are rounded and ties broken by a fixed rule).

    Nested recomputation (policy mode ``"nested"``, a block run up to three times per step) is used only when no
    policy without it fits the budget.

    Raises:
        ValueError: when nothing fits (the message gives the smallest peak reachable and its policy); for a
            shape the network cannot take, a non-positive budget or headroom, a device the network is not on, a
            label that does not match the network's classes, or a loss that fails on the network's output.

    Example::

        net = CheckpointUNet(3, 1, 14, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
        p = plan(net, (96, 96, 96), budget_gb=8, batch_size=2, loss=DiceCELoss(to_onehot_y=True, softmax=True))
        net.checkpoint_policy = p.policy
    """
    budget = _budget_bytes(budget_gb)
    input_shape = _input_shape(network, spatial_shape, batch_size)
    make_optimizer(nn.Linear(1, 1), optimizer)  # a clear error for an unknown optimizer
    where = _device_of(network, device)
    headroom = _headroom_bytes(headroom_gb, budget, where)
    report = _stderr_progress if progress is True else progress or None
    return _planner(network, input_shape, amp, optimizer, loss, label, where, progress=report).plan(budget, headroom)


_PLANNING_LOSS: contextvars.ContextVar[tuple[Callable, LabelBatch] | None] = contextvars.ContextVar(
    "monai_ckpt_planning_loss", default=None)


@contextlib.contextmanager
def planning_loss(loss: Callable[..., torch.Tensor], label: torch.Tensor | LabelBatch) -> Iterator[None]:
    """Within this context, a network with a ``{"budget_gb": X}`` policy plans its training step with ``loss``
    and a label batch shaped like ``label`` (only its shape and dtype are kept). `MemoryEfficientUpdate` wraps
    each forward in it with the engine's ``loss_function`` and the batch's label.

    Example::

        with planning_loss(loss_function, labels):
            loss = loss_function(net(images), labels)
    """
    token = _PLANNING_LOSS.set((loss, LabelBatch(tuple(label.shape), label.dtype)))
    try:
        yield
    finally:
        _PLANNING_LOSS.reset(token)


def plan_for_network(network: nn.Module, x: torch.Tensor, amp: bool, spec: dict) -> Plan:
    """The plan a network with a ``{"budget_gb": X}`` policy uses for the training input ``x``, with the loss
    and label of `planning_loss` when one is active. Under torch.distributed, rank 0 plans and every rank uses
    its plan, so that all ranks run the same policy."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    result: list = [None]
    planning = _PLANNING_LOSS.get()
    loss, label = planning if planning is not None else (None, "index")
    if not distributed or dist.get_rank() == 0:
        try:
            result[0] = plan(network, tuple(x.shape[2:]), spec["budget_gb"], batch_size=int(x.shape[0]), amp=amp,
                             optimizer=spec.get("optimizer", "adam"), loss=loss, label=label,
                             headroom_gb=spec.get("headroom_gb"))
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
    """The least-memory policy at ``input_shape`` (the search `plan` falls back on; remembered for this network,
    so that `plan` at any shape tries it too)."""
    where = next((p.device for p in network.parameters()), torch.device("cpu"))
    # two rounds of local moves: a capacity search asks at many sizes; plan() at the size it picks tries this policy
    return _planner(network, input_shape, amp, optimizer, None, "index", where, timing=False).smallest(rounds=2)[0]


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
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """For each budget, the largest cubic patch edge without and with checkpointing, each without and with
    AMP: rows ``{"budget_gb", "plain", "checkpointed", "plain_amp", "checkpointed_amp", "max_edge"}`` (0: nothing
    fits; ``max_edge``: the largest edge searched). ``progress`` is told each column as its search starts."""
    for budget in budgets_gb:
        _budget_bytes(budget)
    edges = _edges(network, max_edge)
    dims = len(network.size_multiple())
    shape_of = lambda e: _input_shape(network, (e,) * dims, batch_size)
    reference = shape_of(_reference_edge(edges))
    report = progress or (lambda message: None)
    columns = {}
    for amp in (False, True):
        columns[("plain", amp)] = _Capacity(network, "none", amp, optimizer)
        report(f"the least-memory policy at {reference}{' with amp' if amp else ''}")
        columns[("checkpointed", amp)] = _Capacity(network, _least_memory_policy(network, reference, amp, optimizer),
                                                   amp, optimizer)
    rows = []
    for budget in budgets_gb:
        report(f"largest patches for {budget} GiB")
        rows.append({"budget_gb": budget, **{name + ("_amp" if amp else ""): capacity.largest(edges, shape_of,
                                                                                             int(budget * GiB))
                                             for (name, amp), capacity in columns.items()}, "max_edge": edges[-1]})
    return rows


def format_capacity_table(rows: Sequence[dict], dims: int = 3) -> str:
    """A markdown table of `capacity_table` rows: the largest patch per budget."""
    def cell(edge: int, row: dict) -> str:
        text = "-" if not edge else "x".join([str(edge)] * dims)
        return f">= {text}" if edge and edge == row.get("max_edge") else text  # the search's upper end

    lines = ["| budget (GiB) | no checkpointing | checkpointing | AMP | checkpointing + AMP |", "|---|---|---|---|---|"]
    lines += [f"| {r['budget_gb']} | " + " | ".join(cell(r[k], r) for k in ("plain", "checkpointed", "plain_amp",
                                                                            "checkpointed_amp")) + " |" for r in rows]
    return "\n".join(lines)
