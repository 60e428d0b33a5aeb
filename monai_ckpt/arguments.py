"""What the command lines (``python -m monai_ckpt.benchmark``, ``.plan``, ``.data``) share: argparse types that
turn a bad value into a one-line error before any work, and ``--help`` with each option's default. Standard
library only, so any layer may import it."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence

__all__ = ["DefaultsHelpFormatter", "non_negative_int", "output_file", "positive_float", "positive_int"]


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a positive integer, or a one-line error that says so."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of 0 or more (a count that may be none), or a one-line error that says so."""
    return _integer(text, 0, "an integer of 0 or more")


def positive_float(text: str) -> float:
    """An argparse type: a positive number, or a one-line error that says so."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The CLIs' ``--help``: each option's default after its help (lists as typed: ``96 96 96``), except where there
    is none (None, or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        if isinstance(default, (list, tuple)):
            shown = " ".join(d if isinstance(d, str) else json.dumps(d) for d in default)
            return f"{action.help or ''} (default: {shown.replace('%', '%%')})"
        return super()._get_help_string(action)


def output_file(suffixes: Sequence[str] = ()) -> Callable[[str], str]:
    """An argparse type for a file a CLI writes at the end of its run: checked when the arguments are parsed, so a
    missing or read-only folder is a one-line error before any work, not a traceback after it.

    Args:
        suffixes: the file name endings accepted (e.g. ``(".png", ".svg")``); any when empty.
    """

    def check(text: str) -> str:
        path = os.path.abspath(os.path.expanduser(text))
        folder = os.path.dirname(path)
        if suffixes and not text.lower().endswith(tuple(suffixes)):
            raise argparse.ArgumentTypeError(f"{text!r}: give a file name ending in {' or '.join(suffixes)}")
        if os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"{text!r} is a folder: give a file name in it")
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"{text!r}: the folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r}: the folder {folder} is not writable")
        return text

    return check
