"""Segment policies: which segments of a network are checkpointed, and how.

A network exposes an ordered list of `Segment` (execution order: encoder levels top-down, bottleneck,
decoder levels bottom-up, head). A segment is one or more consecutive *blocks* (its ``parts``, e.g.
``decoder0.0``, ``decoder0.1``: the MONAI blocks it is made of). A policy is a plain, JSON-friendly value
that `resolve_policy` turns into `CheckpointGroup` s: runs of consecutive blocks, each run recomputed as
one unit in backward with a checkpoint mode from `monai_ckpt.checkpoint.CHECKPOINT_MODES`. Blocks in no
group run plainly.

Valid specs:

- ``"none"``: no checkpointing.
- ``"all"``: every segment on its own.
- ``"blocks"``: every block of every segment on its own (finer than ``"all"``: less to recompute at a
  time, more boundaries kept).
- ``"encoder"``, ``"bottleneck"``, ``"decoder"``, ``"head"``: every segment of that kind on its own.
- ``"sqrt"``: runs of about sqrt(n) segments (Chen et al., 2016), so that ~sqrt(n) boundaries are kept.
- ``"cheap"``: every segment, keeping convolution outputs and recomputing only norm/activation/elementwise.
- ``"offload"``: every segment's saved tensors go to (pinned) CPU memory; nothing is recomputed.
- ``{"every": k}``: runs of k consecutive segments.
- ``{"segments": k}``: k runs of (nearly) equal length over the whole network (k at most its number of segments).
- a list of segment or block names, e.g. ``["encoder0", "decoder0.1"]``: those segments/blocks, each on
  its own. An inner list is one group: ``[["decoder0.0", "decoder0.1"], "decoder0.2"]`` recomputes the
  first two blocks of ``decoder0`` together and its last block on its own (the names of a group must be
  consecutive in execution order).
- a list mixing names and dicts: the union of those sub-policies, which must not overlap, e.g.
  ``[{"kind": "encoder"}, {"names": ["decoder0"], "mode": "cheap"}]``.
- a dict may add ``"mode"`` (``"full"``, ``"cheap"`` or ``"offload"``) to any of the above:
  ``{"kind": "decoder", "mode": "cheap"}``, ``{"names": [...], "mode": "cheap"}``, ``{"every": 2, "mode": ...}``.
- ``"mode": "nested"`` (opt-in, never chosen by default; the planner uses it only when nothing else fits): each
  group is recomputed in full, and inside that recomputation runs of its blocks are checkpointed again, so the
  group's recomputation keeps only the boundaries of those runs and each run is recomputed once more in its own
  backward (a block runs at most three times per training step; outputs, gradients and BatchNorm statistics stay
  bit-identical). With ``"names"``, an entry that is a name makes its segment the outer group and each of its
  blocks an inner run; an entry that is a list is one outer group whose items are its inner runs, each a
  name (a block, or a segment's blocks as one run) or a list of names (one run), e.g.
  ``{"names": ["decoder1", ["decoder0.0", ["decoder0.1", "decoder0.2"]]], "mode": "nested"}``. A block of an
  outer group in no inner run runs plainly inside the group's recomputation: ``{"plain": name or names}`` as an
  item of an outer group. With ``"every"``, ``"segments"`` or ``"kind"`` each group's blocks are its inner runs,
  one block each (a group of one block is just recomputed in full).
- ``{"budget_gb": X}`` (optionally with ``"optimizer"``: ``"adam"``, ``"sgd"`` or ``"none"``, and ``"headroom_gb"``:
  what of X the device needs beyond live tensors, see `monai_ckpt.planner.plan`): the planner
  (`monai_ckpt.planner`) chooses, for each input shape a network sees in training, the fastest policy whose
  training step fits in X GiB. It is not a list of groups: networks resolve it when they see the input.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from .checkpoint import CHECKPOINT_MODES

__all__ = ["SEGMENT_KINDS", "POLICY_MODES", "Segment", "CheckpointGroup", "PolicySpec", "is_budget_policy",
           "resolve_policy", "validate_policy"]

SEGMENT_KINDS = ("encoder", "bottleneck", "decoder", "head")
NAMED_POLICIES = ("none", "all", "blocks", *SEGMENT_KINDS, "sqrt", "cheap", "offload")
_DICT_KEYS = ("every", "segments", "kind", "names", "mode")
NESTED = "nested"
POLICY_MODES = (*CHECKPOINT_MODES, NESTED)
_BUDGET_KEYS = ("budget_gb", "optimizer", "headroom_gb")
_OPTIMIZERS = ("adam", "sgd", "none")

PolicySpec = Union[str, Sequence[str], dict]

VALID_POLICIES_TEXT = (
    f"{', '.join(repr(p) for p in NAMED_POLICIES)}, {{'every': k}}, {{'segments': k}}, {{'kind': ...}}, "
    "{'names': [...]}, a list of segment/block names, {'budget_gb': X} (details: monai_ckpt.policies)"
)


@dataclass(frozen=True)
class Segment:
    """One checkpointable piece of a network.

    Attributes:
        name: stable name used in policies, e.g. ``"encoder0"``, ``"bottleneck"``, ``"decoder2"``.
        level: resolution level, 0 for the highest resolution.
        kind: one of ``"encoder"``, ``"bottleneck"``, ``"decoder"``, ``"head"``.
        parts: names of its blocks in execution order when it has more than one (``"decoder0.0"``, ...).
    """

    name: str
    level: int
    kind: str
    parts: tuple[str, ...] = ()

    @property
    def blocks(self) -> tuple[str, ...]:
        """Its blocks' names: ``parts``, or just its own name."""
        return self.parts or (self.name,)


