"""What a checkpoint file is, as plain data: format, architecture, size, preprocessing, notable facts."""

from __future__ import annotations

import os
from pathlib import Path

from ..models import get_config, has_tokens, list_models
from .loading import Checkpoint, read_checkpoint, zeroed_head_note

_SIZE_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim")
FORMAT_TITLES = {
    "vitlab": "vitlab (safetensors + config)",
    "vit_jax": "vit_jax .npz (original / AugReg, pre-Linen names)",
    "big_vision": "big_vision .npz (Linen names)",
    "timm": "timm state dict",
    "hf": "Hugging Face ViT",
    "torchvision": "torchvision VisionTransformer state dict",
}


def _size_key(cfg) -> tuple:
    """What fixes a model's size: family, the ViT's size and patch, a hybrid's or ResNet's stages and width."""
    key: tuple = (type(cfg).__name__,)
    tokens = has_tokens(cfg)
    if tokens:
        key += tuple(getattr(cfg, f) for f in _SIZE_FIELDS)
    backbone = getattr(cfg, "backbone", None if tokens else cfg)
    if backbone is not None:
        key += (backbone.layers, backbone.width_factor, backbone.channels[:len(backbone.layers)])
    return key


def matching_model(cfg) -> str | None:
    """The registered short name with the same size and patch (resolution and head aside), if any."""
    wanted = _size_key(cfg)
    for name in list_models():
        if _size_key(get_config(name)) == wanted:
            return name
    return None


def inspect_checkpoint(path: str | os.PathLike, *, model_name: str | None = None, prefer_ema: bool = False) -> dict:
    """Read a checkpoint (any supported format) and describe it as JSON-ready data.

    Keys: path, format, format_title, container, file_bytes, model (matching registered name or None), architecture
    (the ViTConfig fields), grid, tokens, params, tensors, dtypes, num_classes, class_names (None or the list),
    preprocessing (dict) and preprocessing_source, facts (zeroed_head, pre_logits, pooling, npz details), metadata,
    notes. Raises :class:`~vitlab.errors.VitlabError` for files that cannot be loaded (the same checks as
    :func:`vitlab.load`). :func:`vitlab.inspect_checkpoint` takes checkpoint names too."""
    return describe_checkpoint(read_checkpoint(path, model_name=model_name, prefer_ema=prefer_ema))


def describe_checkpoint(ckpt: Checkpoint) -> dict:
    """A checkpoint already read, as :func:`inspect_checkpoint` describes it."""
    path = Path(ckpt.path)
    cfg = ckpt.config
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    else:
        size = path.stat().st_size
    facts = dict(ckpt.facts)
    facts["pooling"] = getattr(cfg, "pool", "avg")  # CNN baselines (BiT) average their last feature map
    facts["class_token"] = getattr(cfg, "class_token", False)
    facts["pre_logits"] = getattr(cfg, "representation_size", None)
    stored_pre = facts.pop("stored_preprocessing", False) or ckpt.format == "vitlab" or (
        ckpt.container == "hf-folder" and (path / "preprocessor_config.json").is_file())
    return {
        "path": str(path),
        "format": ckpt.format,
        "format_title": FORMAT_TITLES.get(ckpt.format, ckpt.format),
        "container": ckpt.container,
        "file_bytes": size,
        "model": matching_model(cfg),
        "architecture": cfg.to_dict(),
        # the options beyond the paper's ViT (registers, LayerScale, RoPE, a zero-shot head, ...)
        "options": cfg.family_options() if hasattr(cfg, "family_options") else {},
        "grid": list(cfg.grid_size) if has_tokens(cfg) else None,
        "tokens": cfg.num_patches + cfg.num_prefix_tokens if has_tokens(cfg) else None,
        "params": facts.pop("params"),
        "tensors": facts.pop("tensors"),
        "dtypes": facts.pop("dtypes"),
        "num_classes": cfg.num_classes,
        "class_names": ckpt.class_names,
        "preprocessing": ckpt.preprocessing.to_dict(),
        "preprocessing_source": "stored in the file" if stored_pre else
        f"given by its source, {facts['source']}" if facts.get("source") else f"default of the {ckpt.format} source",
        "facts": facts,
        "metadata": ckpt.metadata,
        "notes": list(ckpt.notes) + [n for n in [zeroed_head_note(ckpt)] if n],
    }
