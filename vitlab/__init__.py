"""vitlab: the Vision Transformer of "An Image is Worth 16x16 Words": build, train, load, evaluate, inspect."""

from .checkpoints import load, save
from .hub import create_model, get_pretrained, list_pretrained
from .models import VisionTransformer, ViTConfig, get_config, list_models
from .preprocessing import Preprocessing

__version__ = "0.1.0"

__all__ = ["Preprocessing", "ViTConfig", "VisionTransformer", "create_model", "get_config", "get_pretrained",
           "list_models", "list_pretrained", "load", "save", "__version__"]
