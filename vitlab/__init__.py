"""vitlab: the Vision Transformer of "An Image is Worth 16x16 Words": build, train, load, evaluate, inspect.

The names below are imported on first use (PEP 562), so ``import vitlab`` and the ``vitlab`` command start without
loading torch: a command that fails on its arguments answers at once, and a Ctrl-C while torch loads is handled by
the command line like any other interrupt. Sub-packages (``vitlab.train``, ``vitlab.evaluate``, ...) are reached as
attributes the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": ".factory",
    "load_lora": ".factory",
    "save": ".checkpoints",
    "create_model": ".factory",
    "read_checkpoint": ".factory",
    "inspect_checkpoint": ".factory",
    "convert": ".factory",
    "get_pretrained": ".hub",
    "list_pretrained": ".hub",
    "VisionTransformer": ".models",
    "ViTConfig": ".models",
    "get_config": ".models",
    "list_models": ".models",
    "Preprocessing": ".preprocessing",
}

__all__ = ["Preprocessing", "ViTConfig", "VisionTransformer", "convert", "create_model", "get_config", "get_pretrained",
           "inspect_checkpoint", "list_models", "list_pretrained", "load", "load_lora", "read_checkpoint", "save",
           "__version__"]

if TYPE_CHECKING:
    from .checkpoints import save
    from .factory import convert, create_model, inspect_checkpoint, load, load_lora, read_checkpoint
    from .hub import get_pretrained, list_pretrained
    from .models import VisionTransformer, ViTConfig, get_config, list_models
    from .preprocessing import Preprocessing


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
