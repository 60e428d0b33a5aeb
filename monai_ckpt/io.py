"""Crash-safe file writing: the one atomic-write primitive of the project.

``atomic_path(path)`` hands out a hidden temporary file next to ``path``; when the ``with`` block succeeds the
temporary file is fsynced, renamed onto ``path`` (``os.replace``: atomic on POSIX and Windows) and the folder is
fsynced, so a file with the final name is always complete, even after ``kill -9`` or a power cut. When the block
raises, the temporary file is removed. A process killed inside the block leaves its temporary file behind;
its name (``.<name>.<random>.tmp<suffix>``) is recognised by `is_temporary` and `remove_temporaries`, which
a writer calls when it starts again.

Used by ``monai_ckpt.data.AtomicNibabelWriter`` (segmentations), ``monai_ckpt.handlers.AtomicCheckpointSaver``
(MONAI's model files) and ``monai_ckpt.handlers.ResumableCheckpoint`` (training checkpoints). Standard library
only, so any layer may import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

__all__ = ["atomic_path", "fsync_dir", "is_temporary", "remove_temporaries"]

_TMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp(?:\.[A-Za-z0-9.]+)?")


def _suffix(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or removal in it survives a power cut (no-op where unsupported)."""
    if os.name != "posix":
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class atomic_path:
    """Context manager giving a temporary path next to ``path`` (same suffix, e.g. ``.nii.gz``, so writers that
    choose the format by name pick the same one). On success the file is fsynced (``fsync=True``), renamed onto
    ``path`` and the folder fsynced; on error it is removed.

    Args:
        path: the final file path; its folder is created if missing.
        fsync: flush the file and the folder to disk (turn off only for throwaway files).
        mode: permission bits of the final file (``mkstemp`` creates 0600).

    Example::

        with atomic_path("models/model.pt") as tmp:
            torch.save(state, tmp)
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True, mode: int = 0o644) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.mode = mode
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".tmp{_suffix(self.path.name)}",
                                    dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            os.chmod(self.tmp, self.mode)
            if self.fsync:
                _fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            fsync_dir(self.path.parent)


def is_temporary(filename: str, final: str | re.Pattern | None = None) -> bool:
    """Whether ``filename`` (a base name) is a temporary file of `atomic_path`; with ``final`` (a regular
    expression, or a compiled one), only one whose final name fully matches it."""
    m = _TMP.fullmatch(filename)
    if m is None or not m.group(0).endswith(".tmp" + _suffix(m.group("name"))):
        return False
    return final is None or re.fullmatch(final, m.group("name")) is not None


def remove_temporaries(folder: str | os.PathLike, final: str | re.Pattern | None = None) -> list[str]:
    """Remove the temporary files a killed `atomic_path` left in ``folder`` (those for final names matching
    ``final``, or all); returns the removed paths. Call it only when no other process writes there."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for f in os.listdir(folder):
        if is_temporary(f, final):
            path = os.path.join(folder, f)
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed
