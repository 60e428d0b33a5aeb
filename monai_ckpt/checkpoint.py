"""The one checkpointing primitive used everywhere in monai_ckpt, and two small ways to apply it.

`checkpoint(fn, *args)` runs ``fn`` so that its activations are not kept for backward:

- ``mode="full"``: nothing inside ``fn`` is kept; ``fn`` is recomputed once in backward.
- ``mode="cheap"``: convolution/matmul outputs are kept, everything cheap (norm, activation, dropout,
  add, cat...) is recomputed (torch selective activation checkpointing).
- ``mode="offload"``: nothing is recomputed; the tensors ``fn`` saves for backward are moved to (pinned)
  CPU memory and brought back in backward. Tensors already on the CPU stay where they are.

It is always non-reentrant, preserves the RNG state (dropout masks are identical), replays autocast, and
makes the recomputation leave BatchNorm running statistics and ``num_batches_tracked`` untouched (see
`_BatchNormGuard`). Without autograd (``torch.no_grad()``, ``inference_mode()``), or for a module in
``eval()`` mode, it is a plain call.

Under ``torch.compile`` the same call is traced: Dynamo turns the region into torch's activation-checkpoint
operator and the compiler's partitioner recomputes it in the compiled backward ("full": every op of the
region; "cheap": the same selective policy). There the recomputation is a copy of functional graph nodes,
which never writes BatchNorm's buffers (the update is one copy back at the end of the compiled forward), so
no guard is needed, and inductor replays random ops from the same seeds. "offload" cannot be traced
(``saved_tensors_hooks``): it runs eagerly between compiled graphs, a graph break.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

__all__ = [
    "CHECKPOINT_MODES",
    "checkpoint",
    "CheckpointedSequential",
    "NATURAL_BLOCKS",
    "checkpoint_submodules",
    "cheap_keeps",
    "recomputed_by_cheap",
]

CHECKPOINT_MODES = ("full", "cheap", "offload")

# What `checkpoint_submodules(model)` checkpoints without names or predicate: for each of MONAI's networks (by class
# name) the block classes a user would checkpoint by hand, outermost first. Names, not imports: this module needs
# only torch. Any other model gets every MONAI block of these classes it holds.
NATURAL_BLOCKS: dict[str, tuple[str, ...]] = {
    "UNet": ("ResidualUnit", "Convolution"),
    "VNet": ("InputTransition", "DownTransition", "UpTransition", "OutputTransition"),
    "DynUNet": ("UnetBasicBlock", "UnetResBlock", "UnetUpBlock"),
    "SegResNet": ("ResBlock",),
    "SegResNetDS": ("SegResBlock",),
    "AttentionUnet": ("ConvBlock", "AttentionBlock"),
    "SwinUNETR": ("SwinTransformerBlock", "UnetResBlock"),
    "BasicUNet": ("TwoConv",),
    "BasicUNetPlusPlus": ("TwoConv",),
}

# Ops whose outputs "cheap" keeps: the expensive ones. Everything else is recomputed in backward.
_KEEP_IN_CHEAP = {
    torch.ops.aten.convolution.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
}


class _CheapState(threading.local):
    def __init__(self) -> None:
        # set in each thread's own dict (threading.local runs __init__ per thread): torch.compile traces a missing
        # attribute as an exception, and one read from the class as a guard that setting it breaks
        self.recompute = False


_cheap_state = _CheapState()


@contextlib.contextmanager
def recomputed_by_cheap() -> Any:
    """Operators run inside are recomputed by a ``"cheap"`` checkpoint even if it keeps their kind: for outputs
    that backward never needs (a residual branch's convolution, whose output only meets an addition)."""
    before = _cheap_state.recompute
    _cheap_state.recompute = True
    try:
        yield
    finally:
        _cheap_state.recompute = before


def cheap_keeps(op: Any) -> bool:
    """Whether a ``"cheap"`` checkpoint keeps the output of ``op`` (rather than recomputing it) here."""
    return op in _KEEP_IN_CHEAP and not _cheap_state.recompute


def _cheap_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if cheap_keeps(op) else CheckpointPolicy.PREFER_RECOMPUTE


class _BatchNormGuard:
    """While active (during a recomputation), every norm module with running statistics (BatchNorm,
    SyncBatchNorm, InstanceNorm with ``track_running_stats``) run by this thread in training mode updates
    scratch copies of its running statistics and ``num_batches_tracked`` instead of the real ones.

    The recomputation must save exactly the tensors the first forward saved (non-reentrant checkpointing
    matches them by order), so BatchNorm has to run with running buffers as before; pointing them at
    scratch copies for the duration keeps outputs, gradients and buffers bit-identical to the network
    without checkpointing, whatever the momentum.
    """

    _BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self._saved: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        if (
            threading.get_ident() != self._thread
            or not isinstance(module, nn.modules.batchnorm._NormBase)
            or not (module.training and module.track_running_stats)
            or module in self._saved
        ):
            return
        saved = {}
        # Outside any dispatch mode: selective checkpointing would reject an op the first forward never ran.
        with _disable_current_modes():
            for name in self._BUFFERS:
                buf = module._buffers.get(name)
                if buf is not None:
                    saved[name] = buf
                    module._buffers[name] = buf.clone()
        self._saved[module] = saved

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == self._thread and module in self._saved:
            self._restore(module)

    def _restore(self, module: nn.Module) -> None:
        for name, buf in self._saved.pop(module).items():
            module._buffers[name] = buf

    def __enter__(self) -> _BatchNormGuard:
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post, always_call=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in list(self._saved):
            self._restore(module)


def _context_fn(mode: str) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    if mode == "cheap":
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_cheap_policy)

        @contextlib.contextmanager
        def recompute() -> Any:
            with recompute_ctx, _BatchNormGuard():
                yield

        return forward_ctx, recompute()
    return contextlib.nullcontext(), _BatchNormGuard()


