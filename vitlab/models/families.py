"""The table of model families: for each, the name a checkpoint stores, its config class and its model class.

The registry builds models from it and the vitlab checkpoint format saves and rebuilds them with it, so a family is
listed once, here. Families from outside vitlab are added with :func:`register_family`, an explicit call. vitlab's
other tables follow the same rule: each is filled where it is defined (the recipes in :mod:`vitlab.train.recipes`,
the npz reader's backbones by :mod:`vitlab.checkpoints`'s own ``__init__``), and no module adds itself to another
module's table as a side effect of being imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import InvalidValueError
from .hybrid import HybridConfig, HybridVisionTransformer
from .resnetv2 import ResNetV2, ResNetV2Config
from .vit import VisionTransformer, ViTConfig


@dataclass(frozen=True)
class ModelFamily:
    """One model family: ``name`` (stored in checkpoints), the config class (with ``from_dict`` / ``to_dict``), the
    model class (built as ``model_class(config)``) and ``tokens``: whether its models cut images into patch tokens
    (ViTs and hybrids: a token grid ``cfg.grid_size``, prefix tokens, position embeddings, attention maps, inputs a
    multiple of the patch) or are convolutional networks that take any input size (BiT ResNet-v2: False)."""

    name: str
    config_class: type
    model_class: type
    tokens: bool = True


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily("vit", ViTConfig, VisionTransformer),
    ModelFamily("hybrid", HybridConfig, HybridVisionTransformer),  # a ViTConfig subclass: matched by exact type
    ModelFamily("resnetv2", ResNetV2Config, ResNetV2, tokens=False),
)}


def register_family(family: ModelFamily) -> None:
    """Add a model family defined outside vitlab, so that its models can be built from configs and saved in and
    loaded from the vitlab format. Registering the same entry again is accepted; another one under a taken name is
    not."""
    if family.name in FAMILIES and FAMILIES[family.name] != family:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family


def family_of(obj) -> ModelFamily | None:
    """The family whose config class or model class is exactly ``type(obj)`` (a config or a model), or None. A
    subclass must be a family itself: its config has fields the parent's cannot read back."""
    for family in FAMILIES.values():
        if type(obj) is family.config_class or type(obj) is family.model_class:
            return family
    return None


def has_tokens(cfg) -> bool:
    """Whether a model config (or model) of a registered family is a token model (ViT, hybrid: patch grid, prefix
    tokens, attention) rather than a CNN, as its family's ``tokens`` says."""
    family = family_of(cfg)
    if family is None:  # an unregistered class: judged by whether it has a token grid
        return hasattr(getattr(cfg, "cfg", cfg), "grid_size")
    return family.tokens


def model_from_config(cfg) -> nn.Module:
    """A freshly initialised model for a config of any family (``vitlab.load`` builds models from checkpoints)."""
    for family in FAMILIES.values():
        if type(cfg) is family.config_class:
            return family.model_class(cfg)
    raise TypeError(f"no model family for config type {type(cfg).__name__}")


def config_from_dict(data: dict, family: str = "vit"):
    """Rebuild a config saved with ``cfg.to_dict()`` under its family's name."""
    if family not in FAMILIES:
        raise InvalidValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family].config_class.from_dict(data)
