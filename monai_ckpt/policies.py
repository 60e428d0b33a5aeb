"""Segment policies: which segments of a network are checkpointed, and how.

A network exposes an ordered list of `Segment` (execution order: encoder levels top-down, bottleneck,
decoder levels bottom-up, head). A policy is a plain, JSON-friendly value that `resolve_policy` turns into
`CheckpointGroup` s: runs of consecutive segments, each run recomputed as one unit in backward with a
checkpoint mode from `monai_ckpt.checkpoint.CHECKPOINT_MODES`. Segments in no group run plainly.

Valid specs:

- ``"none"``: no checkpointing.
- ``"all"``: every segment on its own.
- ``"encoder"``, ``"bottleneck"``, ``"decoder"``, ``"head"``: every segment of that kind on its own.
- ``"sqrt"``: runs of about sqrt(n) segments (Chen et al., 2016), so that ~sqrt(n) boundaries are kept.
- ``"cheap"``: every segment, keeping convolution outputs and recomputing only norm/activation/elementwise.
- ``"offload"``: every segment's saved tensors go to (pinned) CPU memory; nothing is recomputed.
- ``{"every": k}``: runs of k consecutive segments.
- ``{"segments": k}``: k runs of (nearly) equal length over the whole network.
- a list of segment names, e.g. ``["encoder0", "decoder0"]``: those segments, each on its own.
- a list mixing names and dicts: the union of those sub-policies, which must not overlap, e.g.
  ``[{"kind": "encoder"}, {"names": ["decoder0"], "mode": "cheap"}]``.
- a dict may add ``"mode"`` (``"full"``, ``"cheap"`` or ``"offload"``) to any of the above:
  ``{"kind": "decoder", "mode": "cheap"}``, ``{"names": [...], "mode": "cheap"}``, ``{"every": 2, "mode": ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from .checkpoint import CHECKPOINT_MODES

__all__ = ["SEGMENT_KINDS", "Segment", "CheckpointGroup", "PolicySpec", "validate_policy", "resolve_policy"]

SEGMENT_KINDS = ("encoder", "bottleneck", "decoder", "head")
NAMED_POLICIES = ("none", "all", *SEGMENT_KINDS, "sqrt", "cheap", "offload")
_DICT_KEYS = ("every", "segments", "kind", "names", "mode")

PolicySpec = Union[str, Sequence[str], dict]

VALID_POLICIES_TEXT = (
    f"{', '.join(repr(p) for p in NAMED_POLICIES)}, {{'every': k}}, {{'segments': k}}, "
    "a list of segment names and/or such dicts, or a dict of one of 'every'/'segments'/'kind'/'names' with an optional "
    f"'mode' in {CHECKPOINT_MODES}"
)


@dataclass(frozen=True)
class Segment:
    """One checkpointable piece of a network.

    Attributes:
        name: stable name used in policies, e.g. ``"encoder0"``, ``"bottleneck"``, ``"decoder2"``.
        level: resolution level, 0 for the highest resolution.
        kind: one of ``"encoder"``, ``"bottleneck"``, ``"decoder"``, ``"head"``.
    """

    name: str
    level: int
    kind: str


@dataclass(frozen=True)
class CheckpointGroup:
    """Consecutive segments recomputed together in backward, with a checkpoint mode."""

    names: tuple[str, ...]
    mode: str = "full"


def _bad(spec: Any, why: str = "") -> ValueError:
    why = f" ({why})" if why else ""
    return ValueError(f"unknown checkpoint_policy {spec!r}{why}; valid policies are {VALID_POLICIES_TEXT}.")


def _positive_int(spec: Any, key: str) -> int:
    value = spec[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad(spec, f"{key!r} must be a positive integer")
    return value


def validate_policy(spec: Any) -> PolicySpec:
    """Check that ``spec`` is a valid policy and return it in canonical form (lists as lists).

    Raises:
        ValueError: with the list of valid policies, for anything else.
    """
    if isinstance(spec, str):
        if spec not in NAMED_POLICIES:
            raise _bad(spec)
        return spec
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(n, (str, dict)) for n in spec):
            raise _bad(spec, "a list must hold one or more segment names or policy dicts")
        if any(isinstance(n, dict) for n in spec):
            return [validate_policy(n) if isinstance(n, dict) else n for n in spec]
        return list(spec)
    if isinstance(spec, dict):
        unknown = set(spec) - set(_DICT_KEYS)
        if unknown:
            raise _bad(spec, f"unknown key(s) {sorted(unknown)}")
        selectors = [k for k in ("every", "segments", "kind", "names") if k in spec]
        if len(selectors) != 1:
            raise _bad(spec, "give exactly one of 'every', 'segments', 'kind', 'names'")
        if spec.get("mode", "full") not in CHECKPOINT_MODES:
            raise _bad(spec, f"'mode' must be one of {CHECKPOINT_MODES}")
        key = selectors[0]
        if key in ("every", "segments"):
            _positive_int(spec, key)
        elif key == "kind" and spec["kind"] not in SEGMENT_KINDS:
            raise _bad(spec, f"'kind' must be one of {SEGMENT_KINDS}")
        elif key == "names":
            validate_policy(spec["names"])
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.items()}
    raise _bad(spec)


def _runs(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _even_runs(n: int, count: int) -> list[range]:
    count = min(count, n)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _union(specs: list, segments: Sequence[Segment]) -> list[CheckpointGroup]:
    """A list of sub-policies: the union of their groups, which must not overlap."""
    order = {s.name: i for i, s in enumerate(segments)}
    groups: list[CheckpointGroup] = []
    for sub in specs:
        groups += resolve_policy([sub] if isinstance(sub, str) else sub, segments)
    seen: dict[str, CheckpointGroup] = {}
    for g in groups:
        for name in g.names:
            if name in seen:
                raise ValueError(f"checkpoint_policy {specs!r} puts segment {name!r} in two groups; sub-policies "
                                 "of a list must not overlap.")
            seen[name] = g
    return sorted(groups, key=lambda g: order[g.names[0]])


def resolve_policy(spec: Any, segments: Sequence[Segment]) -> list[CheckpointGroup]:
    """Turn a policy spec into the checkpoint groups of a network with these ordered ``segments``.

    Raises:
        ValueError: for an invalid spec, or segment names the network does not have.
    """
    spec = validate_policy(spec)
    names = [s.name for s in segments]
    if isinstance(spec, list) and any(isinstance(n, dict) for n in spec):
        return _union(spec, segments)
    mode = "full"
    if isinstance(spec, dict):
        mode = spec.get("mode", "full")
        spec = {k: v for k, v in spec.items() if k != "mode"}
        (key, value), = spec.items()
        spec = {"kind": value, "names": value}.get(key, spec)
    if spec in ("cheap", "offload"):
        mode, spec = spec, "all"
    n = len(names)
    if spec == "none":
        runs: list[range] = []
    elif spec == "all":
        runs = _runs(n, 1)
    elif spec in SEGMENT_KINDS:
        runs = [range(i, i + 1) for i, s in enumerate(segments) if s.kind == spec]
    elif spec == "sqrt":
        runs = _runs(n, max(1, math.ceil(math.sqrt(n))))
    elif isinstance(spec, dict) and "every" in spec:
        runs = _runs(n, spec["every"])
    elif isinstance(spec, dict) and "segments" in spec:
        runs = _even_runs(n, spec["segments"])
    else:
        missing = [name for name in spec if name not in names]
        if missing:
            raise ValueError(
                f"checkpoint_policy names segment(s) {missing} that this network does not have; "
                f"its segments are {names}."
            )
        runs = [range(i, i + 1) for i, name in enumerate(names) if name in spec]
    return [CheckpointGroup(tuple(names[i] for i in run), mode) for run in runs if len(run)]