def _pack_to_cpu(tensor: torch.Tensor) -> Any:
    if tensor.device.type == "cpu":
        return tensor
    packed = torch.empty_like(tensor, device="cpu", pin_memory=True)
    packed.copy_(tensor, non_blocking=True)
    return tensor.device, packed


def _unpack_from_cpu(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    device, tensor = packed
    return tensor.to(device, non_blocking=True)


def _offloaded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with torch.autograd.graph.saved_tensors_hooks(_pack_to_cpu, _unpack_from_cpu):
        return fn(*args, **kwargs)


_offloaded_outside_the_graph = torch.compiler.disable(
    _offloaded,
    reason="monai_ckpt: mode 'offload' moves saved tensors with torch.autograd.graph.saved_tensors_hooks, which "
    "torch.compile does not trace: an offloaded group runs eagerly between compiled graphs (a graph break, so not "
    "under fullgraph=True); use mode 'full' or 'cheap' there.",
)


def checkpoint(
    fn: Callable[..., Any], *args: Any, mode: str = "full", preserve_rng_state: bool = True, **kwargs: Any
) -> Any:
    """Run ``fn(*args, **kwargs)`` without keeping its activations for backward.

    Args:
        fn: the function or module to run; it may return a tensor or a tuple/list/dict of tensors.
        args: positional arguments of ``fn``.
        mode: ``"full"`` (recompute all of ``fn`` in backward), ``"cheap"`` (keep convolution and matmul
            outputs, recompute the rest) or ``"offload"`` (recompute nothing, keep the saved tensors in
            CPU memory). Defaults to ``"full"``.
        preserve_rng_state: replay the RNG state in the recomputation so that dropout masks are identical.
        kwargs: keyword arguments of ``fn``.

    Examples::

        from monai_ckpt import checkpoint

        y = checkpoint(block, x)                 # block's activations are recomputed in backward
        y = checkpoint(block, x, mode="cheap")   # keep conv outputs, recompute norm/activation
    """
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"unknown checkpoint mode {mode!r}; valid modes are {', '.join(CHECKPOINT_MODES)}.")
    if not torch.is_grad_enabled():  # inference_mode() disables grad mode too
        return fn(*args, **kwargs)
    if isinstance(fn, nn.Module) and not fn.training:
        return fn(*args, **kwargs)
    if mode == "offload":
        if torch.compiler.is_compiling():
            return _offloaded_outside_the_graph(fn, *args, **kwargs)
        return _offloaded(fn, *args, **kwargs)
    if torch.compiler.is_compiling():
        # torch.compile traces the region into its joint graph and lets its partitioner recompute it: the
        # recompute context must be the pair of TorchDispatchModes of selective checkpointing (or none at all),
        # and BatchNorm needs no guard, since the recomputed nodes are functional and do not write buffers.
        # "full" must leave context_fn out: Dynamo rejects any context_fn argument it cannot treat as SAC's pair.
        context = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _cheap_policy)}
        return _torch_checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                                 **(context if mode == "cheap" else {}), **kwargs)
    return _torch_checkpoint(
        fn,
        *args,
        use_reentrant=False,
        preserve_rng_state=preserve_rng_state,
        context_fn=functools.partial(_context_fn, mode),
        **kwargs,
    )


