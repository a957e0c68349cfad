"""Checkpoints: vitlab's own self-describing format, and every ViT layout users bring (vit_jax and big_vision
``.npz``, timm, Hugging Face, torchvision), both directions, read safely.

Public API:

- :func:`save`: vitlab format out (``vitlab.save``); :func:`read_checkpoint` and :func:`model_from_checkpoint`: any
  format in (:func:`vitlab.load` composes them with the hub's names and this machine's CPU kernels).
- :func:`inspect_checkpoint`: what a file is, as plain data (``vitlab info``).
- :func:`convert`: any format in, any layout out, optionally at a new resolution / class count (``vitlab convert``).

This package reads files; it never resolves names (:mod:`vitlab.hub`) nor picks kernels (:mod:`vitlab.compute`):
:mod:`vitlab.factory` composes the three.
- :func:`resample_pos_embed`: position-embedding resampling to a new patch grid.
"""

from .adapter import save_adapter
from .export import (
    EXPORT_FORMATS,
    check_conversion,
    convert,
    convert_checkpoint,
    export,
    export_hf,
    export_npz,
    export_timm,
    export_torchvision,
)
from .files import sniff
from .hybrid_npz import VIT_JAX_HYBRID
from .inspection import describe_checkpoint, inspect_checkpoint
from .loading import (
    FORMATS,
    Checkpoint,
    CheckpointWarning,
    model_from_checkpoint,
    read_checkpoint,
    source_preprocessing,
)
from .npz import NpzBackbone, NpzRule, register_npz_backbone
from .resample import RESAMPLE_METHODS, resample_pos_embed
from .statedicts import from_hf, from_torchvision, to_hf, to_torchvision
from .vitlab_format import save

# vitlab's own npz backbones, in the order the npz reader tries them (ViT's own arrays need none); code outside
# vitlab adds its own with register_npz_backbone, as families are added with vitlab.models.register_family
register_npz_backbone(VIT_JAX_HYBRID)

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "RESAMPLE_METHODS",
    "Checkpoint",
    "CheckpointWarning",
    "NpzBackbone",
    "NpzRule",
    "check_conversion",
    "convert",
    "convert_checkpoint",
    "describe_checkpoint",
    "export",
    "export_hf",
    "export_npz",
    "export_timm",
    "export_torchvision",
    "from_hf",
    "from_torchvision",
    "inspect_checkpoint",
    "model_from_checkpoint",
    "read_checkpoint",
    "register_npz_backbone",
    "resample_pos_embed",
    "save",
    "save_adapter",
    "sniff",
    "source_preprocessing",
    "to_hf",
    "to_torchvision",
]
