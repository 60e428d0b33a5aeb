"""The planner's memory model of a chain and its exact dynamic program.

Each segment can run plainly, checkpointed whole, checkpointed "cheap", or cut into runs of consecutive blocks, each
run plain/full/cheap (`segment_options`). `solve` is a dynamic program over the chain: for each prefix of segments
it keeps the Pareto front of (bytes kept for backward, recompute time), and a choice is admissible only if the
backward peak it implies fits (the peak of a block's backward is what the blocks before it keep, its own activations
and gradients, the skip gradients waiting for their encoder, parameters, gradients and optimizer state). The
front's fastest admissible end is optimal for that memory model (as rotor does for chains), not a rule of thumb.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..policies import PolicySpec
from .profile import ChainProfile

__all__ = ["GRAD_FACTOR", "Option", "group_labels", "option_of", "param_grads_after", "pending", "policy_of",
           "policy_of_units", "runs_of", "segment_options", "solve", "undominated", "unit_kept", "units_of"]

GRAD_FACTOR = 1.5  # gradient working set of a block's backward, in units of its input + output bytes


@dataclass(frozen=True)
class Option:
    """One way to run one segment: its units (block indices, mode), what it keeps, its backward peak above
    what earlier segments keep, and its recompute time."""

    units: tuple[tuple[tuple[int, ...], str], ...]
    kept: int
    peak: int
    time: float


def unit_kept(p: ChainProfile, blocks: tuple[int, ...], mode: str) -> int:
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


def pending(p: ChainProfile, block: int) -> int:
    """Gradients of pushed tensors that wait, during this block's backward, for their producer's backward."""
    return sum(nbytes for prod, cons, nbytes, _ in p.items if prod < block and (cons is None or cons > block))


def option_of(p: ChainProfile, units: tuple[tuple[tuple[int, ...], str], ...], grads_after: list[int]) -> Option:
    kept = peak = 0
    rtime = 0.0
    for blocks, mode in units:
        inside = 0
        for b in blocks:
            c = p.costs[b]
            inside += c.kept_bytes
            peak = max(peak, kept + inside + GRAD_FACTOR * (c.next_bytes + c.input_bytes) + pending(p, b)
                       + grads_after[b])
        kept += unit_kept(p, blocks, mode)
        if mode != "plain":  # torch stops recomputing once every saved tensor is back: the last block's tail is free
            rtime += sum(p.recompute_s[mode][b] for b in blocks) - p.tail_s[mode][blocks[-1]]
    return Option(units, kept, peak, rtime)


def runs_of(blocks: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
    """Every way to cut ``blocks`` into runs of consecutive blocks."""
    if len(blocks) <= 1:
        return [(blocks,)]
    return [(blocks[:k], *rest) for k in range(1, len(blocks)) for rest in runs_of(blocks[k:])] + [(blocks,)]


EXHAUSTIVE_BLOCKS = 9  # a segment of up to this many blocks has all its ~3 * 4^(n-1) options listed


def segment_options(p: ChainProfile, blocks: list[int], grads_after: list[int]) -> list[Option]:
    """Every way to run a segment: cut into runs of consecutive blocks, each run plain, full or cheap (plain
    runs as their single blocks). A segment of more than `EXHAUSTIVE_BLOCKS` blocks (nnU-Net ResEnc-L's stages:
    12; 3 * 4^11 options, which never finished) gets its options undominated in kept bytes, peak and time instead
    (`_undominated_options`): what `undominated` keeps of them, found without listing them all."""
    if len(blocks) > EXHAUSTIVE_BLOCKS:
        return _undominated_options(p, list(blocks), grads_after)
    choices = []
    for runs in runs_of(tuple(blocks)):
        for modes in itertools.product(("plain", "full", "cheap"), repeat=len(runs)):
            units = []
            for run, mode in zip(runs, modes):
                units += [((b,), "plain") for b in run] if mode == "plain" else [(run, mode)]
            choices.append(tuple(units))
    return [option_of(p, units, grads_after) for units in dict.fromkeys(choices)]


def _undominated_options(p: ChainProfile, blocks: list[int], grads_after: list[int]) -> list[Option]:
    """The options of a segment that no other beats or ties on kept bytes, peak and recompute time, built run by
    run: an option's figures after its first k blocks (kept, peak, time so far) only grow with what follows, and
    what follows adds the same to two prefixes ending at the same block except that the peak is offset by what the
    prefix keeps; so a prefix that another prefix ending there beats on all three is never part of an undominated
    option, and is dropped. Polynomial in the blocks (times the size of the fronts) instead of exponential."""
    fronts: list[list[Option]] = [[] for _ in blocks] + [[]]
    fronts[0] = [Option((), 0, 0, 0.0)]
    for start in range(len(blocks)):
        for prefix in undominated(fronts[start]):
            for end in range(start + 1, len(blocks) + 1):
                run = tuple(blocks[start:end])
                for mode in ("plain", "full", "cheap") if end == start + 1 else ("full", "cheap"):
                    fronts[end].append(_extended(p, prefix, run, mode, grads_after))
    return undominated(fronts[-1])


def _extended(p: ChainProfile, prefix: Option, run: tuple[int, ...], mode: str, grads_after: list[int]) -> Option:
    """``prefix`` followed by the unit ``(run, mode)``, its figures as `option_of` counts them."""
    tail = option_of(p, ((run, mode),), grads_after)
    return Option(prefix.units + ((run, mode),), prefix.kept + tail.kept, max(prefix.peak, prefix.kept + tail.peak),
                  prefix.time + tail.time)


def undominated(options: list[Option]) -> list[Option]:
    """The options no other option beats or ties on all of kept bytes, backward peak and recompute time (in their
    order). The dynamic program needs only these: swapping a dominated option for its better keeps a choice
    admissible and no slower. A segment of many blocks (SegResNet's bottleneck: 9) has ~10^5 options, a few of them
    undominated."""
    front: list[tuple[int, Option]] = []
    for i, opt in sorted(enumerate(options), key=lambda o: (o[1].time, o[1].kept, o[1].peak, o[0])):
        if not any(f.kept <= opt.kept and f.peak <= opt.peak for _, f in front):
            front.append((i, opt))
    return [opt for _, opt in sorted(front, key=lambda f: f[0])]


def param_grads_after(p: ChainProfile) -> list[int]:
    """Parameter gradients alive during each block's backward (those of this block and the ones after it)."""
    out, acc = [0] * len(p.costs), 0
    for b in reversed(range(len(p.costs))):
        acc += p.costs[b].param_bytes
        out[b] = acc
    return out


def solve(p: ChainProfile, limit: int, options: list[list[Option]]) -> tuple[list[Option], int, float] | None:
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


def units_of(p: ChainProfile, groups: Sequence) -> tuple[tuple[tuple[int, ...], str], ...]:
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


def policy_of(p: ChainProfile, chosen: Sequence[Option]) -> tuple[PolicySpec, list[str]]:
    """The policy spec (and the checkpointed names) of one option per segment."""
    return policy_of_units(p, [unit for option in chosen for unit in option.units])


def policy_of_units(p: ChainProfile, units: Sequence[tuple[tuple[int, ...], str]]) -> tuple[PolicySpec, list[str]]:
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


def group_labels(groups: Sequence, segments: Sequence) -> list[str]:
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