class CheckpointedSequential(nn.Sequential):
    """``nn.Sequential`` whose modules run as ``segments`` checkpointed chunks while training.

    The state_dict keys are those of ``nn.Sequential(*modules)``. In ``eval()`` mode, without autograd, or
    under TorchScript it is the plain sequential forward. The last chunk is not checkpointed when
    ``checkpoint_last`` is False (its activations are needed right away by backward anyway).

    Args:
        modules: the modules, in order, as for ``nn.Sequential``.
        segments: number of chunks of consecutive modules, each checkpointed as one. Defaults to one chunk
            per module.
        mode: checkpoint mode of every chunk, see `checkpoint`.
        checkpoint_last: also checkpoint the last chunk.

    Examples::

        from monai_ckpt import CheckpointedSequential

        body = CheckpointedSequential(conv1, norm1, act1, conv2, norm2, act2, segments=2)
    """

    def __init__(self, *modules: nn.Module, segments: int | None = None, mode: str = "full",
                 checkpoint_last: bool = True) -> None:
        super().__init__(*modules)
        n = len(modules)
        segments = n if segments is None else segments
        if not isinstance(segments, int) or isinstance(segments, bool) or not 1 <= segments <= max(n, 1):
            raise ValueError(f"segments must be an integer between 1 and the number of modules ({n}), got {segments!r}.")
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"unknown checkpoint mode {mode!r}; valid modes are {', '.join(CHECKPOINT_MODES)}.")
        self.segments = segments
        self.mode = mode
        self.checkpoint_last = checkpoint_last

    def _chunks(self) -> list[list[nn.Module]]:
        mods = list(self)
        size, extra = divmod(len(mods), self.segments)
        bounds = [0]
        for i in range(self.segments):
            bounds.append(bounds[-1] + size + (1 if i < extra else 0))
        # A chunk must not start with an in-place module: it would modify the input its checkpoint saved.
        for i in range(1, len(bounds) - 1):
            while bounds[i] < len(mods) and getattr(mods[bounds[i]], "inplace", False):
                bounds[i] += 1
            bounds[i] = max(bounds[i], bounds[i - 1])
        return [mods[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def forward(self, input):  # noqa: A002, ANN001, ANN201 - nn.Sequential's signature, TorchScript-typed
        if torch.jit.is_scripting() or not self.training:
            for module in self:
                input = module(input)
            return input
        return self._checkpointed_forward(input)

    @torch.jit.unused
    def _checkpointed_forward(self, x: Any) -> Any:
        chunks = self._chunks()
        for i, chunk in enumerate(chunks):
            if i == len(chunks) - 1 and not self.checkpoint_last:
                x = _run_chunk(chunk, x)
            else:
                x = checkpoint(_run_chunk, chunk, x, mode=self.mode)
        return x


def _run_chunk(chunk: Sequence[nn.Module], x: Any) -> Any:
    for module in chunk:
        x = module(x)
    return x


def _checkpointing_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(module).forward.__get__(module)
    if module.training:
        return checkpoint(forward, *args, mode=module._monai_ckpt_mode, **kwargs)
    return forward(*args, **kwargs)


def _natural_blocks(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The predicate `checkpoint_submodules` uses without ``names`` and ``predicate``: the MONAI block classes of
    `NATURAL_BLOCKS` for ``model``'s class (for any other model, all of them); a ValueError that says what to pass
    when ``model`` holds none."""
    every = {b for kinds in NATURAL_BLOCKS.values() for b in kinds}
    own = [cls.__name__ for cls in type(model).__mro__
           if cls.__module__.startswith("monai.networks.nets") and cls.__name__ in NATURAL_BLOCKS]
    blocks = NATURAL_BLOCKS[own[0]] if own else every

    def is_block(name: str, module: nn.Module) -> bool:
        cls = type(module)
        return bool(name) and cls.__name__ in blocks and cls.__module__.startswith("monai.")

    if not any(is_block(name, m) for name, m in model.named_modules()):
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"checkpoint_submodules({type(model).__name__}) without names or predicate checkpoints MONAI's natural "
            f"blocks ({', '.join(sorted(every))}), and this model "
            f"holds none: choose its blocks with names=[...] (its top-level submodules are {children}) or "
            "predicate=lambda name, module: isinstance(module, YourBlock)."
        )
    return is_block


def _within(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def checkpoint_submodules(
    model: nn.Module,
    names: Iterable[str] | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    mode: str = "full",
) -> list[str]:
    """Checkpoint chosen submodules of any network, in place, without changing its state_dict.

    Each chosen submodule keeps its name, parameters and buffers; only its forward is routed through
    `checkpoint` while it is in training mode. A submodule inside an already chosen one is skipped, so no
    recomputation is nested. Call again with ``mode=None`` to undo (for the same names/predicate).
    ``torch.jit.script`` needs the plain forward: undo before scripting (state_dict is unchanged either way).
    Without ``names`` and ``predicate`` it chooses the network's natural blocks: for one of MONAI's networks the
    block classes of `NATURAL_BLOCKS` (UNet: each ``ResidualUnit`` and the ``Convolution`` s outside them; SegResNet:
    each ``ResBlock``...), for any other model every MONAI block of one of those classes it holds.

    Args:
        model: the network to modify.
        names: qualified submodule names (as in ``model.named_modules()``).
        predicate: ``predicate(name, module) -> bool`` chooses submodules; combined with ``names`` by "or".
        mode: checkpoint mode (see `checkpoint`), or None to restore the plain forward.

    Returns:
        the names of the submodules that were changed, outermost first.

    Raises:
        ValueError: for names ``model`` does not have, a bad mode, a choice that would nest inside submodules
            checkpointed already, or, without ``names`` and ``predicate``, a model that holds no MONAI block
            (the message lists its submodules to pass as ``names``).

    Examples::

        from monai.networks.blocks import ResidualUnit
        from monai_ckpt import checkpoint_submodules

        checkpoint_submodules(net)                      # MONAI's natural blocks of net
        checkpoint_submodules(net, predicate=lambda name, m: isinstance(m, ResidualUnit))
        checkpoint_submodules(net, names=["model.0"])   # by name
    """
    if names is None and predicate is None:
        predicate = _natural_blocks(model)
    if mode is not None and mode not in CHECKPOINT_MODES:
        raise ValueError(f"unknown checkpoint mode {mode!r}; valid modes are {', '.join(CHECKPOINT_MODES)}.")
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    wanted = set(names or ())
    missing = sorted(wanted - set(modules))
    if missing:
        known = ", ".join(n for n in modules if n) or "(none)"
        raise ValueError(
            f"no submodule named {', '.join(map(repr, missing))} in {type(model).__name__}; its submodules are: {known}."
        )
    already = [name for name, m in modules.items() if "_monai_ckpt_mode" in m.__dict__]
    chosen: list[str] = []
    for name, module in modules.items():  # parents come before their children
        if not (name in wanted or (predicate is not None and predicate(name, module))):
            continue
        if mode is None:
            if name in already:
                chosen.append(name)
            continue
        if any(_within(name, c) for c in chosen + already):
            continue
        if any(_within(a, name) for a in already):
            raise ValueError(
                f"cannot checkpoint {name!r}: its submodule(s) {[a for a in already if _within(a, name)]} are "
                "checkpointed already and recomputation would nest; undo them first with mode=None."
            )
        chosen.append(name)
    for name in chosen:
        module = modules[name]
        if mode is None:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_monai_ckpt_mode", None)
        else:
            module._monai_ckpt_mode = mode
            module.forward = functools.partial(_checkpointing_forward, module)
    return chosen
