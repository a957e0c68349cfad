"""Model definitions and the registry. Imports nothing from the rest of vitlab."""

from .registry import ModelEntry, create_model, get_config, list_models, register, resolve
from .vit import Attention, Block, Mlp, PatchEmbed, VisionTransformer, ViTConfig, sincos_2d_position_embedding

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "ModelEntry",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "get_config",
    "list_models",
    "register",
    "resolve",
    "sincos_2d_position_embedding",
]
