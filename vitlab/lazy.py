"""Package attributes imported on first use (PEP 562), so that importing a package does not load torch."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable


def lazy_attributes(namespace: dict, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """The ``__getattr__`` and ``__dir__`` of the package whose ``globals()`` is ``namespace``: a name in
    ``exports`` (public name -> the relative module defining it) is imported from its module on first use, any
    other public name that is a submodule is imported as one (as an eager ``from . import x`` would have bound it),
    and each value is then stored in the package so later look-ups skip this."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
