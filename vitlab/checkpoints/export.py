"""Writing a vitlab model in other layouts (vit_jax ``.npz``, timm, Hugging Face, torchvision) and :func:`convert`.

Each writer checks first that the target can express the model (e.g. torchvision has no global-average pooling, HF
no pre-logits layer) and raises ValueError naming what does not fit, so that nothing is written that would compute
something else. Differences a layout cannot record (GELU flavour, LayerNorm epsilon) are returned as notes. Every
file and folder is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_directory, write_atomic
from ..errors import InvalidValueError, VitlabError
from ..models import has_tokens, metadata_of
from ..models.timm_args import eva02_export_problems
from ..preprocessing import Preprocessing
from .dinov3_layout import export_problems, to_timm_dinov3
from .eva02_layout import to_timm_eva02
from .family_layouts import to_transformers, transformers_class
from .files import write_json, write_safetensors
from .hybrid_npz import VIT_JAX_BACKBONE_NUMERICS, backbone_rules
from .loading import Checkpoint, model_from_checkpoint, read_checkpoint, zeroed_head_note
from .npz import to_npz_arrays
from .statedicts import to_hf, to_torchvision
from .vitlab_format import save

EXPORT_FORMATS = ("vitlab", "npz", "timm", "hf", "torchvision")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _require(problems: list[str], target: str) -> None:
    if problems:
        raise InvalidValueError(f"cannot write the {target} layout for this model: " + "; ".join(problems))


def _common_problems(cfg, target: str) -> list[str]:
    problems = []
    if cfg.pos_embed != "learned":
        problems.append(f"pos_embed={cfg.pos_embed!r} ({target} has learned 1D position embeddings only)")
    options = cfg.family_options() if target != "timm" else {}
    if options:
        problems.append(f"options the {target} ViT lacks: " + ", ".join(f"{k}={v!r}" for k, v in options.items()))
    return problems


def _numerics_notes(cfg, target: str, gelu: str, eps: float | None = 1e-6) -> list[str]:
    notes = []
    if cfg.gelu != gelu:
        notes.append(f"{target} computes {gelu} GELU but this model uses {cfg.gelu} GELU: outputs differ slightly "
                     f"(load it back with gelu={cfg.gelu!r} to reproduce them exactly)")
    if eps is not None and cfg.norm_eps != eps:
        notes.append(f"{target} uses LayerNorm eps {eps:g}, this model {cfg.norm_eps:g}")
    return notes


def _write_torch_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":

        write_atomic(path, lambda tmp: write_safetensors(state_dict, tmp, {"format": "pt"}))
    elif path.suffix in _TORCH_SUFFIXES:
        write_atomic(path, lambda tmp: torch.save(state_dict, tmp))
    else:
        raise InvalidValueError(f"{path}: use a name ending in .safetensors or one of {', '.join(_TORCH_SUFFIXES)}")


def export_npz(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Write the vit_jax ``.npz`` layout (float32, pre-Linen names), which vit_jax / timm's npz loader read.
    Returns notes."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InvalidValueError(f"{path}: use a name ending in .npz")
    cfg = model.cfg
    backbone = getattr(cfg, "backbone", None)  # a hybrid: its ResNet in vit_jax's conv_root / block{s}/unit{u} names
    extra = []
    notes = []
    if backbone is not None:
        if backbone.stem_kernel != 7 or not backbone.stem_pool or backbone.gn_groups != 32:
            raise InvalidValueError("cannot write the vit_jax .npz layout for this hybrid: vit_jax's ResNet has a "
                                    "7x7 stem with max-pool and GroupNorm(32)")
        extra = backbone_rules(tuple(backbone.layers))
        differs = {k: getattr(backbone, k) for k, v in VIT_JAX_BACKBONE_NUMERICS.items() if getattr(backbone, k) != v}
        if differs:
            notes.append("the backbone computes with " + ", ".join(f"{k}={v}" for k, v in differs.items())
                         + "; vit_jax uses " + ", ".join(f"{k}={v}" for k, v in VIT_JAX_BACKBONE_NUMERICS.items())
                         + " (vitlab reads the file back with vit_jax's)")
    arrays = to_npz_arrays(_state_dict(model), cfg, extra)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so that numpy does not append its own suffix
            np.savez(f, **arrays)

    write_atomic(path, write)
    return notes + _numerics_notes(cfg, "vit_jax (Flax nn.gelu)", "tanh")


def export_timm(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Write a timm ``VisionTransformer`` state dict (``.safetensors`` or ``torch.save`` by suffix); DINOv3
    (``pos_embed='rope'``): the state dict of timm's ``vit_*_dinov3`` port; EVA-02 (``rope_kind='eva'``): timm's
    ``eva02_*`` (Eva). Returns notes."""
    cfg = model.cfg
    if getattr(cfg, "rope_kind", None) == "eva":
        return _export_timm_eva02(model, Path(path))
    if cfg.pos_embed == "rope":
        return _export_timm_dinov3(model, Path(path))
    problems = _common_problems(cfg, "timm")
    if cfg.representation_size:
        problems.append("a pre-logits layer (timm's ViT has none; convert with drop_pre_logits and a new head)")
    if cfg.head_proj_dim or cfg.head_l2_norm:
        problems.append("a zero-shot head (projection / L2 norm; timm's ViT has none)")
    _require(problems, "timm")
    _write_torch_state_dict(_state_dict(model), Path(path))
    notes = _numerics_notes(cfg, "timm (default act_layer)", "exact")
    if cfg.pool == "gap":
        notes.append("create the timm model with global_pool='avg'" + (", fc_norm=False" if not
                     cfg.norm_after_pool else "") + ("" if cfg.class_token else ", class_token=False"))
    return notes


