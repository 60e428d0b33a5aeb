"""`MemoryEfficientUpdate`: a ``SupervisedTrainer`` ``iteration_update`` with gradient accumulation, mixed
precision (bf16 on the CPU, fp16 + GradScaler or bf16 on CUDA) and out-of-memory recovery that retries the same
batch with the next checkpoint policy of a ladder."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..planner import planning_loss
from ..policies import PolicySpec, is_budget_policy, validate_policy

__all__ = ["DEFAULT_OOM_LADDER", "MemoryEfficientUpdate", "policy_network"]

# "blocks" is not on it: it keeps more than "all" (96^3 UNet(16..256): 120 vs 101 MiB of activations at the peak)
DEFAULT_OOM_LADDER: tuple[PolicySpec, ...] = ("none", "cheap", "all")
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
    - **Budget policies**: a network with ``checkpoint_policy={"budget_gb": X}`` plans its step with the
      trainer's ``loss_function`` and the label batch's shape and dtype (`monai_ckpt.planner.planning_loss`),
      per micro-batch shape, under the trainer's autocast; under DDP rank 0 plans and broadcasts the plan.
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
        holder = policy_network(engine.network)
        planning = contextlib.nullcontext()
        if holder is not None and is_budget_policy(holder.checkpoint_policy) and isinstance(targets, torch.Tensor):
            planning = planning_loss(engine.loss_function, targets)  # a budget plans the engine's own step
        with engine.network.no_sync() if ddp and not sync else contextlib.nullcontext():
            with autocast, planning:
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

