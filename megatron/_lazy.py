"""Lazy package exports: ``from megatron.X import Name`` without importing heavy submodules at package import.

Each package keeps a table ``{submodule: (exported names...)}`` and gets its ``__getattr__``, ``__dir__`` and
``__all__`` from here, so importing ``megatron.data`` (CLIs), ``megatron.sepllm`` (training) or ``megatron.config``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]], eager: dict[str, Any]
                 ) -> tuple[Callable, Callable, list[str]]:
    """Return ``(__getattr__, __dir__, __all__)`` for ``package``: ``exports[submodule]`` are the names that
    ``package.submodule`` defines; ``eager`` is the package's ``globals()`` (for ``__dir__``)."""
    owner = {name: f"{package}.{module}" for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in owner:
            return getattr(importlib.import_module(owner[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(eager) | set(owner))

    return __getattr__, __dir__, sorted(owner)
