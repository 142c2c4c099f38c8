"""Lazy package exports: ``from megatron.X import Name`` without importing heavy submodules at package import.

Each package keeps a table ``{exported name: "module.path"}`` and gets its ``__getattr__``/``__dir__`` from here,
so importing ``megatron.data`` (CLIs), ``megatron.sepllm`` (training) or ``megatron.config`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], eager: dict[str, Any]) -> tuple[Callable, Callable]:
    """Return ``(__getattr__, __dir__)`` for ``package``: ``exports[name]`` is the module that defines ``name``;
    ``eager`` is the package's ``globals()`` (for ``__dir__``)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(eager) | set(exports))

    return __getattr__, __dir__
