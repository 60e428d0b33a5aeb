"""The search: a `Planner` profiles a network once per question, then answers the measured peak of a policy, the
model's peak and time, the fastest policy under a budget (`Planner.plan`) and the least-memory policy
(`Planner.smallest`, nested only on request). Every policy it measures is a candidate of every plan it makes;
`get_planner` keeps the last few planners of the process, so the same question gets the same answer."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..policies import PolicySpec, resolve_policy
from .model import (
    group_labels,
    option_of,
    param_grads_after,
    policy_of,
    policy_of_units,
    segment_options,
    solve,
    undominated,
    units_of,
)
from .moves import merge_deep, neighbours, nested_spec, nesting_moves
from .profile import ChainProfile, chain_times, profile_chain
from .result import GiB, Plan, format_size
from .compiled import FINE_COMPILE_BUDGETS, CompiledStep, compile_budgets
from .step import FakeStep, PlannedStep, make_step

__all__ = ["FIXED_POLICIES", "Planner", "get_planner", "network_key", "spec_text"]

FIXED_POLICIES: tuple[PolicySpec, ...] = ("none", "cheap", "all", "blocks", "sqrt", "encoder", "decoder",
                                          {"every": 2})


def network_key(network: nn.Module) -> tuple:
    """What a plan depends on in a network: its structure and parameter shapes (not its weights)."""
    return (type(network).__qualname__, repr(network),
            tuple((tuple(t.shape), str(t.dtype)) for t in network.parameters()))


_LEAST: dict[tuple, list[PolicySpec]] = {}  # per network: least-memory policies found so far, tried at every shape


def spec_text(policy: PolicySpec) -> str:
    import json

    return json.dumps(policy, sort_keys=True)


class Planner:
    """Profiles once (on first use), then answers: the measured peak of a policy, the model's peak and time,
    and the fastest policy under a budget. Every policy it measures is a candidate of every plan it makes."""

    def __init__(self, network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str,
                 timing: bool = True, step: PlannedStep | None = None, device: torch.device | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.network, self.input_shape, self.amp, self.optimizer = network, input_shape, amp, optimizer
        self.timing, self.device = timing, device or torch.device("cpu")
        self.step = step or make_step(network, input_shape, amp, None, None)
        self.progress = progress or (lambda message: None)
        self._peaks: dict[str, int] = {}
        self._policies: dict[str, PolicySpec] = {}
        self._fake_step: FakeStep | None = None
        self._compiled_step: CompiledStep | None = None
        self._profile: ChainProfile | None = None
        self._times_done = False
        self._smallest: tuple[PolicySpec, int] | None = None
        self._nested: _NestedSearch | None = None

    @property
    def profile(self) -> ChainProfile:
        """The chain profile: bytes on fake tensors at the planned size, the model calibrated on two measured
        peaks. Block times come later, on first need (`_timed`): a least-memory search, and a question nothing fits,
        never time a block."""
        if self._profile is None:
            self.progress(f"profiling the blocks at {self.input_shape} on fake tensors (each distinct block once)")
            self._profile = profile_chain(self.network, self.input_shape, self.amp, self.optimizer, False, self.step,
                                          self.device)
            self.grads_after = param_grads_after(self._profile)
            # Calibrate the model on two measured points. Without checkpointing the loss is where the step peaks
            # (everything the forward kept is alive): the loss term is set so that this point equals the
            # measurement; then the constant so that the model is not below either point.
            plain = option_of(self._profile, self._units("none"), self.grads_after)
            self._profile.loss_bytes += min(0, self.peak("none") - self._profile.fixed_bytes - plain.kept
                                            - self._profile.loss_bytes)
            self._profile.fixed_bytes += max(self.peak(policy) - self.modelled_peak(policy)
                                             for policy in ("none", "all"))
            # the least-memory search's options: undominated in memory alone, so that its answer does not depend on
            # the measured times (which vary from run to run)
            self.memory_options = [undominated(segment_options(self._profile, blocks, self.grads_after))
                                   for _, blocks in self._profile.segments]
            self.options = self.memory_options
        return self._profile

    def _timed(self) -> ChainProfile:
        """The profile with its block times (timed on first call, when ``timing``), and the dynamic program's
        options undominated in memory and time."""
        p = self.profile
        if self.timing and not self._times_done:
            p.recompute_s, p.tail_s = chain_times(self.network, self.input_shape, self.amp, self.optimizer,
                                                  self.device, self.step, self.progress)
            self.options = [undominated(segment_options(p, blocks, self.grads_after)) for _, blocks in p.segments]
            self._times_done = True
        return p

    def peak(self, policy: PolicySpec) -> int:
        """Exact peak of one training step with ``policy`` (MemTracker on fake tensors)."""
        key = spec_text(policy)
        if key not in self._peaks:
            self._peaks[key] = self.fake_step.peak(policy)
            self._policies[key] = policy
        return self._peaks[key]

    @property
    def fake_step(self) -> FakeStep:
        """The question's step on fake tensors, built on first use."""
        if self._fake_step is None:
            self.progress(f"building the training step on fake tensors at {self.input_shape}")
            self._fake_step = FakeStep(self.network, self.input_shape, self.amp, self.optimizer, self.step)
        return self._fake_step

    @property
    def compiled_step(self) -> CompiledStep:
        if self._compiled_step is None:
            self._compiled_step = CompiledStep(self.fake_step, self.device.type, self.progress)
        return self._compiled_step

    def _units(self, policy: PolicySpec) -> tuple:
        return units_of(self.profile, resolve_policy(policy, self.network.checkpoint_segments()))

    def _units_peak(self, units: tuple) -> int:
        option = option_of(self.profile, units, self.grads_after)
        return self.profile.fixed_bytes + max(option.peak, option.kept + self.profile.loss_bytes)

    def modelled_peak(self, policy: PolicySpec) -> int:
        return self._units_peak(self._units(policy))

    def time_ratio(self, policy: PolicySpec) -> float:
        """The model's step time with ``policy`` as a ratio to the plain step; a nested group's inner runs add
        their recomputation once more."""
        p = self._timed()
        groups = resolve_policy(policy, self.network.checkpoint_segments())
        index = {c.block: i for i, c in enumerate(p.costs)}
        extra = sum(sum(p.recompute_s["full"][index[n]] for n in run) - p.tail_s["full"][index[run[-1]]]
                    for g in groups for run in g.inner)
        return 1.0 + option_of(p, units_of(p, groups), self.grads_after).time + extra

    def fastest(self, budget: int, tries: int = 5) -> tuple[PolicySpec, list[str]] | None:
        """The dynamic program's fastest choice whose measured peak fits ``budget``: the model's limit starts
        at the budget and moves by the measured excess (or slack) of each choice, bracketed, ``tries`` times."""
        lo, hi, limit = 0, math.inf, budget  # model limits known to give a fitting / a non-fitting choice
        best: tuple[float, PolicySpec, list[str]] | None = None
        self._timed()
        for _ in range(tries):
            solved = solve(self.profile, limit, self.options)
            if solved is None:
                lo = limit
                if hi - lo <= budget // 200:
                    break
                limit = min(hi, limit + budget // 20)
                continue
            chosen, _, rtime = solved
            policy, names = policy_of(self.profile, chosen)
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
            return Plan("none", [], plain, 1.0, True, budget, plain, self.input_shape, self.amp, self.optimizer,
                        *extras)
        tight = limit < self.peak("all")  # below "all": the least-memory search's ground, which tries these too
        if tight:
            # first whether anything fits at all: the least-memory search needs no block times, so a question that
            # nothing fits is answered without timing a block
            self.progress(f"below \"all\" ({format_size(self.peak('all'))}): searching the least-memory policy")
            _, peak = self.smallest()
            if peak <= limit:
                self.progress(f"searching the fastest policy under {format_size(limit)}")
                if self.fastest(limit, tries=3) is None:
                    # something fits, but the model's error at this budget outran three brackets (AttentionUnet at
                    # 128^3: 0.17 GiB): bracket further, the least-memory policy is the fallback
                    self.fastest(limit, tries=8)
        else:
            self.progress(f"searching the fastest policy under {format_size(limit)}")
            found = self.fastest(limit, tries=5)
            best_time = self.time_ratio(found[0]) if found else math.inf
            for fixed in FIXED_POLICIES:  # never slower than a fixed policy that fits (the model is within ~10% of
                # the measured peak: one it puts further above the budget is not measured)
                if self.time_ratio(fixed) < best_time - 1e-9 and self.modelled_peak(fixed) <= 1.1 * limit:
                    self.peak(fixed)
        policy = self._fastest_measured(limit)
        nested_searched = False
        if policy is None and limit >= NESTED_REACH * self.smallest()[1]:
            # the opt-in nested mode, only now that no policy recomputing each block at most once fits; when none
            # fits either, the search goes on to its end, so that the error gives the least it can reach
            self.progress(f"nothing without nesting fits {format_size(limit)}: searching nested policies")
            least, peak = self.smallest(nested=True, stop_at=limit)
            policy, nested_searched = (least if peak <= limit else None), True
        if policy is None:
            least, peak = self.least_measured()
            raise ValueError(
                f"nothing fits {budget / GiB:.4g} GiB"
                + (f" ({format_size(limit)} for tensors after {format_size(headroom)} headroom)" if headroom else "")
                + f" for input {self.input_shape} (amp={self.amp}, optimizer={self.optimizer!r}, loss "
                f"{self.step.description}): the smallest peak reachable is {format_size(peak)}, with "
                f"checkpoint_policy={least!r} (without checkpointing {format_size(plain)})"
                + ("" if nested_searched else f"; nested policies were not searched: they lower that by about a "
                   f"tenth, and this budget is under {NESTED_REACH:.0%} of it")
                + ". Raise the budget, or reduce the batch or patch size, or use amp."
            )
        segments = self.network.checkpoint_segments()
        names = [] if policy == "none" else group_labels(resolve_policy(policy, segments), segments)
        ratio = 1.0 if policy == "none" else self.time_ratio(policy)
        return Plan(policy, names, self.peak(policy), ratio, True, budget, plain, self.input_shape, self.amp,
                    self.optimizer, *extras)

    def plan_compiled(self, budget: int, headroom: int = 0) -> Plan:
        """The fastest (policy, ``activation_memory_budget``) whose compiled step (`CompiledStep`) fits
        ``budget - headroom``. Candidates: compile's budget alone (the policy ``"none"``), and with it the eager
        search's fastest policy that fits, ``"cheap"`` and ``"all"`` (and the least-memory policy when none of these
        fits); for each, compile's budgets from 1.0 down to the first whose step fits (`compile_budgets`: only 1.0
        for a network with BatchNorm). The time model is the compiled graphs' (`monai_ckpt.planner.compiled`); ties
        go to the larger budget, then the order above."""
        limit = budget - headroom
        step = self.compiled_step
        plain = step.measure("none", 1.0, spec_text("none"))
        self.progress(f"searching the fastest compiled step under {format_size(limit)}")
        policies: list[PolicySpec] = ["none"]
        if plain.peak > limit:
            found = self.fastest(limit)
            policies += ([found[0]] if found else []) + ["cheap", "all"]
        best: tuple[float, int, PolicySpec, float] | None = None
        budgets = compile_budgets(self.network)

        def search(candidates: list[PolicySpec], grid: tuple[float, ...] = budgets) -> None:
            nonlocal best
            for order, policy in enumerate(candidates):
                key = spec_text(policy)
                for compile_budget in grid:
                    measured = step.measure(policy, compile_budget, key)
                    if best is not None and measured.cost >= best[0]:
                        break  # a smaller budget only recomputes more
                    if measured.peak <= limit:
                        best = (measured.cost, order, policy, compile_budget)
                        break

        search(list({spec_text(p): p for p in policies}.values()))
        if best is None and len(budgets) > 1:
            # the whole step's peak is not monotonic in compile's budget (a small one recomputes most of the forward
            # at once in the backward): the budgets between the grid's steps may fit where none of them does
            self.progress(f"nothing on compile's budget grid fits {format_size(limit)}: its budget on a finer grid")
            search(["none"], FINE_COMPILE_BUDGETS)
        if best is None:
            self.progress(f"no compiled step of these policies fits {format_size(limit)}: adding the least-memory one")
            search([self.smallest()[0]])
        if best is None:
            least = min(step.measured(), key=lambda m: (m[2].peak, m[0]))
            raise ValueError(
                f"nothing fits {budget / GiB:.4g} GiB"
                + (f" ({format_size(limit)} for tensors after {format_size(headroom)} headroom)" if headroom else "")
                + f" for the compiled step of input {self.input_shape} (amp={self.amp}, optimizer={self.optimizer!r}, "
                f"loss {self.step.description}): the smallest peak reachable is {format_size(least[2].peak)}, with "
                f"checkpoint_policy={least[1]!r} and activation_memory_budget={least[3]:g} (without checkpointing "
                f"{format_size(plain.peak)}). Raise the budget, or reduce the batch or patch size, or use amp.")
        cost, _, policy, compile_budget = best
        chosen = step.measure(policy, compile_budget, spec_text(policy))
        segments = self.network.checkpoint_segments()
        names = [] if policy == "none" else group_labels(resolve_policy(policy, segments), segments)
        extras = (self.step.description, self.step.label.shape if self.step.label else None, str(self.device), headroom)
        return Plan(policy, names, chosen.peak, cost / plain.cost, True, budget, plain.peak, self.input_shape,
                    self.amp, self.optimizer, *extras, compiled=True, compile_memory_budget=compile_budget,
                    saved_bytes=chosen.saved_bytes)

    def least_measured(self) -> tuple[PolicySpec, int]:
        """Of every policy measured so far (nested ones included), the one with the smallest peak (ties: the
        policy's text)."""
        peak, key = min((peak, key) for key, peak in self._peaks.items())
        return self._policies[key], peak

    def smallest(self, rounds: int = 4, per_round: int = 2, nested: bool = False,
                 stop_at: int | None = None, measurements: int = 24) -> tuple[PolicySpec, int]:
        """The policy with the smallest measured peak: the least of the fixed policies, "all" with the top
        decoders split into blocks, the model's least-memory choice and the least-memory policies found for this
        network at other shapes; then a local search from the least of them (change a mode, split, merge runs
        across segment boundaries, move a cut), each round measuring the ``per_round`` moves the model ranks
        lowest, until no move lowers the measured peak.

        With ``nested`` (the opt-in mode ``"nested"``), from that policy on: a greedy search over nested groups
        (`nesting_moves`, highest resolution first, each measured; the first move that lowers the peak is
        taken) until no move helps, the peak is at most ``stop_at`` bytes, or ``measurements`` are spent.
        Returns the least found, nested or not."""
        if nested:
            return self._smallest_nested(stop_at, measurements)
        if self._smallest is not None:
            return self._smallest
        candidates: list[PolicySpec] = list(FIXED_POLICIES) + list(_LEAST.get(network_key(self.network), []))
        segments = self.network.checkpoint_segments()
        top = sorted((s for s in segments if s.kind == "decoder" and s.parts), key=lambda s: s.level)
        for k in (1, 2):  # the highest-resolution decoders block by block: their activations dominate the peak
            split = {s.name for s in top[:k]}
            candidates.append([n for s in segments for n in (s.parts if s.name in split else (s.name,))])
        lo, hi = self.profile.fixed_bytes, self.peak("none")
        # the policies this search has measured: a neighbour among them is not a move; one measured by another
        # question (a plan's bracketing) is, as in a search of its own, so that the answer does not depend on what
        # was asked before (its peak is known: measuring it costs nothing)
        seen = {spec_text("none"), spec_text("all")}
        least = None
        while hi - lo > max(1, hi // 1000):  # the least modelled peak, by bisection on the model budget
            mid = (lo + hi) // 2
            solved = solve(self.profile, mid, self.memory_options)
            if solved is None:
                lo = mid
            else:
                hi, least = mid, solved[0]
        if least is not None:
            candidates.append(policy_of(self.profile, least)[0])
        modelled = sorted({spec_text(c): (self.modelled_peak(c), spec_text(c), c) for c in candidates}.values(),
                          key=lambda m: m[:2])
        # measure the candidates the model puts near the least (it is within ~15% of the measurement)
        measured = [(self.peak(c), spec_text(c), c) for m, _, c in modelled[:4] if m <= 1.2 * modelled[0][0]]
        measured += [(self.peak(c), spec_text(c), c) for c in candidates if spec_text(c) in seen]
        seen.update(text for _, text, _ in measured)
        peak, _, policy = min(measured, key=lambda m: m[:2])
        units = self._units(policy)
        # the deep levels as one run (what passes between their groups is then not kept): measured whatever the
        # model says, which cannot tell these apart (it counts a run's boundaries, not what its backward holds)
        for level in sorted({c.level for c in self.profile.costs}, reverse=True)[1:-1]:
            deep = merge_deep(self.profile, units, level)
            spec = policy_of_units(self.profile, deep)[0]
            seen.add(spec_text(spec))
            if self.peak(spec) < peak:
                peak, policy, units = self.peak(spec), spec, deep
        for _ in range(rounds):
            moves = {}
            for nxt in neighbours(units):
                spec = policy_of_units(self.profile, nxt)[0]
                if spec_text(spec) not in seen:
                    kept = option_of(self.profile, nxt, self.grads_after).kept  # among equal peaks: keeps less
                    moves.setdefault(spec_text(spec), (self._units_peak(nxt), kept, spec_text(spec), spec, nxt))
            tried = [(peak_, text, spec, nxt) for peak_, _, text, spec, nxt in
                     sorted(moves.values(), key=lambda m: m[:3])[:per_round]]
            if not tried:
                break
            self.progress(f"least-memory search: {format_size(peak)} so far, measuring {len(tried)} neighbours")
            seen.update(text for _, text, _, _ in tried)
            better = min(((self.peak(spec), text, spec, nxt) for _, text, spec, nxt in tried), key=lambda m: m[:2])
            if better[0] >= peak:
                break
            peak, _, policy, units = better
        known = _LEAST.setdefault(network_key(self.network), [])
        if all(spec_text(policy) != spec_text(k) for k in known):
            known.append(policy)
        self._smallest = (policy, peak)
        return self._smallest

    def _smallest_nested(self, stop_at: int | None, measurements: int) -> tuple[PolicySpec, int]:
        """The greedy nested search, resumable: a search stopped at ``stop_at`` goes on from where it stopped when
        asked for less; its path and its count of ``measurements`` do not depend on ``stop_at`` or on what other
        questions measured, so it ends where an uninterrupted search ends."""
        p = self.profile
        state = self._nested
        if state is None:  # start from the least policy without nesting: its full groups are the outer groups
            policy, peak = self.smallest()
            units = self._units(policy)
            state = self._nested = _NestedSearch(policy, peak, [(blocks,) for blocks, mode in units if mode == "full"],
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
                    self.progress(f"nested least-memory search: {format_size(state.peak)} so far, measuring move "
                                  f"{len(state.seen)} of at most {measurements}")
                measured = self.peak(spec)
                if measured < state.peak:
                    state.policy, state.peak, state.outer, improved = spec, measured, move, True
                    break
            state.finished = not improved
        return state.policy, state.peak


@dataclass
class _NestedSearch:
    """Where the greedy nested search stands: its least policy and peak, its outer groups (each a tuple of inner
    runs) and the other units, the moves it has evaluated, and whether it has ended (no move helps, or its
    measurements are spent)."""

    policy: PolicySpec
    peak: int
    outer: list
    others: list
    seen: set = field(default_factory=set)
    finished: bool = False


# a budget below this fraction of the least peak without nesting is not searched with nested policies: nesting lowers
# that least by about 10% (benchmark UNet at 256^3: 39.2% -> 35.3% of plain), never by half
NESTED_REACH = 0.5

_PLANNERS: OrderedDict[tuple, Planner] = OrderedDict()  # the last few planners of this process, by question
_PLANNER_CACHE_SIZE = 8


def get_planner(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str, loss: Callable | None,
             label: Any, device: torch.device, timing: bool = True,
             progress: Callable[[str], None] | None = None) -> Planner:
    """The planner for this question, made once per process (the profile, its times and every measured peak are
    kept): the same question gets the same answer."""
    label_key = label if isinstance(label, str) else (tuple(label.shape), label.dtype)
    key = (network_key(network), input_shape, amp, optimizer, id(loss), label_key, str(device), timing)
    if key in _PLANNERS:
        _PLANNERS.move_to_end(key)
        planner = _PLANNERS[key]
        planner.network, planner.progress = network, progress or (lambda message: None)
        return planner
    step = make_step(network, input_shape, amp, loss, label)
    planner = _PLANNERS[key] = Planner(network, input_shape, amp, optimizer, timing, step, device, progress)
    while len(_PLANNERS) > _PLANNER_CACHE_SIZE:
        _PLANNERS.popitem(last=False)
    return planner
