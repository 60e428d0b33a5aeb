"""A package's public names imported on first use (PEP 562), so that ``import monai_ckpt`` and the command lines'
``--help`` do not pay for importing torch and MONAI. Standard library only, so any layer may import it.

Example (a package's ``__init__.py``)::

    __getattr__, __dir__ = lazy_attributes(__name__, {"CheckpointUNet": ".unet"}, submodules=("presets",))
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, names: Mapping[str, str], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the ``__init__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        names: each public name -> the module that defines it, relative to the package (``".checkpoint"``).
        submodules: submodules imported when they are asked for as attributes (``monai_ckpt.networks``).

    Returns:
        (``__getattr__``, ``__dir__``): a name is imported on first access and then bound in the package, so later
        accesses cost nothing. A name defined by the submodule of the same name (``monai_ckpt.checkpoint``, the
        function in ``checkpoint.py``) stays the definition when that submodule is imported, whoever imports it
        first, as after an eager ``from .checkpoint import checkpoint``; a name defined elsewhere is replaced by a
        submodule imported later under it (``monai_ckpt.plan`` after ``import monai_ckpt.plan``), as an eager
        package's would be. ``dir()`` lists the public names, and the submodules imported so far, as for an eager
        package (tools that walk ``dir()``, such as MONAI's bundle ``ComponentLocator``, import no more than they
        did).
    """
    module = sys.modules[package]

    class _LazyPackage(type(module)):  # type: ignore[misc]
        def __setattr__(self, name: str, value: Any) -> None:
            # the import system binds a submodule in its package as it is first imported
            if (isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}"
                    and names.get(name) == f".{name}" and hasattr(value, name)):
                value = getattr(value, name)
            super().__setattr__(name, value)

    module.__class__ = _LazyPackage

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return vars(sys.modules[package]).setdefault(name, value)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__
