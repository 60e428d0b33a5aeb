"""``plan()``: the fastest checkpoint policy with which one training step fits a budget, and the pieces that let a
``{"budget_gb": X}`` network plan its own training step (`planning_loss`, `plan_for_network`)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..profiling import LabelBatch, make_optimizer
from .device import budget_bytes, device_of, headroom_bytes
from .result import Plan
from .search import get_planner
from .step import input_shape_of

__all__ = ["plan", "plan_for_network", "planning_loss", "stderr_progress"]

_log = logging.getLogger(__name__)


def stderr_progress(message: str) -> None:
    print(f"[plan] {message}", file=sys.stderr, flush=True)


def plan(
    network: nn.Module,
    spatial_shape: Sequence[int],
    budget_gb: float,
    *,
    batch_size: int = 1,
    amp: bool = False,
    optimizer: str = "adam",
    loss: Callable[..., torch.Tensor] | None = None,
    label: str | torch.Tensor | LabelBatch = "index",
    headroom_gb: float | None = None,
    device: str | torch.device | None = None,
    progress: bool | Callable[[str], None] = False,
    compiled: bool = False,
) -> Plan:
    """The fastest checkpoint policy with which one training step of ``network`` fits in ``budget_gb``.

    Args:
        network: a checkpoint-aware network, any of monai_ckpt's Checkpoint* classes (`monai_ckpt.networks`); it is
            not changed.
        spatial_shape: the patch, (D, H, W) or (H, W); channels come from the network.
        budget_gb: memory for one whole training step (forward, loss, backward, optimizer step), in GiB.
        batch_size: patches per step.
        amp: the forward runs under autocast (bf16 on CPU, fp16 on CUDA).
        optimizer: ``"adam"`` (two states per parameter), ``"sgd"`` or ``"none"``.
        loss: your loss, called as ``loss(output, label)`` on the network's whole training output (as MONAI's
            trainers call it), e.g. ``DiceCELoss(to_onehot_y=True, softmax=True)``; for a DynUNet with deep
            supervision, e.g. ``lambda out, y: DeepSupervisionLoss(DiceCELoss(...))(torch.unbind(out, 1), y)``.
            None (the default): ``mean(out**2)``, which has fewer output-sized temporaries than most
            segmentation losses: with many classes give your loss, or the plan may not fit.
        label: the label batch the loss takes: ``"index"`` (B, 1, *spatial) int64 class indices (for
            ``to_onehot_y`` and cross-entropy losses), ``"channels"`` (B, classes, *spatial) float32 (sigmoid
            losses, one-hot labels), or an example tensor (its shape and dtype). Only its shape and dtype matter.
        headroom_gb: what of the budget the device needs beyond live tensors. Default: on CUDA 10% of the budget
            and at least 0.25 GiB (the caching allocator's rounding and fragmentation, cuDNN workspaces); on the
            CPU none. Tensors are planned into ``budget_gb - headroom_gb``.
        device: where the network trains; default (and the only device allowed) the device of its parameters.
            Block and step times are measured there (CPU: process time; CUDA: synchronised wall time and CUDA
            events, after a warm-up).
        progress: report the search's steps on stderr (True) or to a callable.
        compiled: plan the step ``torch.compile(network)`` runs (inductor, the network compiled on its own; loss and
            optimizer eager): for each candidate policy and compile's ``activation_memory_budget``, inductor's own
            partition of the network's joint graph is made on fake tensors at this size, and the step it describes
            measured (`monai_ckpt.planner.compiled`); the plan is the fastest, by a model of the compiled graphs'
            operations and memory traffic, whose step fits. ``plan.compile_memory_budget`` is compile's budget to
            set for the network's graph (a ``{"budget_gb": X}`` network under ``torch.compile`` sets it itself).

    Returns:
        a `Plan`; ``plan.policy`` goes to ``network.checkpoint_policy``. The same question in one process gets
        the same plan (the profile is kept, times are rounded and ties broken by a fixed rule).

    Nested recomputation (policy mode ``"nested"``, a block run up to three times per step) is used only when no
    policy without it fits the budget.

    Raises:
        ValueError: when nothing fits (the message gives the smallest peak reachable and its policy); for a
            shape the network cannot take, a non-positive budget or headroom, a device the network is not on, a
            label that does not match the network's classes, or a loss that fails on the network's output.

    Example::

        net = CheckpointUNet(3, 1, 14, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
        p = plan(net, (96, 96, 96), budget_gb=8, batch_size=2, loss=DiceCELoss(to_onehot_y=True, softmax=True))
        net.checkpoint_policy = p.policy
    """
    budget = budget_bytes(budget_gb)
    input_shape = input_shape_of(network, spatial_shape, batch_size)
    make_optimizer(nn.Linear(1, 1), optimizer)  # a clear error for an unknown optimizer
    where = device_of(network, device)
    headroom = headroom_bytes(headroom_gb, budget, where)
    report = stderr_progress if progress is True else progress or None
    planner = get_planner(network, input_shape, amp, optimizer, loss, label, where, progress=report)
    return planner.plan_compiled(budget, headroom) if compiled else planner.plan(budget, headroom)


_PLANNING_LOSS: contextvars.ContextVar[tuple[Callable, LabelBatch] | None] = contextvars.ContextVar(
    "monai_ckpt_planning_loss", default=None)


@contextlib.contextmanager
def planning_loss(loss: Callable[..., torch.Tensor], label: torch.Tensor | LabelBatch) -> Iterator[None]:
    """Within this context, a network with a ``{"budget_gb": X}`` policy plans its training step with ``loss``
    and a label batch shaped like ``label`` (only its shape and dtype are kept). `MemoryEfficientUpdate` wraps
    each forward in it with the engine's ``loss_function`` and the batch's label.

    Example::

        with planning_loss(loss_function, labels):
            loss = loss_function(net(images), labels)
    """
    token = _PLANNING_LOSS.set((loss, LabelBatch(tuple(label.shape), label.dtype)))
    try:
        yield
    finally:
        _PLANNING_LOSS.reset(token)


def plan_for_network(network: nn.Module, x: torch.Tensor, amp: bool, spec: dict, compiled: bool = False) -> Plan:
    """The plan a network with a ``{"budget_gb": X}`` policy uses for the training input ``x`` (for the compiled
    step with ``compiled``), with the loss and label of `planning_loss` when one is active. Under
    torch.distributed, rank 0 plans and every rank uses its plan, so that all ranks run the same policy."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    result: list = [None]
    planning = _PLANNING_LOSS.get()
    loss, label = planning if planning is not None else (None, "index")
    if not distributed or dist.get_rank() == 0:
        try:
            result[0] = plan(network, tuple(x.shape[2:]), spec["budget_gb"], batch_size=int(x.shape[0]), amp=amp,
                             optimizer=spec.get("optimizer", "adam"), loss=loss, label=label,
                             headroom_gb=spec.get("headroom_gb"), compiled=compiled)
        except ValueError as error:
            result[0] = error
    if distributed:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], Exception):
        raise result[0]
    _log.info("checkpoint_policy %r for input %s: %s", spec, tuple(x.shape), str(result[0]).replace("\n", "; "))
    return result[0]