def _export_timm_dinov3(model: nn.Module, path: Path) -> list[str]:
    cfg = model.cfg
    _require(export_problems(cfg, "timm"), "timm DINOv3")
    _write_torch_state_dict(to_timm_dinov3(_state_dict(model), cfg), path)
    kind = "vit_*_dinov3_qkvb" if cfg.qkv_bias else "vit_*_dinov3"
    notes = [f"timm's DINOv3 port (Eva): create {kind} with embed_dim={cfg.embed_dim}, depth={cfg.depth}, "
             f"num_heads={cfg.num_heads}, num_reg_tokens={cfg.reg_tokens}"
             + (", global_pool='token'" if cfg.pool == "token" else "")]
    if cfg.rope_base != 100.0 or cfg.norm_eps != 1e-5:
        notes.append(f"this model uses rope_base {cfg.rope_base:g} and LayerNorm eps {cfg.norm_eps:g}; timm's DINOv3 "
                     "functions use 100 and 1e-5 (pass rope_temperature / norm_layer)")
    return notes


def _export_timm_eva02(model: nn.Module, path: Path) -> list[str]:
    cfg = model.cfg
    _require(eva02_export_problems(cfg), "timm EVA-02")
    _write_torch_state_dict(to_timm_eva02(_state_dict(model), cfg), path)
    fused = "" if cfg.mlp_norm else ", qkv_fused=True, scale_mlp=False"
    return [f"timm's EVA-02 (Eva): create an eva02_*_patch14_* model with embed_dim={cfg.embed_dim}, "
            f"depth={cfg.depth}, num_heads={cfg.num_heads}, mlp_ratio={cfg.mlp_dim / cfg.embed_dim!r}{fused}"
            + (", global_pool='token'" if cfg.pool == "token" else "")
            + ("" if cfg.norm_after_pool else ", use_fc_norm=False")]


def export_torchvision(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Write a torchvision ``VisionTransformer`` state dict (``vit_b_16``-style names). Returns notes."""
    cfg = model.cfg
    problems = _common_problems(cfg, "torchvision")
    if cfg.img_size[0] != cfg.img_size[1] or cfg.patch_size[0] != cfg.patch_size[1]:
        problems.append("a non-square image or patch (torchvision takes one image_size and one patch_size)")
    if cfg.pool != "token" or not cfg.class_token:
        problems.append("global-average pooling (torchvision's ViT reads the class token)")
    if cfg.num_classes == 0:
        problems.append("no head (torchvision's ViT always has heads.head)")
    if not cfg.qkv_bias:
        problems.append("qkv_bias=False")
    _require(problems, "torchvision")
    _write_torch_state_dict(to_torchvision(_state_dict(model)), Path(path))
    return _numerics_notes(cfg, "torchvision", "exact")


def hf_config(model: nn.Module, class_names: list[str] | None = None) -> dict:
    """The ``config.json`` of a transformers ``ViTForImageClassification`` with this architecture."""
    cfg = model.cfg
    names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]

    def size(pair):
        return pair[0] if pair[0] == pair[1] else list(pair)

    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu" if cfg.gelu == "exact" else "gelu_pytorch_tanh",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "image_size": size(cfg.img_size),
        "patch_size": size(cfg.patch_size),
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "encoder_stride": cfg.patch_size[0],
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def hf_preprocessor_config(pre: Preprocessing) -> dict:
    """``preprocessor_config.json`` for transformers' ``ViTImageProcessor`` (it squashes; a crop policy is noted)."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": pre.img_size[0], "width": pre.img_size[1]},
        "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3}[pre.interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
    }


