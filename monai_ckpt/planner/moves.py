"""Local moves of the least-memory search: policies one move away from a chain's units (`neighbours`,
`merge_deep`), and the opt-in nested mode's moves (`nesting_moves`, `nested_spec`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..policies import PolicySpec
from .model import policy_of_units
from .profile import ChainProfile

__all__ = ["merge_deep", "neighbours", "nested_spec", "nesting_moves"]

def merge_deep(p: ChainProfile, units: tuple, level: int) -> tuple:
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


def neighbours(units: tuple) -> Iterator[tuple]:
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


def nested_spec(p: ChainProfile, units: Sequence[tuple[tuple[int, ...], str]],
                 nested: Sequence[tuple[tuple[int, ...], ...]]) -> PolicySpec:
    """The policy of ``units`` (as `policy_of_units`) plus ``nested`` groups, each given by its inner runs (block
    indices): ``{"names": [[run, run, ...], ...], "mode": "nested"}`` next to the non-nested groups."""
    spec, _ = policy_of_units(p, units)
    if not nested:
        return spec
    spec = [] if spec == "none" else [{"names": spec}] if isinstance(spec[0], (str, list)) else list(spec)
    groups = [[[p.costs[b].block for b in run] for run in runs] for runs in nested]
    return spec + [{"names": groups, "mode": "nested"}]


def nesting_moves(p: ChainProfile, outer: list[tuple[tuple[int, ...], ...]]) -> Iterator[list]:
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
