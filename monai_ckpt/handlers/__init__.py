"""Memory-efficient training inside MONAI's engines: ignite handlers and an ``iteration_update``.

- `MemoryEfficientUpdate` (``handlers/update.py``): an ``iteration_update`` for ``monai.engines.SupervisedTrainer``
  that adds gradient accumulation (effective batch = batch x steps), mixed precision that works on the CPU (bf16)
  and on CUDA (fp16 with the trainer's GradScaler, or bf16), and out-of-memory recovery: a step that runs out of
  memory is retried, on the same batch, with the next more aggressive checkpoint policy of a ladder.
- `MemoryStatsHandler` (``handlers/memory_stats.py``): logs peak memory, the activation memory the checkpoint
  policy saves, voxels/s and the active policy, per iteration and per epoch, to the logger, TensorBoard and
  ``engine.state``.
- `ResumableCheckpoint` (``handlers/checkpoint_files.py``): crash-safe training checkpoints (atomic, fsynced
  writes; every N iterations and at each epoch end; last k kept) that a restarted run resumes from, mid-epoch
  included.
- `AtomicCheckpointSaver` (``handlers/checkpoint_files.py``): MONAI's ``CheckpointSaver`` (best/final model
  files) with atomic, fsynced writes.

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

This package is the only part of the library that knows ignite and MONAI's engines; the core
(`monai_ckpt.checkpoint`, `monai_ckpt.policies`, `monai_ckpt.chain`) does not import it.
"""

from .checkpoint_files import AtomicCheckpointSaver, ResumableCheckpoint
from .memory_stats import MemoryStatsHandler, estimate_activation_saving
from .update import DEFAULT_OOM_LADDER, MemoryEfficientUpdate, policy_network

__all__ = [
    "DEFAULT_OOM_LADDER",
    "AtomicCheckpointSaver",
    "MemoryEfficientUpdate",
    "MemoryStatsHandler",
    "ResumableCheckpoint",
    "estimate_activation_saving",
    "policy_network",
]
