"""The search: a `Planner` profiles a network once per question, then answers the measured peak of a policy, the
model's peak and time, the fastest policy under a budget (`Planner.plan`) and the least-memory policy
(`Planner.smallest`, nested only on request). Every policy it measures is a candidate of every plan it makes;
`get_planner` keeps the last few planners of the process, so the same question gets the same answer."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
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
from .profile import ChainProfile, profile_chain
from .result import GiB, Plan, format_size
from .step import PlannedStep, make_step, measured_peak

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
        self._profile: ChainProfile | None = None
        self._smallest: tuple[PolicySpec, int] | None = None
        self._smallest_nested_found: tuple[PolicySpec, int] | None = None
        self._smallest_nested_done = False
        self._nested_search: tuple[list, list] = ([], [])  # outer groups and other units where the search stopped

    @property
    def profile(self) -> ChainProfile:
        if self._profile is None:
            self.progress(f"profiling the blocks at {self.input_shape}" + (" and timing them" if self.timing else ""))
            self._profile = profile_chain(self.network, self.input_shape, self.amp, self.optimizer, self.timing,
                                          self.step, self.device)
            self.grads_after = param_grads_after(self._profile)
            # Calibrate the model on two measured points. Without checkpointing the loss is where the step peaks
            # (everything the forward kept is alive): the loss term is set so that this point equals the
            # measurement; then the constant so that the model is not below either point.
            plain = option_of(self._profile, self._units("none"), self.grads_after)
            self._profile.loss_bytes += min(0, self.peak("none") - self._profile.fixed_bytes - plain.kept
                                            - self._profile.loss_bytes)
            self._profile.fixed_bytes += max(self.peak(policy) - self.modelled_peak(policy)
                                             for policy in ("none", "all"))
            self.options = [undominated(segment_options(self._profile, blocks, self.grads_after))
                            for _, blocks in self._profile.segments]
        return self._profile

    def peak(self, policy: PolicySpec) -> int:
        """Exact peak of one training step with ``policy`` (MemTracker on fake tensors)."""
        key = spec_text(policy)
        if key not in self._peaks:
            self._peaks[key] = measured_peak(self.network, policy, self.input_shape, self.amp, self.optimizer,
                                              self.step)
            self._policies[key] = policy
        return self._peaks[key]

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
        p = self.profile
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
        self.progress(f"searching the fastest policy under {format_size(limit)}")
        tight = limit < self.peak("all")  # below "all": the least-memory search's ground, which tries these too
        found = self.fastest(limit, tries=3 if tight else 5)
        best_time = self.time_ratio(found[0]) if found else math.inf
        for fixed in () if tight else FIXED_POLICIES:  # never slower than a fixed policy that fits (the model is
            # within ~10% of the measured peak: one it puts further above the budget is not measured)
            if self.time_ratio(fixed) < best_time - 1e-9 and self.modelled_peak(fixed) <= 1.1 * limit:
                self.peak(fixed)
        if self._fastest_measured(limit) is None:
            self.progress(f"nothing measured fits {format_size(limit)} yet: searching the least-memory policy")
            least, peak = self.smallest(hopeless=limit)
            if tight and peak <= limit:
                # something fits, but the model's error at this budget outran three brackets (AttentionUnet at
                # 128^3: 0.17 GiB): bracket further, the least-memory policy is the fallback
                self.fastest(limit, tries=8)
        policy = self._fastest_measured(limit)
        if policy is None and peak > limit >= 0.5 * peak:
            # the opt-in nested mode, only now that no policy recomputing each block at most once fits
            self.progress(f"nothing without nesting fits {format_size(limit)}: searching nested policies")
            least, peak = self.smallest(nested=True, stop_at=limit)
            policy = least if peak <= limit else None
        if policy is None:
            raise ValueError(
                f"nothing fits {budget / GiB:.4g} GiB"
                + (f" ({format_size(limit)} for tensors after {format_size(headroom)} headroom)" if headroom else "")
                + f" for input {self.input_shape} (amp={self.amp}, optimizer={self.optimizer!r}, loss "
                f"{self.step.description}): the smallest peak reachable is {format_size(peak)}, with "
                f"checkpoint_policy={least!r} (without checkpointing {format_size(plain)}). Raise the budget, or reduce "
                "the batch or patch size, or use amp."
            )
        segments = self.network.checkpoint_segments()
        names = [] if policy == "none" else group_labels(resolve_policy(policy, segments), segments)
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
        least = None
        while hi - lo > max(1, hi // 1000):  # the least modelled peak, by bisection on the model budget
            mid = (lo + hi) // 2
            solved = solve(self.profile, mid, self.options)
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
        measured += [(self.peak(c), spec_text(c), c) for c in candidates if spec_text(c) in self._peaks]
        peak, _, policy = min(measured, key=lambda m: m[:2])
        if hopeless is not None and hopeless < 0.5 * peak:  # no move saves half: the search would not change the answer
            return policy, peak
        units = self._units(policy)
        # the deep levels as one run (what passes between their groups is then not kept): measured whatever the
        # model says, which cannot tell these apart (it counts a run's boundaries, not what its backward holds)
        for level in sorted({c.level for c in self.profile.costs}, reverse=True)[1:-1]:
            deep = merge_deep(self.profile, units, level)
            spec = policy_of_units(self.profile, deep)[0]
            if self.peak(spec) < peak:
                peak, policy, units = self.peak(spec), spec, deep
        for _ in range(rounds):
            moves = {}
            for nxt in neighbours(units):
                spec = policy_of_units(self.profile, nxt)[0]
                if spec_text(spec) not in self._peaks:
                    kept = option_of(self.profile, nxt, self.grads_after).kept  # among equal peaks: keeps less
                    moves.setdefault(spec_text(spec), (self._units_peak(nxt), kept, spec_text(spec), spec, nxt))
            tried = [(peak_, text, spec, nxt) for peak_, _, text, spec, nxt in
                     sorted(moves.values(), key=lambda m: m[:3])[:per_round]]
            if not tried:
                break
            self.progress(f"least-memory search: {format_size(peak)} so far, measuring {len(tried)} neighbours")
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
            for move in nesting_moves(p, outer):
                if spent >= measurements:
                    done = False
                    break
                flat = [(tuple(b for run in runs for b in run), "full") for runs in move if len(runs) == 1]
                spec = nested_spec(p, sorted(others + flat), [runs for runs in move if len(runs) > 1])
                if spec_text(spec) in self._peaks:
                    continue
                spent += 1
                self.progress(f"nested least-memory search: {format_size(peak)} so far, measuring a move")
                measured = self.peak(spec)
                if measured < peak:
                    peak, policy, outer, improved = measured, spec, move, True
                    break
            if not improved:
                break
        self._nested_search = (outer, others)
        self._smallest_nested_found, self._smallest_nested_done = (policy, peak), done
        return policy, peak


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
