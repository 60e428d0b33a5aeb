"""Short error reports for bundle runs: `install_brief_errors` makes ``python -m monai.bundle run`` end a bad
dataset, a bad path or a bad config value with the one message that names the file and the fix, instead of the
60-line traceback in which MONAI's config parser wraps it (``RuntimeError: Failed to evaluate ConfigExpression``).

Bundle configs call it first in ``initialize``; nothing in MONAI is patched: it is a ``sys.excepthook``, the hook
Python calls for an exception nobody caught, just before the process exits with status 1."""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

from .checks import DataCheckError

__all__ = ["FULL_TRACEBACK_ENV", "brief_error", "install_brief_errors", "user_error"]

FULL_TRACEBACK_ENV = "MONAI_CKPT_TRACEBACK"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _raised_in_package(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR + os.sep)


def user_error(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain (``__cause__``/``__context__``) that is a user's mistake with a message
    written for them: a `DataCheckError`, or a ``ValueError``/``FileNotFoundError`` raised by monai_ckpt itself
    (such as an unknown ``checkpoint_policy``); ``None`` for anything else (a bug keeps its full traceback)."""
    for e in _chain(exc):
        if isinstance(e, DataCheckError):
            return e
    for e in _chain(exc):
        if isinstance(e, (ValueError, FileNotFoundError)) and _raised_in_package(e):
            return e
    return None


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line: MONAI puts the failing config expression on the lines after "Failed to
    evaluate ConfigExpression:", pretty-printed as adjacent string literals."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text.replace('" "', "")


def brief_error(exc: BaseException) -> str | None:
    """The short report `install_brief_errors` prints for ``exc``: a line saying the traceback is hidden, the
    config item MONAI was evaluating, and last ``error: <type>: <message>``; ``None`` when ``exc`` is not a
    user's mistake (see `user_error`)."""
    cause = user_error(exc)
    if cause is None:
        return None
    where = [_one_line(e) for e in _chain(exc) if e is not cause and isinstance(e, RuntimeError)]
    lines = [f"(traceback hidden: set {FULL_TRACEBACK_ENV}=1 to see it)"]
    if where:
        lines.append(f"while running the bundle: {where[-1]}")
    lines.append(f"error: {type(cause).__name__}: {cause}")
    return "\n".join(lines)


def install_brief_errors() -> None:
    """Install a ``sys.excepthook`` that reports a user's mistake (see `user_error`) in a few lines on stderr:
    which config item failed, then the message naming the file or value and the fix, last. Other exceptions,
    and every exception when the environment variable ``MONAI_CKPT_TRACEBACK=1`` is set, print as usual. The
    exit status stays 1. Idempotent; returns ``None`` so a config expression can call it.

    Example (first item of a bundle config's ``initialize``)::

        "initialize": ["$monai_ckpt.data.install_brief_errors()", "$monai.utils.set_determinism(seed=@seed)"]
    """
    if getattr(sys.excepthook, "_monai_ckpt_brief", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        report = brief_error(exc)
        if report is None or os.environ.get(FULL_TRACEBACK_ENV, "") not in ("", "0"):
            previous(exc_type, exc, tb)
            return
        sys.stderr.write(report + "\n")
        sys.stderr.flush()

    hook._monai_ckpt_brief = True  # type: ignore[attr-defined]
    sys.excepthook = hook
