"""Files written during training that nothing can leave half-written: `ResumableCheckpoint` (training state
that a killed run resumes from, mid-epoch included) and `AtomicCheckpointSaver` (MONAI's best/final model files),
both through `monai_ckpt.io.atomic_path`."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..io import atomic_path, remove_temporaries
from .update import _at_step_boundary

__all__ = ["AtomicCheckpointSaver", "ResumableCheckpoint"]


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
