"""The least-memory search: the policy with the smallest measured peak a `Planner` can find, without nesting
(`least_memory`: the fixed policies, the model's least choice and a local search around the least measured) and with
it (`nested_least_memory`: a greedy search over nested groups). `plan()` uses it for a budget below ``"all"`` and
for the least peak its "nothing fits" error names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..policies import PolicySpec
from .model import option_of, policy_of, policy_of_units, solve
from .moves import merge_deep, neighbours, nested_spec, nesting_moves
from .result import format_size

# `planner` below is a `search.Planner` (which imports this module: the search's state stays in it, the search here)
Planner = Any

__all__ = ["FIXED_POLICIES", "LEAST_FOUND", "NestedSearch", "least_memory", "nested_least_memory", "network_key",
           "spec_text"]

FIXED_POLICIES: tuple[PolicySpec, ...] = ("none", "cheap", "all", "blocks", "sqrt", "encoder", "decoder",
                                          {"every": 2})


def network_key(network: nn.Module) -> tuple:
    """What a plan depends on in a network: its structure and parameter shapes (not its weights)."""
    return (type(network).__qualname__, repr(network),
            tuple((tuple(t.shape), str(t.dtype)) for t in network.parameters()))


LEAST_FOUND: dict[tuple, list[PolicySpec]] = {}  # per network: least-memory policies found so far, tried at each shape


def spec_text(policy: PolicySpec) -> str:
    """A policy as canonical JSON: the key under which its measurements are kept."""
    return json.dumps(policy, sort_keys=True)


def least_memory(planner: Planner, rounds: int = 4, per_round: int = 2) -> tuple[PolicySpec, int]:
    """The policy with the smallest measured peak: the least of the fixed policies, "all" with the top
    decoders split into blocks, the model's least-memory choice and the least-memory policies found for this
    network at other shapes; then a local search from the least of them (change a mode, split, merge runs
    across segment boundaries, move a cut), each round measuring the ``per_round`` moves the model ranks
    lowest, until no move lowers the measured peak. Returns (policy, peak); ``Planner.smallest`` keeps it, and
    `LEAST_FOUND` keeps the policy for this network's other shapes."""
    candidates: list[PolicySpec] = list(FIXED_POLICIES) + list(LEAST_FOUND.get(network_key(planner.network), []))
    segments = planner.network.checkpoint_segments()
    top = sorted((s for s in segments if s.kind == "decoder" and s.parts), key=lambda s: s.level)
    for k in (1, 2):  # the highest-resolution decoders block by block: their activations dominate the peak
        split = {s.name for s in top[:k]}
        candidates.append([n for s in segments for n in (s.parts if s.name in split else (s.name,))])
    lo, hi = planner.profile.fixed_bytes, planner.peak("none")
    # the policies this search has measured: a neighbour among them is not a move; one measured by another
    # question (a plan's bracketing) is, as in a search of its own, so that the answer does not depend on what
    # was asked before (its peak is known: measuring it costs nothing)
    seen = {spec_text("none"), spec_text("all")}
    least = None
    while hi - lo > max(1, hi // 1000):  # the least modelled peak, by bisection on the model budget
        mid = (lo + hi) // 2
        solved = solve(planner.profile, mid, planner.memory_options)
        if solved is None:
            lo = mid
        else:
            hi, least = mid, solved[0]
    if least is not None:
        candidates.append(policy_of(planner.profile, least)[0])
    modelled = sorted({spec_text(c): (planner.modelled_peak(c), spec_text(c), c) for c in candidates}.values(),
                      key=lambda m: m[:2])
    # measure the candidates the model puts near the least (it is within ~15% of the measurement)
    measured = [(planner.peak(c), spec_text(c), c) for m, _, c in modelled[:4] if m <= 1.2 * modelled[0][0]]
    measured += [(planner.peak(c), spec_text(c), c) for c in candidates if spec_text(c) in seen]
    seen.update(text for _, text, _ in measured)
    peak, _, policy = min(measured, key=lambda m: m[:2])
    units = planner._units(policy)
    # the deep levels as one run (what passes between their groups is then not kept): measured whatever the
    # model says, which cannot tell these apart (it counts a run's boundaries, not what its backward holds)
    for level in sorted({c.level for c in planner.profile.costs}, reverse=True)[1:-1]:
        deep = merge_deep(planner.profile, units, level)
        spec = policy_of_units(planner.profile, deep)[0]
        seen.add(spec_text(spec))
        if planner.peak(spec) < peak:
            peak, policy, units = planner.peak(spec), spec, deep
    for _ in range(rounds):
        moves = {}
        for nxt in neighbours(units):
            spec = policy_of_units(planner.profile, nxt)[0]
            if spec_text(spec) not in seen:
                kept = option_of(planner.profile, nxt, planner.grads_after).kept  # among equal peaks: keeps less
                moves.setdefault(spec_text(spec), (planner._units_peak(nxt), kept, spec_text(spec), spec, nxt))
        tried = [(peak_, text, spec, nxt) for peak_, _, text, spec, nxt in
                 sorted(moves.values(), key=lambda m: m[:3])[:per_round]]
        if not tried:
            break
        planner.progress(f"least-memory search: {format_size(peak)} so far, measuring {len(tried)} neighbours")
        seen.update(text for _, text, _, _ in tried)
        better = min(((planner.peak(spec), text, spec, nxt) for _, text, spec, nxt in tried), key=lambda m: m[:2])
        if better[0] >= peak:
            break
        peak, _, policy, units = better
    known = LEAST_FOUND.setdefault(network_key(planner.network), [])
    if all(spec_text(policy) != spec_text(k) for k in known):
        known.append(policy)
    return policy, peak


def nested_least_memory(planner: Planner, stop_at: int | None, measurements: int) -> tuple[PolicySpec, int]:
    """From the least policy without nesting (``planner.smallest()``) on: a greedy search over nested groups
    (`nesting_moves`, highest resolution first, each measured; the first move that lowers the peak is taken) until
    no move helps, the peak is at most ``stop_at`` bytes, or ``measurements`` are spent. Resumable: a search stopped
    at ``stop_at`` goes on from where it stopped when asked for less; its path and its count of ``measurements`` do
    not depend on ``stop_at`` or on what other questions measured, so it ends where an uninterrupted search ends.
    Returns the least found, nested or not."""
    p = planner.profile
    state = planner._nested
    if state is None:  # start from the least policy without nesting: its full groups are the outer groups
        policy, peak = planner.smallest()  # the cached search, which plan() has usually run already
        units = planner._units(policy)
        state = planner._nested = NestedSearch(policy, peak, [(blocks,) for blocks, mode in units if mode == "full"],
                                             [u for u in units if u[1] != "full"])
    while not state.finished and (stop_at is None or state.peak > stop_at):
        improved = False
        for move in nesting_moves(p, state.outer):
            flat = [(tuple(b for run in runs for b in run), "full") for runs in move if len(runs) == 1]
            spec = nested_spec(p, sorted(state.others + flat), [runs for runs in move if len(runs) > 1])
            text = spec_text(spec)
            if text not in state.seen:
                if len(state.seen) >= measurements:
                    break
                state.seen.add(text)
                planner.progress(f"nested least-memory search: {format_size(state.peak)} so far, measuring move "
                              f"{len(state.seen)} of at most {measurements}")
            measured = planner.peak(spec)
            if measured < state.peak:
                state.policy, state.peak, state.outer, improved = spec, measured, move, True
                break
        state.finished = not improved
    return state.policy, state.peak


@dataclass
class NestedSearch:
    """Where the greedy nested search stands: its least policy and peak, its outer groups (each a tuple of inner
    runs) and the other units, the moves it has evaluated, and whether it has ended (no move helps, or its
    measurements are spent)."""

    policy: PolicySpec
    peak: int
    outer: list
    others: list
    seen: set = field(default_factory=set)
    finished: bool = False
