"""vitlab: the Vision Transformer of "An Image is Worth 16x16 Words": build, train, load, evaluate, inspect."""

from .models import VisionTransformer, ViTConfig, create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = ["ViTConfig", "VisionTransformer", "create_model", "get_config", "list_models", "__version__"]
