"""Model definitions and the registry. Imports nothing from the rest of vitlab but its error types and the
preprocessing record (the metadata a model carries).

The names are imported on first use (PEP 562): a torch-free module of this package (``vitlab.models.lora``'s target
words, ``vitlab.models.metadata``) loads without torch, which the command line's argument parsers rely on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

# public name -> the module of this package that defines it
_EXPORTS = {
    "Attention": ".vit",
    "Block": ".vit",
    "FeatureExtractor": ".features",
    "FeatureInfo": ".features",
    "HybridConfig": ".hybrid",
    "HybridEmbed": ".hybrid",
    "HybridVisionTransformer": ".hybrid",
    "ImageTextModel": ".image_text",
    "ModelMeta": ".metadata",
    "ModelMetadata": ".metadata",
    "Mlp": ".vit",
    "ModelConfig": ".registry",
    "ModelEntry": ".registry",
    "ModelInputError": ".vit",
    "PatchEmbed": ".vit",
    "ResNetV2": ".resnetv2",
    "ResNetV2Config": ".resnetv2",
    "TextConfig": ".text",
    "TextTokenizer": ".tokenizer",
    "TextTransformer": ".text",
    "ViTConfig": ".vit",
    "VisionTransformer": ".vit",
    "FAMILIES": ".families",
    "ModelFamily": ".families",
    "config_from_dict": ".families",
    "create_model": ".registry",
    "family_of": ".families",
    "get_config": ".registry",
    "has_tokens": ".families",
    "key_bias_slices": ".vit",
    "list_models": ".registry",
    "metadata_of": ".metadata",
    "model_from_config": ".families",
    "register": ".registry",
    "register_family": ".families",
    "resolve": ".registry",
    "sincos_2d_position_embedding": ".vit",
}

__all__ = [
    "Attention",
    "Block",
    "FeatureExtractor",
    "FeatureInfo",
    "HybridConfig",
    "HybridEmbed",
    "HybridVisionTransformer",
    "ImageTextModel",
    "ModelMeta",
    "ModelMetadata",
    "Mlp",
    "ModelConfig",
    "ModelEntry",
    "ModelInputError",
    "PatchEmbed",
    "ResNetV2",
    "ResNetV2Config",
    "TextConfig",
    "TextTokenizer",
    "TextTransformer",
    "ViTConfig",
    "VisionTransformer",
    "FAMILIES",
    "ModelFamily",
    "config_from_dict",
    "create_model",
    "family_of",
    "get_config",
    "has_tokens",
    "key_bias_slices",
    "list_models",
    "metadata_of",
    "model_from_config",
    "register",
    "register_family",
    "resolve",
    "sincos_2d_position_embedding",
]

if TYPE_CHECKING:
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
    from .image_text import ImageTextModel
    from .metadata import ModelMeta, ModelMetadata, metadata_of
    from .registry import ModelConfig, ModelEntry, create_model, get_config, list_models, register, resolve
    from .resnetv2 import ResNetV2, ResNetV2Config
    from .text import TextConfig, TextTransformer
    from .tokenizer import TextTokenizer
    from .vit import (
        Attention,
        Block,
        Mlp,
        ModelInputError,
        PatchEmbed,
        VisionTransformer,
        ViTConfig,
        key_bias_slices,
        sincos_2d_position_embedding,
    )


__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)
