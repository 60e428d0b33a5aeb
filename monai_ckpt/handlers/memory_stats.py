"""`MemoryStatsHandler`: peak memory, the activation memory the checkpoint policy saves, voxels/s and the active
policy of every iteration and epoch, to the logger, TensorBoard and ``engine.state``."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..policies import PolicySpec, is_budget_policy
from ..profiling import MiB, measure_step_memory, replica
from .update import MemoryEfficientUpdate, policy_network

__all__ = ["MemoryStatsHandler", "estimate_activation_saving"]


def _rss_peak_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _default_image(batch: Any) -> Any:
    if isinstance(batch, dict):
        return batch.get(Keys.IMAGE)
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        return first.get(Keys.IMAGE) if isinstance(first, dict) else first
    return batch


def estimate_activation_saving(network: nn.Module, input_shape: Sequence[int], policy: PolicySpec,
                               amp_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Peak live-tensor bytes of one forward+backward of ``network`` without checkpointing and with
    ``policy``, on a batch of ``input_shape``, measured on a fake copy (`monai_ckpt.profiling.measure_step_memory`
    in estimate mode: exact accounting of every tensor, no memory allocated, the network itself untouched, RNG
    preserved). The loss is ``mean(out**2)``; no optimizer (its state is the same for every policy).

    A ``{"budget_gb": X}`` policy is measured as the policy its plan chose (``network.checkpoint_plan``, made on
    the network's last training forward): planning inside the fake copy would nest fake modes.

    Returns:
        (peak bytes with policy "none", peak bytes with ``policy``).

    Raises:
        ValueError: for a budget policy when the network has no plan yet (no training forward so far).
    """
    if is_budget_policy(policy):
        plan = getattr(network, "checkpoint_plan", None)
        if plan is None:
            raise ValueError(f"checkpoint_policy {policy!r} has no plan yet: the network plans on its first training "
                             "forward; estimate after it, or pass the planned policy.")
        policy = plan.policy
    device = next(network.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        none, with_policy = (
            measure_step_memory(lambda spec=spec: replica(network, spec), input_shape, estimate=True, device=device,
                                optimizer="none", amp=amp_dtype or False).peak
            for spec in ("none", policy)
        )
    return none, with_policy


class MemoryStatsHandler:
    """Logs memory and throughput of training with checkpointing, per iteration and per epoch.

    What it reports (all also in ``engine.state.<state_attr>``, a dict updated every iteration):

    - ``peak_memory_mib``: on CUDA, ``torch.cuda.max_memory_allocated`` of the iteration (the peak is reset
      when each iteration starts): the allocator's exact tensor peak. On the CPU, the process's peak resident
      set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``): cheap, but a high-water mark since the process
      started (it never decreases, so it bounds each iteration's peak from above) and it includes everything
      in the process (Python, libraries, data loading). ``peak_memory_kind`` says which:
      ``"cuda_max_allocated"`` or ``"process_peak_rss"``.
    - ``activation_saved_mib`` (and ``activation_peak_none_mib``/``activation_peak_policy_mib``): the
      activation memory the current ``checkpoint_policy`` saves, estimated by `estimate_activation_saving`: the
      peak live-tensor bytes of one forward+backward of a fake copy of the network (FakeTensorMode: nothing is
      allocated) at the batch shape seen, with policy ``"none"`` minus with the active policy, under the
      trainer's autocast dtype. It is computed once per (shape, policy, dtype)
      and cached: cheap after the first iteration (about a second for a 96^3 UNet, a few for 256^3). It is an
      estimate of the network alone, not of the allocator's caching or fragmentation; None for networks
      without ``checkpoint_policy`` or with ``estimate_saving=False``.
    - ``voxels_per_s``: voxels of the input batch (batch size x spatial size) over the wall time from
      ITERATION_STARTED to ITERATION_COMPLETED (CUDA is synchronised first). Other handlers on these events
      count towards the time.
    - ``checkpoint_policy``: the network's active policy (it may change at run time, e.g. after an
      out-of-memory recovery of `MemoryEfficientUpdate`; ``oom_events`` counts those).

    At each epoch end ``engine.state.metrics`` gets ``peak_memory_mib`` (the epoch's maximum),
    ``activation_saved_mib`` (last estimate) and ``voxels_per_s`` (epoch voxels over summed iteration time),
    so that StatsHandler, TensorBoardStatsHandler or a CheckpointSaver can use them: list this handler
    before those in the handlers list. To the logger (INFO) it writes one line per ``iteration_log``
    iterations and one per epoch; to TensorBoard, scalars ``<tag_prefix>peak_memory_mib``,
    ``...activation_saved_mib``, ``...voxels_per_s`` per iteration and ``...epoch_*`` per epoch, and the
    policy as text whenever it changes.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``/``add_text``).
        log_dir: if no ``summary_writer`` is given, create a SummaryWriter there; None: no TensorBoard.
        iteration_log: log every this many iterations (0 or False: only per epoch).
        epoch_log: log at each epoch end.
        batch_transform: takes ``engine.state.batch`` and returns the input image batch (B, C, *spatial); the
            default takes ``batch["image"]`` (or the first element of a tuple/list batch).
        estimate_saving: compute ``activation_saved_mib`` (see above).
        state_attr: the ``engine.state`` attribute that holds the latest values.
        tag_prefix: prefix of the TensorBoard tags.
        name: logger name; None uses ``engine.logger``.

    Example::

        MemoryStatsHandler(log_dir="./runs").attach(trainer)
        # bundle: {"_target_": "monai_ckpt.handlers.MemoryStatsHandler", "log_dir": "@output_dir", "iteration_log": 10}
    """

    def __init__(
        self,
        summary_writer: Any | None = None,
        log_dir: str | None = None,
        iteration_log: int | bool = True,
        epoch_log: bool = True,
        batch_transform: Callable[[Any], Any] = _default_image,
        estimate_saving: bool = True,
        state_attr: str = "memory_stats",
        tag_prefix: str = "memory/",
        name: str | None = None,
    ) -> None:
        if summary_writer is None and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            summary_writer = SummaryWriter(log_dir=log_dir)
        self.writer = summary_writer
        self.iteration_log = int(iteration_log)
        self.epoch_log = epoch_log
        self.batch_transform = batch_transform
        self.estimate_saving = estimate_saving
        self.state_attr = state_attr
        self.tag_prefix = tag_prefix
        self._name = name
        self.logger = logging.getLogger(name)
        self._cache: dict[str, tuple[int, int] | None] = {}
        self._t0 = 0.0
        self._voxels = 0
        self._shape: tuple[int, ...] | None = None
        self._epoch: dict[str, float] = {}
        self._last_policy: str | None = None

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine`` (a MONAI trainer or any ignite Engine with ``network``)."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    @staticmethod
    def _device(engine: Engine) -> torch.device:
        return torch.device(getattr(engine.state, "device", None) or "cpu")

    def epoch_started(self, engine: Engine) -> None:
        self._epoch = {"peak": 0.0, "voxels": 0.0, "seconds": 0.0}

    def iteration_started(self, engine: Engine) -> None:
        image = self.batch_transform(engine.state.batch)
        self._shape = tuple(image.shape) if isinstance(image, torch.Tensor) else None
        self._voxels = int(image.shape[0] * image[0, 0].numel()) if self._shape and len(self._shape) > 2 else 0
        device = self._device(engine)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self._t0 = time.perf_counter()

    def _saving(self, engine: Engine, holder: nn.Module | None) -> tuple[int, int] | None:
        if not self.estimate_saving or holder is None or self._shape is None:
            return None
        update = getattr(engine, "_process_function", None)
        dtype = None
        if isinstance(update, MemoryEfficientUpdate):
            dtype = update.autocast_dtype(engine)
        elif getattr(engine, "amp", False):  # MONAI's own iteration: float16 autocast on CUDA
            dtype = torch.float16
        key = json.dumps([self._shape, holder.checkpoint_policy, str(dtype)], default=str, sort_keys=True)
        if key not in self._cache:
            try:
                self._cache[key] = estimate_activation_saving(holder, self._shape, holder.checkpoint_policy, dtype)
            except Exception as e:  # a statistic must not stop training: report it once per key and go on
                self.logger.warning(f"MemoryStatsHandler: cannot estimate the activation saving of "
                                    f"{type(holder).__name__} for input {self._shape} ({type(e).__name__}: {e}); "
                                    "activation_saved_mib is left out")
                self._cache[key] = None
        return self._cache[key]

    def iteration_completed(self, engine: Engine) -> None:
        device = self._device(engine)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
        else:
            peak, kind = _rss_peak_bytes(), "process_peak_rss"
        seconds = time.perf_counter() - self._t0
        holder = policy_network(getattr(engine, "network", None)) if hasattr(engine, "network") else None
        saving = self._saving(engine, holder)
        stats = {
            "iteration": engine.state.iteration,
            "peak_memory_mib": None if peak is None else peak / MiB,
            "peak_memory_kind": kind,
            "activation_saved_mib": None if saving is None else (saving[0] - saving[1]) / MiB,
            "activation_peak_none_mib": None if saving is None else saving[0] / MiB,
            "activation_peak_policy_mib": None if saving is None else saving[1] / MiB,
            "voxels_per_s": self._voxels / seconds if seconds > 0 else None,
            "seconds": seconds,
            "checkpoint_policy": None if holder is None else holder.checkpoint_policy,
            "oom_events": len(getattr(engine.state, "oom_events", [])),
        }
        setattr(engine.state, self.state_attr, stats)
        if self._epoch:
            self._epoch["peak"] = max(self._epoch["peak"], stats["peak_memory_mib"] or 0.0)
            self._epoch["voxels"] += self._voxels
            self._epoch["seconds"] += seconds
        it = engine.state.iteration
        if self.writer is not None and self.iteration_log and it % self.iteration_log == 0:
            for key in ("peak_memory_mib", "activation_saved_mib", "voxels_per_s"):
                if stats[key] is not None:
                    self.writer.add_scalar(self.tag_prefix + key, stats[key], it)
        policy_text = json.dumps(stats["checkpoint_policy"], default=str)
        if self.writer is not None and holder is not None and policy_text != self._last_policy:
            self.writer.add_text(self.tag_prefix + "checkpoint_policy", policy_text, it)
        self._last_policy = policy_text
        if self.iteration_log and it % self.iteration_log == 0:
            self.logger.info(f"Memory iteration {it}: " + self._format(stats))

    @staticmethod
    def _format(stats: dict) -> str:
        def num(v: Any, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        return (
            f"peak {num(stats['peak_memory_mib'], '.1f')} MiB ({stats['peak_memory_kind']}), "
            f"activations saved by policy ~{num(stats['activation_saved_mib'], '.1f')} MiB, "
            f"{num(stats['voxels_per_s'], '.3g')} voxels/s, checkpoint_policy "
            f"{json.dumps(stats['checkpoint_policy'], default=str)}"
        )

    def epoch_completed(self, engine: Engine) -> None:
        stats = dict(getattr(engine.state, self.state_attr, None) or {})
        if not stats or not self._epoch:
            return
        seconds = self._epoch["seconds"]
        epoch_stats = {
            "peak_memory_mib": self._epoch["peak"],
            "activation_saved_mib": stats["activation_saved_mib"],
            "voxels_per_s": self._epoch["voxels"] / seconds if seconds > 0 else None,
        }
        for key, value in epoch_stats.items():
            if value is not None:
                engine.state.metrics[key] = value
                if self.writer is not None:
                    self.writer.add_scalar(f"{self.tag_prefix}epoch_{key}", value, engine.state.epoch)
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()
        if self.epoch_log:
            self.logger.info(f"Memory epoch {engine.state.epoch}: " + self._format({**stats, **epoch_stats}))

