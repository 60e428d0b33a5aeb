"""The search: a `Planner` profiles a network once per question, then answers the measured peak of a policy, the
model's peak and time, the fastest policy under a budget (`Planner.plan`) and the least-memory policy
(`Planner.smallest`, nested only on request; the search itself is in `least_memory`). Every policy it measures is a
candidate of every plan it makes; `get_planner` keeps the last few planners of the process, so the same question
gets the same answer."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..policies import PolicySpec, resolve_policy
from .compiled import FINE_COMPILE_BUDGETS, CompiledStep, compile_budgets
from .least_memory import FIXED_POLICIES, NestedSearch, least_memory, nested_least_memory, network_key, spec_text
from .model import (
    group_labels,
    option_of,
    param_grads_after,
    policy_of,
    segment_options,
    solve,
    undominated,
    units_of,
)
from .profile import ChainProfile, chain_times, profile_chain
from .result import GiB, Plan, format_size
from .step import FakeStep, PlannedStep, make_step

__all__ = ["FIXED_POLICIES", "Planner", "forget_planners", "get_planner", "network_key", "spec_text"]

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
        self._nested: NestedSearch | None = None

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
            found = self.fastest(limit, tries=5) or self.fastest(limit, tries=8)  # as below "all": bracket further
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
        """The policy with the smallest measured peak (`least_memory.least_memory`); with ``nested`` (the opt-in
        mode ``"nested"``), from that policy on, the greedy search over nested groups
        (`least_memory.nested_least_memory`) until no move helps, the peak is at most ``stop_at`` bytes, or
        ``measurements`` are spent. Returns the least found, nested or not."""
        if nested:
            return nested_least_memory(self, stop_at, measurements)
        if self._smallest is None:
            self._smallest = least_memory(self, rounds, per_round)
        return self._smallest


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


def forget_planners(network: nn.Module) -> None:
    """Drop the kept planners of ``network``: a caller that built the network for one question frees its weights
    and profile (a clinical nnU-Net network and its timing replicas are gigabytes)."""
    for key in [key for key, planner in _PLANNERS.items() if planner.network is network]:
        del _PLANNERS[key]
