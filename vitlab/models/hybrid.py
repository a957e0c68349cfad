"""Hybrid ViTs (paper section 3.1, "Hybrid Architecture"): a BiT ResNet turns the image into a feature map and the
patch embedding E is applied to patches of that map instead of raw pixels.

R50+ViT-B/16 uses ResNet-50 with stage 4 removed and its blocks moved to stage 3, stages (3, 4, 9), output stride 16,
1x1 patches; R26+ViT-S/32 stages (2, 2, 2, 2), stride 32, 1x1 patches; R+ViT-Ti/16 the stem alone (stride 4) with
8x8 patches. The backbones are vit_jax's: post-activation bottlenecks, GroupNorm, weight-standardised convolutions
and TF "SAME" padding.

Parameter names follow timm (``patch_embed.backbone.stem.conv``, ``patch_embed.backbone.stages.{i}.blocks.{j}...``,
``patch_embed.proj``; a stem-only backbone is ``patch_embed.backbone.conv``), so timm state dicts load as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InvalidValueError
from .resnetv2 import ResNetStem, ResNetV2, ResNetV2Config
from .vit import VisionTransformer, ViTConfig

# the hybrid backbone of vit_jax: post-activation, "SAME" padding, no classifier
HYBRID_BACKBONE = ResNetV2Config(layers=(3, 4, 9), preact=False, padding="same", num_classes=0)


@dataclass(frozen=True)
class HybridConfig(ViTConfig):
    """A :class:`ViTConfig` whose patches are cut from a ResNet feature map.

    ``img_size`` and ``in_chans`` describe the image; the backbone's own ``img_size``, ``in_chans`` and
    ``num_classes`` follow them (its classifier is dropped). ``patch_size`` is measured on the feature map, so the
    token grid is ``img_size / (backbone.stride * patch_size)``. ``backbone`` may be given as a dict (as
    :meth:`to_dict` writes it).
    """

    backbone: ResNetV2Config = HYBRID_BACKBONE

    def __post_init__(self) -> None:
        super().__post_init__()
        backbone = self.backbone
        if isinstance(backbone, dict):
            backbone = ResNetV2Config.from_dict(backbone)
        if not isinstance(backbone, ResNetV2Config):
            raise InvalidValueError(f"backbone must be a ResNetV2Config or a dict, got {type(backbone).__name__}")
        backbone = backbone.replace(img_size=self.img_size, in_chans=self.in_chans, num_classes=0)
        object.__setattr__(self, "backbone", backbone)
        errors = []
        for size, patch, axis in zip(self.img_size, self.patch_size, ("height", "width")):
            if size % (backbone.stride * patch):
                errors.append(f"image {axis} {size} is not a multiple of backbone stride {backbone.stride} x patch "
                              f"{axis} {patch}")
        if errors:
            raise InvalidValueError("invalid hybrid config: " + "; ".join(errors))

    @property
    def feature_size(self) -> tuple[int, int]:
        """The backbone's output map (rows, columns)."""
        s = self.backbone.stride
        return (self.img_size[0] // s, self.img_size[1] // s)

    @property
    def reduction(self) -> tuple[int, int]:
        """Pixels per token: the backbone's stride times the patch size on its map."""
        s = self.backbone.stride
        return (s * self.patch_size[0], s * self.patch_size[1])

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) on the feature map."""
        fh, fw = self.feature_size
        return (fh // self.patch_size[0], fw // self.patch_size[1])

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; the backbone is a nested dict."""
        out = asdict(self)
        out.update(img_size=list(self.img_size), patch_size=list(self.patch_size), backbone=self.backbone.to_dict())
        return out


class HybridEmbed(nn.Module):
    """ResNet feature map, then a P x P convolution with stride P on it: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        bb = cfg.backbone
        self.backbone = ResNetV2(bb) if bb.layers else ResNetStem(bb)
        self.proj = nn.Conv2d(bb.num_features, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, ResNetV2):
            x = self.backbone.forward_features(x)  # (B, C', H / s, W / s)
        else:
            x = self.backbone(x)
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)


class HybridVisionTransformer(VisionTransformer):
    """A :class:`VisionTransformer` whose patch embedding is a :class:`HybridEmbed`; everything after the embedding
    (class token, position embeddings, encoder, head, attention maps) is the plain ViT's."""

    cfg: HybridConfig

    def __init__(self, cfg: HybridConfig):
        if not isinstance(cfg, HybridConfig):
            raise TypeError(f"HybridVisionTransformer needs a HybridConfig, got {type(cfg).__name__}")
        super().__init__(cfg)

    def build_patch_embed(self, cfg: ViTConfig) -> nn.Module:
        return HybridEmbed(cfg)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations of the encoder blocks and the backbone's blocks in the backward pass."""
        super().set_grad_checkpointing(enable)
        if isinstance(self.patch_embed.backbone, ResNetV2):
            self.patch_embed.backbone.set_grad_checkpointing(enable)
