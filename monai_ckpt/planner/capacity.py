"""Capacity: how large a patch or batch fits a budget (`max_patch_edge`, `max_batch_size`), and a table of the
largest patch per budget without and with checkpointing and AMP (`capacity_table`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from ..policies import PolicySpec
from .device import budget_bytes
from .result import GiB
from .search import get_planner
from .step import input_shape_of, measured_peak, parameter_device

__all__ = ["DEFAULT_BUDGETS_GB", "capacity_table", "format_capacity_table", "max_batch_size", "max_patch_edge"]

DEFAULT_BUDGETS_GB = (8, 10, 12, 16, 24, 32, 40, 48, 80)


class Capacity:
    """Peaks of one network at many sizes, for one policy: exact (fake-tensor MemTracker) measurements, with
    a straight line through two of them (activations grow with the voxels) to guess where to measure."""

    def __init__(self, network: nn.Module, policy: PolicySpec, amp: bool, optimizer: str) -> None:
        self.network, self.policy, self.amp, self.optimizer = network, policy, amp, optimizer
        self._peaks: dict[tuple[int, ...], int] = {}

    def peak(self, input_shape: tuple[int, ...]) -> int:
        if input_shape not in self._peaks:
            self._peaks[input_shape] = measured_peak(self.network, self.policy, input_shape, self.amp, self.optimizer)
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


def least_memory_policy(network: nn.Module, input_shape: tuple[int, ...], amp: bool, optimizer: str) -> PolicySpec:
    """The least-memory policy at ``input_shape`` (the search `plan` falls back on; remembered for this network,
    so that `plan` at any shape tries it too)."""
    where = parameter_device(network)
    # two rounds of local moves: a capacity search asks at many sizes; plan() at the size it picks tries this policy
    return get_planner(network, input_shape, amp, optimizer, None, "index", where, timing=False).smallest(rounds=2)[0]


def patch_edges(network: nn.Module, max_edge: int) -> list[int]:
    dims = len(network.size_multiple())
    step = math.lcm(*network.size_multiple())
    # from two steps up: at one step the deepest level is a single voxel, which instance norm cannot train on
    return [e for e in range(2 * step, max_edge + 1, step) if network._accepts((e,) * dims)]


def reference_edge(edges: Sequence[int]) -> int:
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
    budget = budget_bytes(budget_gb)
    edges = patch_edges(network, max_edge)
    dims = len(network.size_multiple())
    shape_of = lambda e: input_shape_of(network, (e,) * dims, batch_size)
    policy = least_memory_policy(network, shape_of(reference_edge(edges)), amp, optimizer) if checkpointing else "none"
    return Capacity(network, policy, amp, optimizer).largest(edges, shape_of, budget)


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
    budget = budget_bytes(budget_gb)
    shape_of = lambda b: input_shape_of(network, spatial_shape, b)
    policy = least_memory_policy(network, shape_of(1), amp, optimizer) if checkpointing else "none"
    return Capacity(network, policy, amp, optimizer).largest(list(range(1, max_batch + 1)), shape_of, budget)


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
        budget_bytes(budget)
    edges = patch_edges(network, max_edge)
    dims = len(network.size_multiple())
    shape_of = lambda e: input_shape_of(network, (e,) * dims, batch_size)
    reference = shape_of(reference_edge(edges))
    report = progress or (lambda message: None)
    columns = {}
    for amp in (False, True):
        columns[("plain", amp)] = Capacity(network, "none", amp, optimizer)
        report(f"the least-memory policy at {reference}{' with amp' if amp else ''}")
        columns[("checkpointed", amp)] = Capacity(network, least_memory_policy(network, reference, amp, optimizer),
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
