"""What each block of a checkpoint-aware network keeps for backward, passes on and costs in time
(`block_costs`: the planner's profile), and what a forward saves for backward (`saved_for_backward`, which also
sees inside a ``torch.compile``d step)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..chain import run_steps
from ..checkpoint import cheap_keeps
from .step import autocast_dtype, build_network, fake_mode, parameter_device
from .timing import device_clock

__all__ = ["BlockCost", "block_costs", "block_key", "saved_for_backward", "storage_bytes", "storages_of"]

def saved_for_backward(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Run a training step's forward and backward (loss ``mean(out**2)``) and return the bytes of the distinct
    storages the forward saves for backward, the model's parameters and buffers excluded, and the output.

    These are the activations held from forward to backward, which checkpointing trades for recomputation. It also
    works for a ``torch.compile``d model, where MemTracker does not see inside the generated code: a compiled step
    hands everything it keeps to autograd as the saved tensors of one function. An eager checkpoint keeps its
    tensors through saved-tensor hooks of its own, which this does not see: for eager checkpointed networks use
    `measure_step_memory`.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().square().mean().backward()
    return sum(storages.values()), out.detach()


@dataclass
class BlockCost:
    """What one block of a checkpoint-aware network costs when it is not checkpointed.

    Attributes:
        block: block name (``"decoder0.1"``, or the segment name for a one-block segment).
        segment, kind, level: the segment it belongs to.
        saved_bytes: bytes of the tensors its forward saves for backward (parameters excluded; tensors
            that existed before the block, such as its input, excluded too).
        output_bytes: bytes of what it passes on: the boundary a checkpoint ending here keeps.
        forward_s: median forward time (with autograd recording; this process's CPU time, which other processes
            on a shared machine do not inflate), None in estimate mode.
        kept_bytes: bytes its forward leaves alive until its backward when it runs plainly (saved tensors
            and what it passes on, each storage once).
        next_bytes: of ``output_bytes``, the running tensor the next block takes.
        side_bytes: of ``output_bytes``, the rest: skips and residual branches pushed for later blocks, and
            emitted side-head outputs.
        cheap_bytes: bytes a ``"cheap"`` checkpoint keeps inside it besides what it passes on (the outputs of
            its convolutions and matmuls).
        input_bytes: bytes of the tensors it takes (the running tensor and the skips it pops).
        param_bytes: bytes of the parameters it uses (their gradients appear during its backward).
        cheap_recompute_s: of ``forward_s``, the time of the operators a ``"cheap"`` checkpoint recomputes.
        tail_s: of ``forward_s``, the time of the operators after its last saved tensor, which a checkpoint
            that ends with this block does not rerun (torch stops a recomputation once every saved tensor is
            back, e.g. before a final convolution, whose input is saved before it runs).
        cheap_tail_s: of ``cheap_recompute_s``, the part after its last saved tensor.
    """

    block: str
    segment: str
    kind: str
    level: int
    saved_bytes: int
    output_bytes: int
    forward_s: float | None = None
    kept_bytes: int = 0
    next_bytes: int = 0
    side_bytes: int = 0
    cheap_bytes: int = 0
    input_bytes: int = 0
    param_bytes: int = 0
    cheap_recompute_s: float | None = None
    tail_s: float | None = None
    cheap_tail_s: float | None = None


def storages_of(*tensors: torch.Tensor) -> dict[int, torch.UntypedStorage]:
    """Storages by id; the dict holds them, so an id cannot be reused while it is in use."""
    return {id(st): st for st in (t.untyped_storage() for t in tensors)}


def storage_bytes(storages: dict[int, torch.UntypedStorage]) -> int:
    return sum(st.nbytes() for st in storages.values())


class _OpRecorder(TorchDispatchMode):
    """Records the storages of convolution/matmul outputs (what a cheap checkpoint keeps), the parameters
    used, and, when timing, the time of all operators and of the others (what a cheap checkpoint recomputes),
    and both as they stood when the last tensor was saved for backward (call `saved(t)` from a pack hook)."""

    def __init__(self, params: dict[int, torch.UntypedStorage], timing: bool,
                 clock: Callable[[], float] = time.process_time) -> None:
        super().__init__()
        self.params, self.timing, self.clock = params, timing, clock
        self.kept: dict[int, torch.UntypedStorage] = {}
        self.used: dict[int, torch.UntypedStorage] = {}
        self.ops_s = self.recompute_s = 0.0
        self.at_last_save = (0.0, 0.0)
        self._uncounted = False

    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """Marks a save; returns what the pack hook keeps: an alias of ``t`` without its grad_fn, not counted as an
        operator. A node that saves its own output (an in-place LeakyReLU) would otherwise hold the tensor that holds
        it, a cycle through autograd that Python's gc cannot see: these forwards have no backward to break it, and
        every timed network stayed alive."""
        self.at_last_save = (self.ops_s, self.recompute_s)
        self._uncounted = True
        try:
            return t.detach()
        finally:
            self._uncounted = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self._uncounted:
            return func(*args, **(kwargs or {}))
        t0 = self.clock() if self.timing else 0.0
        out = func(*args, **(kwargs or {}))
        seconds = self.clock() - t0 if self.timing else 0.0
        self.ops_s += seconds
        if cheap_keeps(func):
            self.kept.update(storages_of(*(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))))
        else:
            self.recompute_s += seconds
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(st := t.untyped_storage()) in self.params:
                self.used[id(st)] = st
        return out


class _Unknown(Exception):
    """Something in a block whose cost cannot be told from its structure: the block is profiled on its own."""


_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.Size)


def _fingerprint(obj: Any, memo: dict[int, Any]) -> Any:
    """What a block's cost depends on in ``obj`` (part of a chain step's function): module types, their settings
    (attributes that are numbers, strings, flags, tuples of these), parameter and buffer shapes and dtypes, the
    functions called and what they are bound to, and tensor shapes (not values: an operator's cost does not depend
    on them). Raises `_Unknown` for anything else, and for modules with hooks."""
    if isinstance(obj, _SIMPLE):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        out: Any = (type(obj).__name__, tuple(_fingerprint(o, memo) for o in obj))
    elif isinstance(obj, dict):
        out = ("dict", tuple(sorted((str(k), _fingerprint(v, memo)) for k, v in obj.items())))
    elif isinstance(obj, torch.Tensor):
        out = ("tensor", tuple(obj.shape), obj.dtype, obj.requires_grad)
    elif isinstance(obj, nn.Module):
        if any(getattr(obj, name) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                "_backward_pre_hooks", "_state_dict_hooks")):
            raise _Unknown(f"{type(obj).__name__} has hooks")
        attrs = [(name, _fingerprint(value, memo)) for name, value in vars(obj).items()
                 if name in ("_parameters", "_buffers", "_modules") or not name.startswith("_")]
        out = ("module", type(obj).__module__, type(obj).__qualname__, tuple(attrs))
    elif isinstance(obj, functools.partial):
        out = ("partial", _fingerprint(obj.func, memo), _fingerprint(obj.args, memo), _fingerprint(obj.keywords, memo))
    elif inspect.ismethod(obj):
        out = ("method", _fingerprint(obj.__self__, memo), obj.__func__.__module__, obj.__func__.__qualname__)
    elif inspect.isfunction(obj):
        cells = tuple(_fingerprint(c.cell_contents, memo) for c in obj.__closure__ or ())
        out = ("function", obj.__module__, obj.__qualname__, _fingerprint(obj.__defaults__, memo), cells)
    elif isinstance(obj, type) or inspect.isbuiltin(obj) or isinstance(obj, torch._ops.OpOverloadPacket):
        out = ("callable", getattr(obj, "__module__", None), getattr(obj, "__qualname__", repr(obj)))
    else:
        raise _Unknown(f"cannot tell the cost of a {type(obj).__name__}")
    memo[id(obj)] = out
    return out


def block_key(step: Any, x: torch.Tensor, stack: Sequence[torch.Tensor], memo: dict | None = None) -> Any:
    """What makes two chain steps cost the same: the same kind of step (pops, push, emit, extra), the same
    function on modules of the same structure and settings with parameters of the same shapes (`_fingerprint`),
    and inputs (the running tensor, the skips it pops) of the same shapes and dtypes. None when the step holds
    something whose cost cannot be told from its structure."""
    popped = list(stack[len(stack) - step.pops:]) if step.pops else []
    try:
        return (step.pops, step.push, step.emit, step.extra, _fingerprint(step.fn, {} if memo is None else memo),
                *((tuple(t.shape), t.dtype, t.requires_grad) for t in (x, *popped)))
    except (_Unknown, RecursionError):
        return None


def block_costs(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    estimate: bool = False,
    repeats: int = 3,
    amp: bool = False,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] | None = None,
    reuse_identical: bool = True,
) -> list[BlockCost]:
    """Per-block costs of ``factory()``, a monai_ckpt network, on a batch of ``input_shape``.

    The blocks run in the network's own order (the chain its policies checkpoint), without checkpointing,
    under autocast when ``amp``; saved tensors are counted once per storage. Times are the median of
    ``repeats`` runs after a warm-up run (the first run at a shape also pays one-off kernel set-up), on
    ``device`` with `device_clock` (CPU: process CPU time; CUDA: wall time after synchronising, per operator) or
    the ``clock`` given.

    With ``reuse_identical`` a block identical to an earlier one (`block_key`: same structure, settings, parameter
    shapes, input shapes and dtypes; the repeated blocks of a ResNet stage) is neither run nor timed: it gets that
    block's costs and times, and the blocks after it get fresh tensors shaped as its outputs would be.
    """
    device = torch.device(device)
    clock = clock or device_clock(device)
    with fake_mode() if estimate else contextlib.nullcontext():
        model = build_network(factory, estimate).train()
        if device.type != "cpu" and not estimate:
            model.to(device)
        steps = model._chain_steps()
        # fakes live where the network's (fake) parameters are: a CUDA network's fakes are CUDA fakes
        where = device if not estimate else parameter_device(model)
        x = torch.randn(*input_shape, device=where)
        params = storages_of(*model.parameters())
        # per block, one record per timed run: forward, cheap recompute, tail, cheap tail
        timings: dict[str, list[tuple[float, float, float, float]]] = {s.block: [] for s in steps}
        costs: list[BlockCost] = []
        # per block: the earlier identical block it copies (by index), and what that block made (to shape fresh
        # outputs like it); the first block of each key is run and timed
        copies: dict[int, int] = {}
        made_like: dict[int, tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]] = {}
        first: dict[Any, int] = {}
        memo: dict[int, Any] = {}
        for rep in range(1 if estimate else 1 + repeats):
            h, stack = x, []
            for index, step in enumerate(steps):
                if rep == 0 and reuse_identical:
                    key = block_key(step, h, stack, memo)
                    if key is not None and first.get(key) in made_like:
                        copies[index] = first[key]
                    elif key is not None:
                        first.setdefault(key, index)
                if index in copies:
                    h, stack = _like_outputs(step, h, stack, made_like[copies[index]])
                    if rep == 0:
                        costs.append(dataclasses.replace(costs[copies[index]], block=step.block,
                                                         segment=step.segment.name, kind=step.segment.kind,
                                                         level=step.segment.level))
                    continue
                before = storages_of(h, *stack)
                inputs = storages_of(h, *stack[len(stack) - step.pops :]) if step.pops else storages_of(h)
                saved: dict[int, torch.UntypedStorage] = {}
                recorder = _OpRecorder(params, timing=not estimate, clock=clock)

                def pack(t: torch.Tensor, saved=saved, before=before, recorder=recorder) -> torch.Tensor:
                    saved.update((k, st) for k, st in storages_of(t).items() if k not in params and k not in before)
                    return recorder.saved(t)

                t0 = clock()
                with torch.autocast(x.device.type, dtype=autocast_dtype(x.device), enabled=amp):
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
                        outs = run_steps([step], h, *stack)
                if rep > 0:  # the first run is the warm-up (and, in estimate mode, the only one: no times)
                    ops_at_save, recompute_at_save = recorder.at_last_save
                    timings[step.block].append((clock() - t0, recorder.recompute_s,
                                                recorder.ops_s - ops_at_save, recorder.recompute_s - recompute_at_save))
                if rep == 0 and reuse_identical:
                    made_like[index] = _new_outputs(step, stack, outs, before)
                    if made_like[index] is None:
                        del made_like[index]
                h, stack = outs[0], list(outs[1 : len(outs) - step.emit])
                if rep == 0:  # what it passes on: every tensor it made that outlives it
                    made = {k: st for k, st in storages_of(*outs).items() if k not in before}
                    nxt = {k: st for k, st in storages_of(outs[0]).items() if k in made}
                    side = {k: st for k, st in made.items() if k not in nxt}
                    kept = {**saved, **made}
                    cheap = {k: st for k, st in recorder.kept.items() if k not in before and k not in made}
                    seg = step.segment
                    costs.append(BlockCost(
                        step.block, seg.name, seg.kind, seg.level, storage_bytes(saved), storage_bytes(made),
                        kept_bytes=storage_bytes(kept), next_bytes=storage_bytes(nxt), side_bytes=storage_bytes(side),
                        cheap_bytes=storage_bytes(cheap), input_bytes=storage_bytes(inputs),
                        param_bytes=storage_bytes(recorder.used),
                    ))
            del h, stack
    if not estimate:
        for index, cost in enumerate(costs):
            cost.forward_s, cost.cheap_recompute_s, cost.tail_s, cost.cheap_tail_s = (
                statistics.median(column) for column in zip(*timings[steps[copies.get(index, index)].block]))
    return costs


def _new_outputs(step: Any, stack: list[torch.Tensor], outs: Sequence[torch.Tensor], inputs: dict[int, Any],
                 ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]] | None:
    """What a step made: its running output (None for a side head, which leaves its input as it is), the tensors it
    pushed (extras, then itself when ``push``: only the extras are kept here) and what it emitted; None when one of
    them shares storage with its ``inputs`` (the storages of its input and stack: then no later block may copy it)."""
    kept = len(stack) - step.pops
    new_x = None if step.emit else outs[0]
    extras = list(outs[1 + kept: 1 + kept + step.extra])
    emitted = list(outs[len(outs) - 1:]) if step.emit else []
    made = [t for t in (new_x, *extras, *emitted) if t is not None]
    if any(k in inputs for k in storages_of(*made)):
        return None
    return new_x, extras, emitted


def _like_outputs(step: Any, x: torch.Tensor, stack: list[torch.Tensor],
                  made: tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]],
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The running tensor and stack after a step that is not run: fresh tensors shaped as what its identical
    block made (random values: a block after it runs on numbers, not on uninitialised memory)."""
    new_x, extras, _ = made

    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, dtype=t.dtype, device=t.device).requires_grad_(t.requires_grad)

    if step.emit:
        return x, stack
    stack = stack[: len(stack) - step.pops] + [like(t) for t in extras]
    x = like(new_x)
    if step.push:
        stack.append(x)
    return x, stack
