"""Feature maps for dense heads (detection, segmentation, depth): a wrapper that turns a ViT, a hybrid or a BiT
ResNet into a backbone returning NCHW maps from chosen layers, with the ``feature_info`` that detection and
segmentation code reads (channels and stride of each output).

    backbone = FeatureExtractor(vitlab.create_model("vit_b16"), indices=(2, 5, 8, 11))
    maps = backbone(images)                    # 4 x (B, 768, H / 16, W / 16)
    backbone.feature_info.channels()           # [768, 768, 768, 768]
    backbone.feature_info.reduction()          # [16, 16, 16, 16]

A hybrid also offers its ResNet's maps (``backbone_indices``: 0 the stem, 1.. the stages, None all), each at its
own stride.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .hybrid import HybridVisionTransformer
from .resnetv2 import ResNetStem, ResNetV2
from .vit import ModelInputError, VisionTransformer, take_indices


class FeatureInfo(list):
    """One dict per output (``module``, ``num_chs``, ``reduction``), in output order, with timm's accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


def _backbone_features(backbone: nn.Module) -> list[tuple[dict, nn.Module]]:
    """The feature maps a hybrid's ResNet offers, each with the module whose output it is."""
    if isinstance(backbone, ResNetStem):
        stride = backbone.conv.stride[0]
        return [({"module": "norm", "num_chs": backbone.num_features, "reduction": stride}, backbone.norm)]
    modules = [backbone.stem.norm] + [stage.blocks[-1] for stage in backbone.stages]
    return list(zip(backbone.feature_info, modules))


class FeatureExtractor(nn.Module):
    """NCHW feature maps from chosen layers of ``model``.

    - ViT: ``indices`` are blocks (timm's meaning: None all, n the last n, a list, negative from the end); each map
      is (B, D, gh, gw) at the input's grid (``dynamic_img_size`` models: any input size). ``norm`` applies the final
      LayerNorm to each map.
    - Hybrid: the same for its blocks, plus ``backbone_indices`` over its ResNet's maps (0: the stem, 1..: stages).
    - BiT ResNet: ``indices`` over the stem and stage maps (``ResNetV2.forward_intermediates``).

    ``prune`` (default) drops what no output needs from ``model`` in place: the blocks after the last index, the head
    (and the final norm unless ``norm``). ``output="dict"`` returns {module name: map} instead of a list. The
    outputs' ``feature_info`` lists their ``module``, ``num_chs`` and ``reduction`` (stride in pixels), backbone
    maps first.
    """

    def __init__(self, model: nn.Module, indices: int | Sequence[int] | None = None, *,
                 backbone_indices: int | Sequence[int] | None = (), norm: bool = False, output: str = "list",
                 prune: bool = True):
        super().__init__()
        if output not in ("list", "dict"):
            raise ModelInputError(f"output must be 'list' or 'dict', got {output!r}")
        self.model, self.norm, self.output = model, norm, output
        self._hooks, self._captured = [], {}
        info = FeatureInfo()
        if isinstance(model, VisionTransformer):
            if backbone_indices != ():  # None: all of them (timm meaning)
                if not isinstance(model, HybridVisionTransformer):
                    raise ModelInputError("backbone_indices: only a hybrid ViT has a ResNet backbone")
                info += self._hook_backbone(model.patch_embed.backbone, backbone_indices)
            self.indices, _ = take_indices(len(model.blocks), indices)
            if prune:
                model.prune_intermediate_layers(self.indices, prune_norm=not norm, prune_head=True)
            blocks = model.feature_info
            info += [blocks[i] for i in self.indices]
        elif isinstance(model, ResNetV2):
            if backbone_indices != ():  # None: all of them (timm meaning)
                raise ModelInputError("backbone_indices: a ResNet's maps are its indices; use indices=")
            self.indices, _ = take_indices(len(model.feature_info), indices)
            info += [model.feature_info[i] for i in self.indices]
        else:
            raise ModelInputError(f"FeatureExtractor needs a vitlab ViT, hybrid or ResNetV2, got "
                                  f"{type(model).__name__}")
        self.feature_info = info

    def _hook_backbone(self, backbone: nn.Module, indices) -> list[dict]:
        offered = _backbone_features(backbone)
        taken, _ = take_indices(len(offered), indices)
        info = []
        for i in taken:
            entry, module = offered[i]
            name = f"patch_embed.backbone.{entry['module']}"
            info.append({**entry, "module": name})
            self._hooks.append(module.register_forward_hook(self._capture(name)))
        return info

    def _capture(self, name: str):
        def hook(module, inputs, output):
            self._captured[name] = output
        return hook

    def forward(self, x: torch.Tensor, dynamic_img_size: bool | None = None) -> list[torch.Tensor] | dict:
        self._captured = {}
        if isinstance(self.model, VisionTransformer):
            maps = self.model.forward_intermediates(x, self.indices, norm=self.norm, stop_early=True,
                                                    intermediates_only=True, dynamic_img_size=dynamic_img_size)
        else:
            maps = self.model.forward_intermediates(x, self.indices, norm=self.norm, stop_early=True,
                                                    intermediates_only=True)
        names = self.feature_info.module_name()
        maps = [self._captured[n] for n in names[: len(names) - len(maps)]] + list(maps)
        self._captured = {}
        return dict(zip(names, maps)) if self.output == "dict" else maps
