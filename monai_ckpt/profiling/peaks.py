"""Where a step's memory goes: live bytes after every operator (`memory_timeline`), and the tensors alive at the
peak with the operator and module that made each (`peak_tensors`): where a policy's peak comes from, and what no
policy can remove."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .step import MiB, steady_state
from .tracker import CATEGORY_NAMES, run_tracked_step

__all__ = ["LiveTensor", "PeakTensors", "memory_timeline", "peak_tensors"]

def memory_timeline(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    optimizer: str = "adam",
    amp: bool = False,
) -> list[tuple[int, int, str]]:
    """Live tensor bytes after every operator of one (steady-state) training step.

    Returns:
        ``(operator index, live bytes, phase)`` with phase ``"forward"``, ``"backward"`` or ``"optimizer"``.
    """
    points: list[tuple[int, int, str]] = []

    def after_operator(tracker: Any, func: Any, out: Any) -> None:
        points.append((len(points), tracker.live_bytes(), tracker.phase))

    with steady_state(factory, input_shape, estimate, torch.device("cpu"), optimizer, amp) as (model, opt, x, _):
        run_tracked_step(model, opt, x, amp, after_operator)
    return points


@dataclass
class LiveTensor:
    """A tensor storage alive at the peak: its bytes, category, and the operator, module and phase
    (``"forward"``, ``"backward"``, ``"optimizer"``; ``"setup"`` for weights, optimizer state and the batch)
    that made it."""

    nbytes: int
    category: str
    made_by: str
    module: str
    phase: str
    shape: tuple[int, ...] = ()
    dtype: str = ""


@dataclass
class PeakTensors:
    """The live tensors at the peak of one training step, largest first, and the operator running then."""

    peak: int
    operator: str
    phase: str
    tensors: list[LiveTensor]

    def format(self, min_bytes: int = MiB) -> str:
        """A table of the tensors of at least ``min_bytes``; the rest summed by category."""
        lines = [f"peak {self.peak / MiB:.0f} MiB during {self.operator} ({self.phase})",
                 "| MiB | category | made by | in module | phase | shape | dtype |", "|---:|---|---|---|---|---|---|"]
        small: dict[str, int] = {}
        for t in self.tensors:
            if t.nbytes >= min_bytes:
                shape = "x".join(map(str, t.shape))
                lines.append(f"| {t.nbytes / MiB:.4g} | {t.category} | {t.made_by} | {t.module} | {t.phase} | "
                             f"{shape} | {t.dtype} |")
            else:
                small[t.category] = small.get(t.category, 0) + t.nbytes
        lines += [f"| {v / MiB:.4g} | {k} | (tensors under {min_bytes / MiB:.0f} MiB) | | | | |"
                  for k, v in small.items()]
        return "\n".join(lines)


def peak_tensors(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    optimizer: str = "adam",
    amp: bool | torch.dtype = False,
) -> PeakTensors:
    """The tensors alive at the peak of one (steady-state) training step, as `measure_step_memory` counts
    them, each with the operator and (innermost) module that made it.

    Example::

        print(peak_tensors(lambda: CheckpointUNet(..., checkpoint_policy="all"), (2, 1, 256, 256, 256),
                           estimate=True).format())
    """
    from torch.utils.weak import WeakIdKeyDictionary

    made: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> (made by, module, phase, shape, dtype)
    best: list[Any] = [-1, "", "", []]

    def label(t: torch.Tensor, what: str, module: str, phase: str) -> None:
        if t.untyped_storage() not in made:
            made[t.untyped_storage()] = (what, module, phase, tuple(t.shape), str(t.dtype).replace("torch.", ""))

    def after_operator(tracker: Any, func: Any, out: Any) -> None:
        parents = tracker._mod_tracker.parents
        module = max(parents, key=lambda n: (n != "Global", n.count("."), len(n)), default="")
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                label(t, str(func), module, tracker.phase)
        total = tracker.live_bytes()
        if total > best[0]:
            live = []
            for st, (winfo, _) in list(tracker._WINFO.items()):
                if winfo.mem_consumed:
                    category = CATEGORY_NAMES.get(str(winfo.reftype.value), str(winfo.reftype.value))
                    live.append(LiveTensor(winfo.mem_consumed, category, *made.get(st, ("", "", "setup", (), ""))))
            best[:] = [total, str(func), tracker.phase, live]

    with steady_state(factory, input_shape, estimate, torch.device("cpu"), optimizer, amp) as (model, opt, x, _):
        for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
            label(p, "parameter" if isinstance(p, nn.Parameter) else "buffer", name, "setup")
        for state in (opt.state.values() if opt is not None else ()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    label(value, f"optimizer state {key}", "", "setup")
        label(x, "input batch", "", "setup")
        run_tracked_step(model, opt, x, amp, after_operator)
    peak, operator, at_phase, live = best
    return PeakTensors(peak, operator, at_phase, sorted(live, key=lambda t: -t.nbytes))