def export_hf(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Write a Hugging Face model folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) that
    ``ViTForImageClassification.from_pretrained`` reads. Returns notes."""

    cfg = model.cfg
    if transformers_class(cfg) is not None:  # DINOv2, DeiT (distilled), SigLIP, CLIP: their own classes
        return _export_hf_family(model, Path(folder))
    problems = _common_problems(cfg, "Hugging Face")
    if cfg.pool != "token" or not cfg.class_token:
        problems.append("global-average pooling (HF's ViT classifies the class token)")
    if cfg.representation_size:
        problems.append("a pre-logits layer (ViTForImageClassification has none; convert with drop_pre_logits and "
                        "a new head)")
    if cfg.num_classes == 0:
        problems.append("no head (ViTForImageClassification needs a classifier)")
    _require(problems, "Hugging Face")
    meta = metadata_of(model)
    class_names, pre = meta.class_names, meta.preprocessing
    tensors = to_hf(_state_dict(model))
    notes = []
    if pre.resize == "crop":
        notes.append(f"HF's ViTImageProcessor squashes to the model size; the model's crop policy (crop_pct "
                     f"{pre.crop_pct:g}) is not expressible there")
    with atomic_directory(folder) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors", {"format": "pt"})
        write_json(tmp / "config.json", hf_config(model, class_names))
        write_json(tmp / "preprocessor_config.json", hf_preprocessor_config(pre))
    return notes


def _export_hf_family(model: nn.Module, folder: Path) -> list[str]:
    """A DINOv2 / DeiT / SigLIP / CLIP model as the transformers class that computes it (see
    :func:`.family_layouts.transformers_class`)."""
    cfg = model.cfg
    meta = metadata_of(model)
    pre = meta.preprocessing
    tensors, config = to_transformers(_state_dict(model), cfg, meta.class_names)
    notes = [f"written as transformers {config['architectures'][0]}"]
    if pre.resize == "crop":
        notes.append(f"preprocessor_config.json squashes to the model size; the model's crop policy (crop_pct "
                     f"{pre.crop_pct:g}) is not expressible there")
    with atomic_directory(folder) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors", {"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "preprocessor_config.json", hf_preprocessor_config(pre))
    return notes


def export(model: nn.Module, dst: str | os.PathLike, to: str, *, metadata: dict | None = None) -> list[str]:
    """Write ``model`` to ``dst`` in layout ``to`` (one of vitlab, npz, timm, hf, torchvision). Returns notes."""
    if to == "vitlab":
        save(model, dst, metadata=metadata)
        return []
    writers = {"npz": export_npz, "timm": export_timm, "hf": export_hf, "torchvision": export_torchvision}
    if to not in writers:
        raise InvalidValueError(f"unknown target format {to!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not has_tokens(model.cfg):  # the writers are ViT key maps; a BiT's names already are timm's resnetv2 ones
        raise InvalidValueError(f"cannot write the {to} layout for a {type(model).__name__} (a convolutional "
                                "model): convert it --to vitlab, whose tensors carry timm's resnetv2 names")
    return writers[to](model, dst)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, img_size=None, num_classes: int | None = None,
            model_name: str | None = None, resample: str | None = None, drop_pre_logits: bool = False,
            gelu: str | None = None, prefer_ema: bool = False, patch_size=None) -> dict:
    """Read ``src`` (any supported format), optionally change resolution / class count, write ``dst`` in layout ``to``.

    Returns a summary dict (source format, target, config, parameter count, notes). Nothing is written unless the
    whole conversion succeeds. :func:`vitlab.convert` takes checkpoint names too."""
    check_conversion(src, dst, to)
    ckpt = read_checkpoint(src, model_name=model_name, prefer_ema=prefer_ema)
    return convert_checkpoint(ckpt, src, dst, to=to, img_size=img_size, num_classes=num_classes,
                              model_name=model_name, resample=resample, drop_pre_logits=drop_pre_logits, gelu=gelu,
                              patch_size=patch_size)


def check_conversion(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> None:
    """Refuse an unknown target format or a destination that is the source, before anything is read."""
    if to not in EXPORT_FORMATS:
        raise InvalidValueError(f"unknown target format {to!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if Path(src).resolve() == Path(dst).resolve():
        raise VitlabError(f"{dst}: the destination is the source file")


def convert_checkpoint(ckpt: Checkpoint, src: str | os.PathLike, dst: str | os.PathLike, *, to: str, img_size=None,
                       num_classes: int | None = None, model_name: str | None = None, resample: str | None = None,
                       drop_pre_logits: bool = False, gelu: str | None = None, patch_size=None) -> dict:
    """:func:`convert` of a checkpoint already read from ``src`` (after :func:`check_conversion`)."""
    src, dst = Path(src), Path(dst)
    model = model_from_checkpoint(ckpt, model_name=model_name, img_size=img_size, num_classes=num_classes,
                                  resample=resample, drop_pre_logits=drop_pre_logits, gelu=gelu,
                                  patch_size=patch_size)
    metadata = dict(ckpt.metadata)
    metadata.setdefault("converted_from", {"path": src.name, "format": ckpt.format})
    notes = export(model, dst, to, metadata=metadata)
    new_head = (model.cfg.num_classes != ckpt.config.num_classes  # (a BiT config has no pre-logits field)
                or getattr(model.cfg, "representation_size", None) != getattr(ckpt.config, "representation_size",
                                                                              None))
    head_note = None if new_head else zeroed_head_note(ckpt)
    return {
        "src": str(src),
        "dst": str(dst),
        "from": ckpt.format,
        "to": to,
        "config": model.cfg.to_dict(),
        "params": model.num_params(),
        "resampled": tuple(model.cfg.grid_size if has_tokens(model.cfg) else model.cfg.img_size)
        != tuple(ckpt.config.grid_size if has_tokens(ckpt.config) else ckpt.config.img_size),
        "new_head": new_head,
        "notes": ckpt.notes + notes + ([head_note] if head_note else []),
    }
