"""Model definitions and the registry. Imports nothing from the rest of vitlab but its error types."""

from .features import FeatureExtractor, FeatureInfo
from .hybrid import HybridConfig, HybridEmbed, HybridVisionTransformer
from .linear import Linear, onednn_linear_available, set_onednn_linear
from .registry import (
    ModelEntry,
    architecture_of,
    build_model,
    config_from_dict,
    create_model,
    get_config,
    list_models,
    register,
    resolve,
)
from .resnetv2 import ResNetV2, ResNetV2Config
from .vit import (
    Attention,
    Block,
    Mlp,
    ModelInputError,
    PatchEmbed,
    VisionTransformer,
    ViTConfig,
    sincos_2d_position_embedding,
)

__all__ = [
    "Attention",
    "Block",
    "FeatureExtractor",
    "FeatureInfo",
    "HybridConfig",
    "HybridEmbed",
    "HybridVisionTransformer",
    "Linear",
    "Mlp",
    "ModelEntry",
    "ModelInputError",
    "PatchEmbed",
    "ResNetV2",
    "ResNetV2Config",
    "ViTConfig",
    "VisionTransformer",
    "architecture_of",
    "build_model",
    "config_from_dict",
    "create_model",
    "get_config",
    "list_models",
    "onednn_linear_available",
    "register",
    "resolve",
    "set_onednn_linear",
    "sincos_2d_position_embedding",
]