@dataclass(frozen=True)
class CheckpointGroup:
    """Consecutive blocks recomputed together in backward, with a checkpoint mode.

    Attributes:
        names: the blocks, in execution order.
        mode: the checkpoint mode of the group (see `monai_ckpt.checkpoint.CHECKPOINT_MODES`).
        inner: for a nested group (mode ``"full"``), the runs of its blocks checkpointed again inside its
            recomputation, in order; blocks in no run run plainly there. Empty for a group that does not nest.
    """

    names: tuple[str, ...]
    mode: str = "full"
    inner: tuple[tuple[str, ...], ...] = ()


def _bad(spec: Any, why: str = "") -> ValueError:
    """A spec of no known kind: the bad value first, a near miss it may be, then the valid kinds, once."""
    hint = ""
    if isinstance(spec, str):
        close = difflib.get_close_matches(spec.lower(), NAMED_POLICIES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    why = f" ({why})" if why else ""
    return ValueError(f"unknown checkpoint_policy {spec!r}{hint}{why}; valid policies are {VALID_POLICIES_TEXT}.")


def _bad_value(spec: Any, why: str) -> ValueError:
    """A spec of a known kind with a bad value: the value first, then what would be right (no list of kinds)."""
    return ValueError(f"bad checkpoint_policy {spec!r}: {why}.")


def _positive_int(spec: Any, key: str) -> int:
    value = spec[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad_value(spec, f"{key!r} must be a positive integer, got {value!r}")
    return value


def _unknown_keys(spec: dict, valid: Sequence[str]) -> ValueError:
    unknown = sorted(map(str, set(spec) - set(valid)))
    close = [difflib.get_close_matches(k, valid, n=1, cutoff=0.6) for k in unknown]
    hint = "".join(f" (did you mean {c[0]!r} for {k!r}?)" for k, c in zip(unknown, close) if c)
    if "budget_gb" in spec:
        return _bad_value(spec, f"a budget policy takes only {list(_BUDGET_KEYS)}, not {unknown}{hint}")
    return _bad_value(spec, f"unknown key(s) {unknown}{hint}; a policy dict takes one of 'every', 'segments', "
                            "'kind', 'names' (and an optional 'mode'), or 'budget_gb' (and optional 'optimizer', "
                            "'headroom_gb')")


def validate_policy(spec: Any) -> PolicySpec:
    """Check that ``spec`` is a valid policy and return it in canonical form (lists as lists).

    Raises:
        ValueError: for a spec of no known kind, the bad value, a near miss (``"ALL"``: did you mean ``'all'``?)
            and the valid kinds; for a known kind with a bad value (``{"budget_gb": -1}``), the value and what
            would be right.
    """
    if isinstance(spec, str):
        if spec not in NAMED_POLICIES:
            raise _bad(spec)
        return spec
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(n, (str, dict)) or _is_name_group(n) for n in spec):
            raise _bad_value(spec, "a list must hold one or more segment names, lists of names (one group each) or "
                                   "policy dicts")
        return [validate_policy(n) if isinstance(n, dict) else list(n) if isinstance(n, (list, tuple)) else n
                for n in spec]
    if isinstance(spec, dict) and "budget_gb" in spec:
        if set(spec) - set(_BUDGET_KEYS):
            raise _unknown_keys(spec, _BUDGET_KEYS)
        budget = spec["budget_gb"]
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise _bad_value(spec, f"'budget_gb' must be a positive number of GiB, got {budget!r}")
        if spec.get("optimizer", "adam") not in _OPTIMIZERS:
            raise _bad_value(spec, f"'optimizer' must be one of {_OPTIMIZERS}, got {spec['optimizer']!r}")
        headroom = spec.get("headroom_gb")
        if "headroom_gb" in spec and (isinstance(headroom, bool) or not isinstance(headroom, (int, float))
                                      or not 0 < headroom < budget):
            raise _bad_value(spec, f"'headroom_gb' must be a positive number of GiB below 'budget_gb', got {headroom!r}")
        return dict(spec)
    if isinstance(spec, dict):
        if set(spec) - set(_DICT_KEYS):
            raise _unknown_keys(spec, (*_DICT_KEYS, *_BUDGET_KEYS))
        selectors = [k for k in ("every", "segments", "kind", "names") if k in spec]
        if len(selectors) != 1:
            raise _bad_value(spec, "give exactly one of 'every', 'segments', 'kind', 'names'")
        if spec.get("mode", "full") not in POLICY_MODES:
            raise _bad_value(spec, f"'mode' must be one of {POLICY_MODES}, got {spec['mode']!r}")
        key = selectors[0]
        if key in ("every", "segments"):
            _positive_int(spec, key)
        elif key == "kind" and spec["kind"] not in SEGMENT_KINDS:
            raise _bad_value(spec, f"'kind' must be one of {SEGMENT_KINDS}, got {spec['kind']!r}")
        elif key == "names" and spec.get("mode") == NESTED:
            return {**spec, "names": _validate_nested_names(spec)}
        elif key == "names":
            names = spec["names"]
            if isinstance(names, (list, tuple)) and any(isinstance(n, dict) for n in names):
                raise _bad_value(spec, "'names' holds segment/block names and lists of them, not policy dicts")
            if isinstance(names, str):
                raise _bad_value(spec, f"'names' takes a list of segment/block names, e.g. {{'names': [{names!r}]}}")
            validate_policy(names)
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.items()}
    raise _bad(spec)


