"""vitlab: the Vision Transformer of "An Image is Worth 16x16 Words": build, train, load, evaluate, inspect."""

from .checkpoints import load, save
from .compute.onednn import set_onednn_linear
from .models import VisionTransformer, ViTConfig, get_config, list_models
from .models import create_model as _create_model
from .preprocessing import Preprocessing

__version__ = "0.1.0"


def create_model(name: str, **overrides):
    """Build a registered model, freshly initialised (:func:`vitlab.models.create_model`), with the CPU fast path
    for its Linear layers on (:func:`vitlab.compute.set_onednn_linear`; ``set_onednn_linear(model, False)`` turns it
    off). Overrides are fields of its config, e.g. ``create_model("vit_b16", num_classes=10, img_size=384)``."""
    return set_onednn_linear(_create_model(name, **overrides))


__all__ = ["Preprocessing", "ViTConfig", "VisionTransformer", "create_model", "get_config", "list_models", "load",
           "save", "__version__"]
