"""vitlab: the Vision Transformer of "An Image is Worth 16x16 Words": build, train, load, evaluate, inspect.

The names below are imported on first use (PEP 562), so ``import vitlab`` and the ``vitlab`` command start without
loading torch: a command that fails on its arguments answers at once, and a Ctrl-C while torch loads is handled by
the command line like any other interrupt. Sub-packages (``vitlab.train``, ``vitlab.evaluate``, ...) are reached as
attributes the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes

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
    "push_to_hub": ".factory",
    "soup": ".soups",
    "get_pretrained": ".hub",
    "list_pretrained": ".hub",
    "VisionTransformer": ".models",
    "ViTConfig": ".models",
    "get_config": ".models",
    "list_models": ".models",
    "metadata_of": ".models",
    "Preprocessing": ".preprocessing",
    "load_image_text": ".image_text",
    "create_image_text": ".image_text",
    "save_image_text": ".image_text",
    "ImageTextModel": ".models",
    "TextConfig": ".models",
    "TextTransformer": ".models",
}

__all__ = ["ImageTextModel", "Preprocessing", "TextConfig", "TextTransformer", "ViTConfig", "VisionTransformer",
           "convert", "create_image_text", "create_model", "get_config", "get_pretrained", "inspect_checkpoint",
           "list_models", "list_pretrained", "load", "load_image_text", "load_lora", "metadata_of", "push_to_hub",
           "read_checkpoint", "save", "save_image_text", "soup", "__version__"]

if TYPE_CHECKING:
    from .checkpoints import save
    from .factory import convert, create_model, inspect_checkpoint, load, load_lora, push_to_hub, read_checkpoint
    from .hub import get_pretrained, list_pretrained
    from .image_text import create_image_text, load_image_text, save_image_text
    from .models import (
        ImageTextModel,
        TextConfig,
        TextTransformer,
        VisionTransformer,
        ViTConfig,
        get_config,
        list_models,
        metadata_of,
    )
    from .preprocessing import Preprocessing
    from .soups import soup


__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)