def _validate_nested_names(spec: dict) -> list:
    """The ``"names"`` of a nested policy in canonical form: names, and outer groups (lists) whose items are
    names, lists of names or ``{"plain": names}``."""
    names = spec["names"]
    if isinstance(names, str):
        names = [names]
    why = ("in mode 'nested', 'names' is a list whose entries are segment/block names (the segment nested, "
           "each of its blocks an inner run) or outer groups: lists of inner runs, each a name or a list of names, "
           "or {'plain': names} for blocks run without an inner checkpoint")
    if not isinstance(names, (list, tuple)) or not names:
        raise _bad_value(spec, why)
    canonical: list = []
    for entry in names:
        if isinstance(entry, str):
            canonical.append(entry)
            continue
        if not isinstance(entry, (list, tuple)) or not entry:
            raise _bad_value(spec, why)
        group: list = []
        for item in entry:
            if isinstance(item, dict):
                if set(item) != {"plain"} or not (isinstance(item["plain"], str) or _is_name_group(item["plain"])):
                    raise _bad_value(spec, why)
                item = {"plain": [item["plain"]] if isinstance(item["plain"], str) else list(item["plain"])}
            elif _is_name_group(item):
                item = list(item)
            elif not isinstance(item, str):
                raise _bad_value(spec, why)
            group.append(item)
        canonical.append(group)
    return canonical


