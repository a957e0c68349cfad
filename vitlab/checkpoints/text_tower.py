"""A checkpoint's text side as the readers return it (:mod:`vitlab.checkpoints.image_text` for transformers and
OpenCLIP files, :mod:`vitlab.checkpoints.big_vision_text` for big_vision ``.npz``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.text import TextConfig, TextTransformer
from .loading import construct_uninitialised, load_strict


@dataclass
class TextTower:
    """A checkpoint's text side: the tower's config and state dict (vitlab names), the logit scale (log) and bias,
    the layout it came from (``hf_clip``, ``hf_siglip``, ``open_clip``) and notes."""

    config: TextConfig
    state_dict: dict[str, torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None
    layout: str
    notes: list[str] = field(default_factory=list)
    gelu_image: str | None = None  # the image tower's GELU when the config says (OpenCLIP's quick_gelu)

    def build(self, source: str) -> TextTransformer:
        """The tower with these weights, loaded strictly (every missing / unexpected / mis-shaped key named)."""
        model = construct_uninitialised(TextTransformer, self.config)
        load_strict(model, self.state_dict, source)
        return model.eval()
