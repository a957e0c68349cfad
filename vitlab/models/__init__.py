"""Model definitions and the registry. Imports nothing from the rest of vitlab but its error types and the
preprocessing record (the metadata a model carries)."""

from .families import (
    FAMILIES,
    ModelFamily,
    config_from_dict,
    family_of,
    has_tokens,
    model_from_config,
    register_family,
)
from .features import FeatureExtractor, FeatureInfo
from .hybrid import HybridConfig, HybridEmbed, HybridVisionTransformer
from .metadata import ModelMeta, ModelMetadata, metadata_of
from .registry import (
    ModelConfig,
    ModelEntry,
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
    "ModelMeta",
    "ModelMetadata",
    "Mlp",
    "ModelConfig",
    "ModelEntry",
    "ModelInputError",
    "PatchEmbed",
    "ResNetV2",
    "ResNetV2Config",
    "ViTConfig",
    "VisionTransformer",
    "FAMILIES",
    "ModelFamily",
    "config_from_dict",
    "create_model",
    "family_of",
    "get_config",
    "has_tokens",
    "list_models",
    "metadata_of",
    "model_from_config",
    "register",
    "register_family",
    "resolve",
    "sincos_2d_position_embedding",
]
