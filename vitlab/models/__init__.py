"""Model definitions and the registry. Imports nothing from the rest of vitlab."""

from .linear import Linear, onednn_linear_available, set_onednn_linear
from .registry import ModelEntry, create_model, get_config, list_models, register, resolve
from .vit import Attention, Block, Mlp, PatchEmbed, VisionTransformer, ViTConfig, sincos_2d_position_embedding

__all__ = [
    "Attention",
    "Block",
    "Linear",
    "Mlp",
    "ModelEntry",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "get_config",
    "list_models",
    "onednn_linear_available",
    "register",
    "resolve",
    "set_onednn_linear",
    "sincos_2d_position_embedding",
]