def _is_name_group(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(n, str) for n in value)


def is_budget_policy(spec: Any) -> bool:
    """Whether ``spec`` is a ``{"budget_gb": X}`` policy, which the planner resolves per input shape."""
    return isinstance(spec, dict) and "budget_gb" in spec


def _runs(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _even_runs(n: int, count: int) -> list[range]:
    count = min(count, n)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _union(specs: list, segments: Sequence[Segment]) -> list[CheckpointGroup]:
    """A list of sub-policies: the union of their groups, which must not overlap."""
    order = {b: i for i, b in enumerate(b for s in segments for b in s.blocks)}
    groups: list[CheckpointGroup] = []
    for sub in specs:
        groups += resolve_policy(sub if isinstance(sub, dict) else [sub], segments)
    seen: dict[str, CheckpointGroup] = {}
    for g in groups:
        for name in g.names:
            if name in seen:
                raise ValueError(f"checkpoint_policy {specs!r} puts block {name!r} in two groups; sub-policies "
                                 "of a list must not overlap.")
            seen[name] = g
    return sorted(groups, key=lambda g: order[g.names[0]])


def resolve_policy(spec: Any, segments: Sequence[Segment]) -> list[CheckpointGroup]:
    """Turn a policy spec into the checkpoint groups of a network with these ordered ``segments``.

    Raises:
        ValueError: for an invalid spec, or segment/block names the network does not have.
    """
    spec = validate_policy(spec)
    if is_budget_policy(spec):
        raise ValueError(f"checkpoint_policy {spec!r} is chosen by the planner for an input shape: give it to a "
                         "network's checkpoint_policy, or call monai_ckpt.planner.plan().")
    if isinstance(spec, list) and any(isinstance(n, dict) for n in spec):
        return _union(spec, segments)
    mode = "full"
    if isinstance(spec, dict):
        mode = spec.get("mode", "full")
        spec = {k: v for k, v in spec.items() if k != "mode"}
        ((key, value),) = spec.items()
        if mode == NESTED and key == "names":
            return _nested_groups(value, segments)
        spec = {"kind": value, "names": value}.get(key, spec)
    if spec in ("cheap", "offload"):
        mode, spec = spec, "all"
    n = len(segments)
    if spec == "none":
        runs: list[list[Segment]] = []
    elif spec in ("all", "blocks"):
        runs = [[s] for s in segments]
    elif spec in SEGMENT_KINDS:
        runs = [[s] for s in segments if s.kind == spec]
    elif spec == "sqrt":
        runs = [list(segments[r.start : r.stop]) for r in _runs(n, max(1, math.ceil(math.sqrt(n))))]
    elif isinstance(spec, dict) and "every" in spec:
        runs = [list(segments[r.start : r.stop]) for r in _runs(n, spec["every"])]
    elif isinstance(spec, dict) and "segments" in spec:
        if spec["segments"] > n:
            raise ValueError(f"checkpoint_policy {{'segments': {spec['segments']}}} asks for more runs than this "
                             f"network has segments ({n}): give at most {{'segments': {n}}} (one run per segment, "
                             "as 'all').")
        runs = [list(segments[r.start : r.stop]) for r in _even_runs(n, spec["segments"])]
    else:
        return _named_groups(spec, segments, mode)
    blocks = [tuple(b for s in run for b in s.blocks) for run in runs if run]
    if spec == "blocks":
        blocks = [(b,) for run in blocks for b in run]
    if mode == NESTED:
        return [CheckpointGroup(run, "full", tuple((b,) for b in run) if len(run) > 1 else ()) for run in blocks]
    return [CheckpointGroup(run, mode) for run in blocks]


def _named_groups(names: Sequence[str], segments: Sequence[Segment], mode: str) -> list[CheckpointGroup]:
    by_segment = {s.name: s.blocks for s in segments}
    all_blocks = [b for s in segments for b in s.blocks]
    entries = list(dict.fromkeys((n,) if isinstance(n, str) else tuple(n) for n in names))  # a name: a group of one
    missing = [n for entry in entries for n in entry if n not in by_segment and n not in all_blocks]
    if missing:
        known = [s.name for s in segments]
        parts = [b for s in segments if s.parts for b in s.parts]
        raise ValueError(
            f"checkpoint_policy names segment(s) {missing} that this network does not have; its segments are "
            f"{known}" + (f" and its blocks {parts}." if parts else ".")
        )
    order = {b: i for i, b in enumerate(all_blocks)}
    groups = []
    for entry in entries:
        group = tuple(b for n in entry for b in by_segment.get(n, (n,)))
        if [order[b] for b in group] != list(range(order[group[0]], order[group[0]] + len(group))):
            raise ValueError(f"checkpoint_policy group {list(entry)!r} is not a run of consecutive blocks in execution "
                             f"order; the blocks are, in order: {all_blocks}.")
        groups.append(group)
    taken = [b for g in groups for b in g]
    if len(taken) != len(set(taken)):
        raise ValueError(f"checkpoint_policy {list(names)!r} names a block twice (a segment and one of its blocks).")
    return [CheckpointGroup(g, mode) for g in sorted(groups, key=lambda g: order[g[0]])]


def _nested_groups(names: Sequence, segments: Sequence[Segment]) -> list[CheckpointGroup]:
    """The groups of ``{"names": names, "mode": "nested"}`` (names in the canonical form of
    `_validate_nested_names`)."""
    by_segment = {s.name: s.blocks for s in segments}

    def blocks_of(members: Sequence[str]) -> tuple[str, ...]:
        return tuple(b for n in members for b in by_segment.get(n, (n,)))

    outer: list = []
    runs_of: list[list[tuple[str, ...]]] = []
    for entry in names:
        if isinstance(entry, str):  # a segment nested: each of its blocks an inner run
            outer.append(entry)
            runs_of.append([(b,) for b in blocks_of([entry])])
            continue
        members = [item["plain"] if isinstance(item, dict) else [item] if isinstance(item, str) else item
                   for item in entry]
        outer.append([n for m in members for n in m])
        runs_of.append([blocks_of(m) for item, m in zip(entry, members) if not isinstance(item, dict)])
    order = [g.names for g in _named_groups(outer, segments, "full")]  # checks names, order and overlaps
    nested = []
    for entry, runs in zip(outer, runs_of):
        blocks = blocks_of([entry] if isinstance(entry, str) else entry)
        if len(runs) == 1 and runs[0] == blocks and len(blocks) > 1:
            raise ValueError(f"checkpoint_policy nested group {entry!r} has one inner run that is the whole group: "
                             "nesting it recomputes the same blocks twice for nothing; give two or more inner runs, "
                             "e.g. one per block.")
        nested.append(CheckpointGroup(blocks, "full", tuple(runs) if len(blocks) > 1 else ()))
    return sorted(nested, key=lambda g: order.index(g.names))
