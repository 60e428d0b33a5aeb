"""Memory-efficient training inside MONAI's engines: ignite handlers and an ``iteration_update``.

- `MemoryEfficientUpdate`: an ``iteration_update`` for ``monai.engines.SupervisedTrainer`` that adds gradient
  accumulation (effective batch = batch x steps), mixed precision that works on the CPU (bf16) and on CUDA
  (fp16 with the trainer's GradScaler, or bf16), and out-of-memory recovery: a step that runs out of memory
  is retried, on the same batch, with the next more aggressive checkpoint policy of a ladder.
- `MemoryStatsHandler`: logs peak memory, the activation memory the checkpoint policy saves, voxels/s and
  the active policy, per iteration and per epoch, to the logger, TensorBoard and ``engine.state``.
- `ResumableCheckpoint`: crash-safe training checkpoints (atomic, fsynced writes; every N iterations and at
  each epoch end; last k kept) that a restarted run resumes from, mid-epoch included.
- `AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` (best/final model files) with atomic, fsynced writes.

All files are written through `monai_ckpt.io.atomic_path` (temporary file, fsync, rename, fsync of the folder).

Bundle wiring (``configs/train.json``)::

    "train#trainer": {
        "_target_": "SupervisedTrainer",
        "amp": true,
        "iteration_update": {"_target_": "monai_ckpt.handlers.MemoryEfficientUpdate", "accumulation_steps": 4},
        ...
    },
    "train#handlers": [
        {"_target_": "monai_ckpt.handlers.ResumableCheckpoint", "save_dir": "$@output_dir + '/resume'",
         "save_dict": {"network": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler"},
         "save_interval": 100},
        {"_target_": "monai_ckpt.handlers.MemoryStatsHandler", "log_dir": "@output_dir"},
        {"_target_": "StatsHandler", ...}
    ]

This module is the only one of the library that knows ignite and MONAI's engines; the core layers
(`monai_ckpt.checkpoint`, `monai_ckpt.policies`) do not import it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from .io import atomic_path, remove_temporaries
from .policies import PolicySpec, is_budget_policy, validate_policy
from .profiling import measure_step_memory, replica

__all__ = [
    "DEFAULT_OOM_LADDER",
    "AtomicCheckpointSaver",
    "MemoryEfficientUpdate",
    "MemoryStatsHandler",
    "ResumableCheckpoint",
    "estimate_activation_saving",
    "policy_network",
]

# "blocks" is not on it: it keeps more than "all" (96^3 UNet(16..256): 120 vs 101 MiB of activations at the peak)
DEFAULT_OOM_LADDER: tuple[PolicySpec, ...] = ("none", "cheap", "all")
MiB = 2**20
_AMP_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def policy_network(network: nn.Module) -> nn.Module | None:
    """The module that carries ``checkpoint_policy`` inside ``network`` (unwrapping DistributedDataParallel,
    DataParallel and ``torch.compile``), or None when it is not a checkpoint-aware network."""
    for _ in range(3):
        if hasattr(network, "checkpoint_policy"):
            return network
        network = getattr(network, "module", None) or getattr(network, "_orig_mod", None)
        if network is None:
            return None
    return network if hasattr(network, "checkpoint_policy") else None


def _same_policy(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _canonical(spec: Any) -> Any:
    try:
        return validate_policy(spec)
    except ValueError:  # a policy the ladder does not know: compared as given
        return spec


def _step_position(engine: Engine, steps: int) -> tuple[int, int]:
    """(index of the current iteration in its accumulation window, size of that window).

    Windows restart at every epoch when the epoch length is known, and the last window of an epoch holds
    what is left, so that every epoch ends with an optimizer step and no gradient is carried over."""
    length = engine.state.epoch_length
    local = (engine.state.iteration - 1) % length if length else engine.state.iteration - 1
    start = local - local % steps
    size = min(steps, length - start) if length else steps
    return local - start, size


def _accumulation_steps(engine: Engine) -> int:
    update = getattr(engine, "_process_function", None)
    if isinstance(update, MemoryEfficientUpdate):
        return update.steps(engine)
    return int(getattr(engine, "accumulation_steps", 1) or 1)


def _at_step_boundary(engine: Engine) -> bool:
    """Whether the last completed iteration ended with an optimizer step (no gradient is pending)."""
    steps = _accumulation_steps(engine)
    if steps == 1 or engine.state.iteration == 0:
        return True
    index, size = _step_position(engine, steps)
    return index == size - 1


class MemoryEfficientUpdate:
    """``iteration_update`` for ``monai.engines.SupervisedTrainer``: gradient accumulation, mixed precision
    and out-of-memory recovery around the trainer's own prepare_batch, inferer and loss function.

    It does what ``SupervisedTrainer._iteration`` does (same ``engine.state.output`` keys and
    ``IterationEvents``), plus:

    - **Accumulation**: the optimizer steps once every ``accumulation_steps`` iterations, on the mean of their
      gradients (each loss is divided by the window size), so with a mean-reduced loss the weights equal those
      of one batch ``accumulation_steps`` times larger. Windows restart each epoch; when the epoch length is not
      a multiple, the last window is shorter and divides by its own size (MONAI's built-in
      ``accumulation_steps`` divides it by the full size, which under-weights those samples). Under
      DistributedDataParallel the gradient all-reduce is skipped (``no_sync``) until the window's last step.
      ``engine.state.output[LOSS]`` is the unscaled loss.
    - **Mixed precision**: when the trainer has ``amp=True`` the forward and loss run under
      ``torch.autocast(<the trainer's device type>, dtype)``: bfloat16 on the CPU, float16 on CUDA unless
      ``amp_dtype`` (or ``amp_kwargs["dtype"]`` of the trainer) says otherwise. With float16 the trainer's
      GradScaler (MONAI creates it in ``run()``; it is disabled where CUDA is not available) scales each
      micro-step's loss and steps/updates once per window; bfloat16 needs no scaler.
    - **Out-of-memory recovery**: when the forward or backward raises ``torch.OutOfMemoryError``, the
      network's ``checkpoint_policy`` is set to the next, more aggressive entry of ``oom_ladder`` and the same
      batch is run again: the batch is not skipped. If the backward had started, gradients already hold part
      of the failed step, so they are cleared and the earlier iterations of the current accumulation window
      are replayed (their batches are kept as the loader gave them, usually in host memory, until the window's
      optimizer step) without firing
      their events again: the window's gradient then equals that of a run that used the new policy from the
      window's start. The new policy stays for the rest of training. Each event is logged as a warning and
      appended to ``engine.state.oom_events`` (iteration, epoch, phase, old and new policy, error text). When
      the ladder is exhausted, or the network has no ``checkpoint_policy``, the error is raised as it was.
      An out-of-memory error in ``optimizer.step()`` is not retried (a checkpoint policy cannot shrink
      optimizer state, and a half-applied step cannot be undone).

    Ladder rules: the entry after the network's current policy is tried next; if the current policy is not
    on the ladder, the ladder's entries other than ``"none"`` are tried from the start. A current policy
    ``{"budget_gb": X, ...}`` is retried with ``budget_gb`` multiplied by ``budget_factor`` instead (the network
    then plans again for the smaller budget, `monai_ckpt.planner`), and budget dicts may appear on the ladder. At most ``max_oom_retries`` retries per iteration (default: the ladder's length). Recovery is per
    process: under DDP an error on one rank is not coordinated with the others.

    Args:
        accumulation_steps: iterations per optimizer step (a positive int). None: the trainer's own
            ``accumulation_steps`` (MONAI >= 1.5), else 1. Give it here or there, not both with different
            values.
        amp_dtype: ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``/``"half"`` or a torch dtype; only used
            when the trainer has ``amp=True``. None: ``amp_kwargs["dtype"]`` of the trainer, else bfloat16 on
            the CPU and float16 elsewhere.
        oom_ladder: checkpoint policies from least to most aggressive (default ``("none", "cheap", "all")``);
            None or ``[]`` turns recovery off. Each is checked with `monai_ckpt.policies.validate_policy` here.
        max_oom_retries: retries allowed per iteration; None: ``len(oom_ladder)``.
        budget_factor: how much a ``budget_gb`` policy shrinks on each retry, in (0, 1).

    Raises:
        ValueError: for a bad ``accumulation_steps``, ``amp_dtype``, ladder policy or ``budget_factor``; and,
            on the first iteration, for an ``amp_dtype`` that autocast does not support on the trainer's
            device, or ``accumulation_steps`` that contradicts the trainer's.

    Example::

        trainer = SupervisedTrainer(
            device=device, max_epochs=100, train_data_loader=loader,
            network=CheckpointUNet(..., checkpoint_policy="none"),
            optimizer=opt, loss_function=DiceLoss(sigmoid=True), amp=True,
            iteration_update=MemoryEfficientUpdate(accumulation_steps=4, oom_ladder=["none", "cheap", "all"]),
        )

    In a bundle: ``"iteration_update": {"_target_": "monai_ckpt.handlers.MemoryEfficientUpdate",
    "accumulation_steps": 4}`` inside the trainer's definition.
    """

    def __init__(
        self,
        accumulation_steps: int | None = None,
        amp_dtype: str | torch.dtype | None = None,
        oom_ladder: Sequence[PolicySpec] | None = DEFAULT_OOM_LADDER,
        max_oom_retries: int | None = None,
        budget_factor: float = 0.75,
    ) -> None:
        if accumulation_steps is not None and (
            not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1
        ):
            raise ValueError(
                f"accumulation_steps must be a positive integer (1: an optimizer step every iteration; k: one every k "
                f"iterations, effective batch = batch size x k), got {accumulation_steps!r}."
            )
        self.accumulation_steps = accumulation_steps
        self.amp_dtype = None if amp_dtype is None else self._parse_dtype(amp_dtype)
        ladder = list(oom_ladder or [])
        checked = []
        for spec in ladder:
            try:
                checked.append(validate_policy(spec))
            except ValueError as e:
                raise ValueError(f"oom_ladder entry {spec!r} is not a valid checkpoint policy: {e}") from None
        self.oom_ladder = checked
        if max_oom_retries is not None and (not isinstance(max_oom_retries, int) or max_oom_retries < 0):
            raise ValueError(f"max_oom_retries must be a non-negative integer or None, got {max_oom_retries!r}.")
        self.max_oom_retries = len(checked) if max_oom_retries is None else max_oom_retries
        if not 0 < budget_factor < 1:
            raise ValueError(
                f"budget_factor must be in (0, 1) so that each retry plans for less memory, got {budget_factor!r}."
            )
        self.budget_factor = budget_factor
        self._window: list[Any] = []
        self._phase = "forward"
        self._checked: tuple | None = None

    @staticmethod
    def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
        if isinstance(dtype, torch.dtype) and dtype in _AMP_DTYPES.values():
            return dtype
        if isinstance(dtype, str) and dtype.removeprefix("torch.") in _AMP_DTYPES:
            return _AMP_DTYPES[dtype.removeprefix("torch.")]
        raise ValueError(
            f"amp_dtype {dtype!r} is not a mixed-precision dtype; use one of {sorted(_AMP_DTYPES)} "
            "(or torch.float16 / torch.bfloat16), or None for the device's default (CPU: bfloat16, CUDA: float16)."
        )

    def steps(self, engine: Engine) -> int:
        """The accumulation steps in effect for ``engine``."""
        theirs = int(getattr(engine, "accumulation_steps", 1) or 1)
        if self.accumulation_steps is None:
            return theirs
        if theirs > 1 and theirs != self.accumulation_steps:
            raise ValueError(
                f"the trainer has accumulation_steps={theirs} and MemoryEfficientUpdate has "
                f"accumulation_steps={self.accumulation_steps}; set it in one place only (MemoryEfficientUpdate "
                "replaces the trainer's own accumulation)."
            )
        return self.accumulation_steps

    def autocast_dtype(self, engine: Engine) -> torch.dtype | None:
        """The autocast dtype for ``engine`` (None when its ``amp`` is off).

        Raises:
            ValueError: when autocast does not support that dtype on the engine's device type, or
                ``amp_dtype`` was given to a trainer with ``amp=False``.
        """
        device_type = torch.device(engine.state.device).type
        if not getattr(engine, "amp", False):
            if self.amp_dtype is not None:
                raise ValueError(
                    f"amp_dtype={self.amp_dtype} was given but the trainer has amp=False; set amp=True on the "
                    "trainer (\"amp\": true in train.json) or leave amp_dtype out."
                )
            return None
        dtype = self.amp_dtype
        if dtype is None and "dtype" in getattr(engine, "amp_kwargs", {}):
            dtype = self._parse_dtype(engine.amp_kwargs["dtype"])
        if dtype is None:
            dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
        key = (device_type, dtype)
        if self._checked != key:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    enabled = torch.autocast(device_type, dtype=dtype)._enabled
                except RuntimeError as e:
                    caught, enabled = [str(e)], False  # type: ignore[list-item]
            if not enabled:
                why = " ".join(str(getattr(w, "message", w)) for w in caught)
                default = "bfloat16" if device_type == "cpu" else "float16"
                raise ValueError(
                    f"mixed precision with {dtype} is not supported on device type {device_type!r} ({why.strip()}); "
                    f"use amp_dtype={default!r} there, or amp=False."
                )
            self._checked = key
        return dtype

    def _forward_backward(self, engine: Engine, batchdata: Any, divisor: int, dtype: torch.dtype | None,
                          scaler: Any, sync: bool, fire: bool) -> None:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            (inputs, targets), args, kwargs = batch, (), {}
        else:
            inputs, targets, args, kwargs = batch
        if getattr(engine, "compile", False):
            inputs = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
            targets = targets.as_tensor() if isinstance(targets, MetaTensor) else targets
        engine.state.output = output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        self._phase = "forward"
        device_type = torch.device(engine.state.device).type
        autocast = torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()
        ddp = isinstance(engine.network, nn.parallel.DistributedDataParallel)
        with engine.network.no_sync() if ddp and not sync else contextlib.nullcontext():
            with autocast:
                output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
                if fire:
                    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                output[Keys.LOSS] = engine.loss_function(output[Keys.PRED], targets).mean()
                if fire:
                    engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss = output[Keys.LOSS] / divisor if divisor > 1 else output[Keys.LOSS]
            self._phase = "backward"
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if fire:
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

    def _next_policy(self, current: Any, tried: list) -> Any:
        if isinstance(current, dict) and "budget_gb" in current:
            return {**current, "budget_gb": current["budget_gb"] * self.budget_factor}
        index = next((i for i, p in enumerate(self.oom_ladder) if _same_policy(p, _canonical(current))), None)
        if index is not None:
            candidates = self.oom_ladder[index + 1 :]
        else:
            candidates = [p for p in self.oom_ladder if p != "none"]
        return next((p for p in candidates if not any(_same_policy(p, t) for t in tried)), None)

    def __call__(self, engine: Engine, batchdata: Any) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        steps = self.steps(engine)
        dtype = self.autocast_dtype(engine)
        scaler = getattr(engine, "scaler", None)
        if dtype != torch.float16 or scaler is None or not scaler.is_enabled():
            scaler = None
        index, size = _step_position(engine, steps)
        engine.network.train()
        if index == 0:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            self._window = []
        last = index == size - 1
        holder = policy_network(engine.network)
        tried = [holder.checkpoint_policy] if holder is not None else []
        replay = False
        while True:
            try:
                if replay:
                    engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
                    for earlier in self._window:
                        self._forward_backward(engine, earlier, size, dtype, scaler, sync=False, fire=False)
                self._forward_backward(engine, batchdata, size, dtype, scaler, sync=last, fire=True)
                break
            except torch.OutOfMemoryError:
                nxt = None
                if holder is not None and len(tried) <= self.max_oom_retries:
                    nxt = self._next_policy(holder.checkpoint_policy, tried)
                if nxt is None:
                    raise
                error = str(sys.exc_info()[1]).strip().splitlines()
            # outside the except block: the traceback (and the tensors its frames hold) is released
            replay = replay or self._phase == "backward"
            engine.state.output = None
            if torch.device(engine.state.device).type == "cuda":
                torch.cuda.empty_cache()
            old = holder.checkpoint_policy
            holder.checkpoint_policy = nxt
            tried.append(nxt)
            event = {"iteration": engine.state.iteration, "epoch": engine.state.epoch, "phase": self._phase,
                     "from": old, "to": nxt, "error": error[0][:300] if error else ""}
            if not hasattr(engine.state, "oom_events"):
                engine.state.oom_events = []
            engine.state.oom_events.append(event)
            replayed = f" (replaying {len(self._window)} earlier iteration(s) of the accumulation window)"
            engine.logger.warning(
                f"out of memory in the {self._phase} of iteration {engine.state.iteration} with checkpoint_policy "
                f"{old!r}; retrying the same batch with checkpoint_policy {nxt!r}" + (replayed if replay else "")
            )
        if last:
            if scaler is not None:
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                engine.optimizer.step()
            self._window = []
        elif self.oom_ladder:
            self._window.append(batchdata)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


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


class _SkipFirst:
    """Iterates ``data`` but drops the first ``skip`` items of the first pass: the batches of an interrupted
    epoch that were already trained on."""

    def __init__(self, data: Iterable, skip: int) -> None:
        self.data, self.skip = data, skip

    def __iter__(self) -> Iterator:
        it = iter(self.data)
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(it, None)
        return it

    def __getattr__(self, name: str) -> Any:
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)


class ResumableCheckpoint:
    """Training checkpoints that a killed run resumes from: model, optimizer, lr scheduler and anything else
    in ``save_dict``, the engine's iteration/epoch state and, when the trainer uses one, its GradScaler.

    Saving: every ``save_interval`` iterations and at each epoch end, plus when training completes. A
    checkpoint is written once the iteration's (or epoch's) handlers have all run, i.e. when the engine asks for
    the next batch (GET_BATCH_STARTED), so an lr scheduler or validation handler attached after this one is
    already included. With gradient accumulation a checkpoint is only taken right after an optimizer step
    (a due one waits for the window's end), so no half-accumulated gradient is lost. Only rank 0 writes.

    Files are ``<save_dir>/<prefix>_<iteration>.pt`` (a plain dict of state_dicts, also loadable with MONAI's
    ``CheckpointLoader``); the newest ``n_saved`` are kept. Each file is written to a hidden temporary file
    in the same folder, flushed and fsynced, then renamed over the final name (``os.replace``, atomic on
    POSIX and Windows) and the folder is fsynced, so a file with a checkpoint's name is always complete, even
    after ``kill -9`` or a power cut (`monai_ckpt.io.atomic_path`). (ignite's ``DiskSaver(atomic=True)`` also renames a temporary file, but
    does not fsync, and a kill during a write leaves its ``tmpXXXX`` file behind; temporaries here are removed
    at the next start.)

    Resuming: on STARTED, if ``save_dir`` holds a checkpoint newer than the engine's state, the newest one that
    loads is restored (a file that fails to load is skipped with a warning). ``max_epochs`` stays the
    trainer's. If the checkpoint is mid-epoch, the first pass over the data loader skips the batches the
    interrupted epoch had already trained on (they are still read; ``skip_trained_batches=False`` turns this
    off), so with a deterministic loader (no shuffle, or a sampler seeded per epoch) the resumed run sees
    the batches an uninterrupted run would have. The checkpoint policy of the network is not saved.

    Args:
        save_dir: folder for the checkpoints (created if missing).
        save_dict: objects with ``state_dict``/``load_state_dict`` to save, by key, e.g.
            ``{"network": net, "optimizer": opt, "lr_scheduler": sched}``; DDP/DataParallel are unwrapped.
        save_interval: iterations between checkpoints; 0: only at epoch ends.
        n_saved: how many checkpoints to keep (newest first); None: all.
        file_prefix: file name prefix.
        engine_key: key of the engine's own state (added unless the engine is in ``save_dict``).
        scaler_key: key of the trainer's GradScaler state (saved when the scaler is enabled).
        resume: load the newest checkpoint on STARTED.
        skip_trained_batches: on a mid-epoch resume, skip the batches already trained in that epoch.
        map_location: passed to ``torch.load``.
        name: logger name; None uses ``engine.logger``.

    Example::

        ResumableCheckpoint("./runs/resume", {"network": net, "optimizer": opt}, save_interval=100).attach(trainer)
        # bundle, in train#handlers:
        # {"_target_": "monai_ckpt.handlers.ResumableCheckpoint", "save_dir": "$@output_dir + '/resume'",
        #  "save_dict": {"network": "@network", "optimizer": "@optimizer"}, "save_interval": 100}
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: dict,
        save_interval: int = 0,
        n_saved: int | None = 2,
        file_prefix: str = "checkpoint",
        engine_key: str = "trainer",
        scaler_key: str = "grad_scaler",
        resume: bool = True,
        skip_trained_batches: bool = True,
        map_location: Any = None,
        name: str | None = None,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save, e.g. {'network': net, 'optimizer': o}.")
        if not isinstance(save_interval, int) or save_interval < 0:
            raise ValueError(
                f"save_interval must be a non-negative integer (0: only at epoch ends), got {save_interval!r}."
            )
        if n_saved is not None and (not isinstance(n_saved, int) or n_saved < 1):
            raise ValueError(f"n_saved must be a positive integer or None (keep all), got {n_saved!r}.")
        if not re.fullmatch(r"[\w.-]+", file_prefix):
            raise ValueError(f"file_prefix must be letters, digits, '_', '-' or '.', got {file_prefix!r}.")
        self.save_dir = os.fspath(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.n_saved = n_saved
        self.file_prefix = file_prefix
        self.engine_key = engine_key
        self.scaler_key = scaler_key
        self.resume = resume
        self.skip_trained_batches = skip_trained_batches
        self.map_location = map_location
        self._name = name
        self.logger = logging.getLogger(name)
        self._pattern = re.compile(rf"{re.escape(file_prefix)}_(\d+)\.pt")
        self._last_saved = -1
        self._due = False
        self.last_checkpoint: str | None = None
        self.resumed_from: str | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``: load on STARTED, save between iterations and on COMPLETED."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.between_iterations)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    @staticmethod
    def _rank() -> int:
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def checkpoints(self) -> list[tuple[int, str]]:
        """(iteration, path) of the checkpoint files in ``save_dir``, oldest first."""
        if not os.path.isdir(self.save_dir):
            return []
        found = [(int(m.group(1)), os.path.join(self.save_dir, f)) for f in os.listdir(self.save_dir)
                 if (m := self._pattern.fullmatch(f))]
        return sorted(found)

    def _objects(self, engine: Engine) -> dict:
        objects = {k: getattr(v, "module", v) if isinstance(v, (nn.DataParallel, nn.parallel.DistributedDataParallel))
                   else v for k, v in self.save_dict.items()}
        if not any(v is engine for v in objects.values()):
            objects[self.engine_key] = engine
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled() and self.scaler_key not in objects:
            objects[self.scaler_key] = scaler
        return objects

    def started(self, engine: Engine) -> None:
        if self._rank() == 0:
            remove_temporaries(self.save_dir, self._pattern)  # left by a run killed while writing
        self._last_saved = engine.state.iteration
        if self.resume:
            self._load_latest(engine)

    def _load_latest(self, engine: Engine) -> None:
        for iteration, path in reversed(self.checkpoints()):
            if iteration <= engine.state.iteration:
                return
            try:
                checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
            except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # skipped: an older one may load
                self.logger.warning(f"skipping checkpoint {path}: it does not load ({type(e).__name__}: {e})")
                continue
            objects = self._objects(engine)
            missing = [k for k in objects if k not in checkpoint]
            if missing:
                raise ValueError(
                    f"checkpoint {path} has no {missing}; it holds {sorted(checkpoint)}. Use the save_dict it was "
                    "saved with, or another save_dir."
                )
            max_epochs = engine.state.max_epochs
            for key, obj in objects.items():
                obj.load_state_dict(checkpoint[key])
            if max_epochs is not None:
                if engine.state.epoch > max_epochs:
                    raise ValueError(
                        f"checkpoint {path} is at epoch {engine.state.epoch}, beyond the trainer's max_epochs="
                        f"{max_epochs}; raise max_epochs to train further."
                    )
                engine.state.max_epochs = max_epochs
            self._last_saved = engine.state.iteration
            self.resumed_from = path
            length = engine.state.epoch_length
            skip = engine.state.iteration % length if length else 0
            if skip and self.skip_trained_batches and engine.state.dataloader is not None:
                engine.state.dataloader = _SkipFirst(engine.state.dataloader, skip)
            self.logger.info(
                f"resumed from {path}: iteration {engine.state.iteration}, epoch {engine.state.epoch}"
                + (f" (+{skip} batches of the next epoch, skipped on the loader)" if skip else "")
            )
            return

    def between_iterations(self, engine: Engine) -> None:
        it = engine.state.iteration
        if it <= self._last_saved:
            return
        length = engine.state.epoch_length
        if (self.save_interval and it % self.save_interval == 0) or (length and it % length == 0):
            self._due = True
        if self._due and _at_step_boundary(engine):
            self.save(engine)

    def completed(self, engine: Engine) -> None:
        if engine.state.iteration > self._last_saved and _at_step_boundary(engine):
            self.save(engine)

    def save(self, engine: Engine) -> str | None:
        """Write a checkpoint of the current state now (rank 0 only); returns its path."""
        self._due = False
        self._last_saved = engine.state.iteration
        if self._rank() != 0:
            return None
        checkpoint = {k: obj.state_dict() for k, obj in self._objects(engine).items()}
        path = os.path.join(self.save_dir, f"{self.file_prefix}_{engine.state.iteration}.pt")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        self.last_checkpoint = path
        if self.n_saved is not None:
            for _, old in self.checkpoints()[: -self.n_saved]:
                with contextlib.suppress(OSError):
                    os.remove(old)
        return path



try:
    from monai.handlers import CheckpointSaver
except ImportError:  # pragma: no cover
    CheckpointSaver = object  # type: ignore[misc,assignment]


def _atomic_disk_saver(dirname: str, filename: str | None):
    from ignite.handlers import DiskSaver

    class _AtomicDiskSaver(DiskSaver):
        """ignite's ``DiskSaver`` writing through `atomic_path` (temporary file, fsync, rename, fsync of the
        folder), with MONAI's fixed-filename option. ignite's ``Checkpoint`` removes the file it replaces
        *before* saving the new one; here removal is deferred until the new file is on disk, so there is never
        a moment without a model file."""

        def __init__(self) -> None:
            super().__init__(dirname=dirname, require_empty=False, atomic=True)
            self.filename = filename
            self._pending: list[str] = []

        def _save_func(self, checkpoint: Any, path: Any, func: Callable) -> None:
            with atomic_path(path) as tmp:
                func(checkpoint, tmp, **self.kwargs)

        def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
            import ignite.distributed as idist

            name = self.filename or filename
            super().__call__(checkpoint, name, metadata)
            if idist.get_rank() != self.save_on_rank:
                self._pending.clear()  # only the rank that writes the files removes them
                return
            for old in self._pending:
                if old != name:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.dirname, old))
            self._pending.clear()

        def remove(self, filename: str) -> None:
            self._pending.append(self.filename or filename)

    return _AtomicDiskSaver()


class AtomicCheckpointSaver(CheckpointSaver):  # type: ignore[misc,valid-type]
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written atomically.

    MONAI 1.6's ``CheckpointSaver`` uses ignite's ``DiskSaver(atomic=False)`` and lets ignite remove the previous
    best/final file before writing the new one: an interrupt at the wrong moment leaves a truncated ``model.pt``
    or none. Here every file is written through `monai_ckpt.io.atomic_path` (temporary file in the same folder,
    fsync, rename onto its name, fsync of the folder), and the file it replaces is removed only after that.

    Bundle use: ``{"_target_": "monai_ckpt.handlers.AtomicCheckpointSaver", "save_dir": "@ckpt_dir", ...}``.
    """

    def __init__(self, save_dir: str, save_dict: dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, *args, **kwargs)
        fixed = {
            "_final_checkpoint": self._final_filename,
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attr, filename in fixed.items():
            ckpt = getattr(self, attr, None)
            if ckpt is not None:
                ckpt.save_handler = _atomic_disk_saver(self.save_dir, filename)
