"""The layouts DINOv2, DeiT, SigLIP and CLIP image towers are published in, mapped onto timm's (= vitlab's) names
(DINOv3's three layouts: :mod:`.dinov3_layout`; EVA-02's two: :mod:`.eva02_layout`).

Each reader is a pure function from the publisher's state dict to timm names, plus notes on what was dropped (a text
tower, DINOv2's ``mask_token``); :func:`to_timm_names` picks it from :func:`detect_family_layout`. The writers
(:func:`to_transformers`) go back to transformers' on-disk names with the ``config.json`` that rebuilds the model.

=========================  ===========================================  ============================================
vitlab / timm              transformers (on disk)                       original release
=========================  ===========================================  ============================================
cls_token                  ``embeddings.cls_token`` (DINOv2, DeiT),     ``cls_token`` (DINOv2), ``visual.class_
                           ``embeddings.class_embedding`` (CLIP, (D,))  embedding`` (OpenAI / OpenCLIP, (D,))
reg_token                  ``embeddings.register_tokens``               ``register_tokens`` (DINOv2)
dist_token                 ``embeddings.distillation_token`` (DeiT)     ``dist_token`` (DeiT ``.pth``: timm names)
pos_embed                  ``embeddings.position_embeddings`` /         ``pos_embed`` / ``visual.positional_
                           ``embeddings.position_embedding.weight``     embedding``
patch_embed.proj           ``embeddings.patch_embeddings.projection`` / ``patch_embed.proj`` / ``visual.conv1``
                           ``embeddings.patch_embedding``
norm_pre                   ``pre_layrnorm`` (CLIP; sic)                 ``visual.ln_pre``
blocks.{i}.attn.qkv        ``...{query,key,value}`` / ``self_attn.      ``visual.transformer.resblocks.{i}.attn.
                           {q,k,v}_proj`` (fused, q rows first)         in_proj_{weight,bias}``
blocks.{i}.ls1.gamma       ``encoder.layer.{i}.layer_scale1.lambda1``   ``blocks.{i}.ls1.gamma`` (DINOv2),
                                                                        ``blocks.{i}.gamma_1`` (DeiT III)
blocks.{i}.mlp.fc1 / fc2   ``mlp.fc1`` / ``mlp.weights_in`` (SwiGLU)    ``mlp.w12`` / ``mlp.w3`` (DINOv2 SwiGLU),
                                                                        ``mlp.c_fc`` / ``mlp.c_proj`` (CLIP)
norm                       ``layernorm`` / ``post_layernorm``           ``norm`` / ``visual.ln_post``
attn_pool.*                ``head.{probe,attention,layernorm,mlp}``     big_vision ``MAPHead_0`` (see npz.py)
head / head_dist           ``classifier``, ``cls_classifier`` /         ``head`` / ``head_dist``; CLIP
                           ``distillation_classifier``;                 ``visual.proj`` (D, P), transposed
                           ``visual_projection`` (CLIP, no bias)
=========================  ===========================================  ============================================

DINOv2 with registers stores a class slot in its position embedding and adds it to the class token before the
registers are inserted; timm (and vitlab) fold that slot into ``cls_token`` and keep the embedding for the patches
only, which computes the same (timm's ``_convert_dinov2`` does the same). CLIP's projection has no bias: it becomes a
``head`` with a zero bias, as in timm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import InvalidValueError, VitlabError
from .dinov3_layout import (
    DINOV3_LAYOUTS,
    DINOV3_NUMERICS,
    detect_dinov3_layout,
    export_problems,
    from_dinov3,
    from_hf_dinov3,
    from_timm_dinov3,
    hf_dinov3_hints,
    to_hf_dinov3,
)
from .eva02_layout import EVA02_LAYOUTS, EVA02_NUMERICS, detect_eva02_layout, from_eva02, from_timm_eva02
from .statedicts import HF_QKV, HF_TO, HF_VIT_LAYER, QKV_TARGET, fuse_qkv, rename_keys, split_qkv

# transformers' model types read here, and the vision-config fields they nest (full SigLIP / CLIP models)
HF_FAMILY_TYPES = {"dinov2": "hf_dinov2", "dinov2_with_registers": "hf_dinov2", "deit": "hf_deit",
                   "siglip": "hf_siglip", "siglip_vision_model": "hf_siglip", "clip": "hf_clip",
                   "clip_vision_model": "hf_clip", "dinov3_vit": "hf_dinov3"}
FAMILY_LAYOUTS = ("hf_dinov2", "hf_deit", "hf_siglip", "hf_clip", "dinov2", "deit3", "open_clip") + DINOV3_LAYOUTS \
    + EVA02_LAYOUTS
# transformers' hidden_act -> vitlab's gelu field
HF_ACTIVATIONS = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh",
                  "quick_gelu": "quick"}
# what each source's code computes that the weights cannot show: GELU flavour and LayerNorm epsilon
FAMILY_NUMERICS = {
    "dinov2": {"gelu": "exact", "norm_eps": 1e-6},  # dinov2/models/vision_transformer.py: nn.GELU, eps 1e-6
    "deit3": {"gelu": "exact", "norm_eps": 1e-6},  # DeiT III is built on timm's layers
    "open_clip": {"gelu": "quick", "norm_eps": 1e-5},  # OpenAI's release; OpenCLIP's LAION towers use exact GELU
    # bare transformers weights without their config.json: the config classes' defaults
    "hf_dinov2": {"gelu": "exact", "norm_eps": 1e-6},
    "hf_deit": {"gelu": "exact", "norm_eps": 1e-12},
    "hf_siglip": {"gelu": "tanh", "norm_eps": 1e-6},
    "hf_clip": {"gelu": "quick", "norm_eps": 1e-5},
    **{layout: DINOV3_NUMERICS for layout in DINOV3_LAYOUTS},
    **{layout: EVA02_NUMERICS for layout in EVA02_LAYOUTS},
}


# ------------------------------------------------------------------------------------------------- detection
def detect_family_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The family layout of a state dict from its signature keys (one of :data:`FAMILY_LAYOUTS`), or None for the
    layouts :func:`vitlab.checkpoints.statedicts.detect_layout` already knows (timm, plain HF ViT, torchvision)."""
    keys = set(state_dict)
    dinov3 = detect_dinov3_layout(keys)  # first: its files also have DINOv2's mask_token and DeiT III's gamma_1
    if dinov3 is not None:
        return dinov3
    eva02 = detect_eva02_layout(keys)  # before DINOv2: BAAI's files have its mask_token and (Ti, S) mlp.w12
    if eva02 is not None:
        return eva02
    if {"visual.class_embedding", "visual.conv1.weight"} & keys:
        return "open_clip"
    for prefix in ("vision_model.", ""):
        if f"{prefix}embeddings.class_embedding" in keys:
            return "hf_clip"
        if f"{prefix}embeddings.patch_embedding.weight" in keys:
            return "hf_siglip"
    if {"deit.embeddings.distillation_token", "embeddings.distillation_token"} & keys:
        return "hf_deit"
    for prefix in ("dinov2.", ""):
        if f"{prefix}embeddings.mask_token" in keys or f"{prefix}encoder.layer.0.layer_scale1.lambda1" in keys:
            return "hf_dinov2"
    if "patch_embed.proj.weight" in keys:
        if {"mask_token", "register_tokens"} & keys or any(re.match(r"blocks\.\d+\.(\d+\.)?mlp\.w12\.", k)
                                                           for k in keys):
            return "dinov2"
        if any(re.match(r"blocks\.\d+\.(\d+\.)?ls1\.gamma$", k) for k in keys) and "reg_token" not in keys \
                and any(re.match(r"blocks\.\d+\.\d+\.", k) for k in keys):
            return "dinov2"  # a DINOv2 training checkpoint: blocks in chunks (blocks.{chunk}.{i}.)
        if any(re.match(r"blocks\.\d+\.gamma_[12]$", k) for k in keys):
            return "deit3"
    return None


# ------------------------------------------------------------------------------------------------- helpers
def _split_off(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...],
               what: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the keys under ``prefixes`` (another tower, training-only tensors) and say so in a note."""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    dropped = len(state_dict) - len(kept)
    return kept, ([f"{dropped} tensor{'s' if dropped > 1 else ''} of the {what} ignored"] if dropped else [])


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _fold_class_slot(sd: dict[str, torch.Tensor]) -> None:
    """DINOv2 with registers: the position embedding's class slot is constant, so it is added to the class token and
    the embedding keeps the patches only (the registers never had a position)."""
    pos = sd["pos_embed"]
    sd["cls_token"] = sd["cls_token"] + pos[:, :1]
    sd["pos_embed"] = pos[:, 1:]


# ------------------------------------------------------------------------------------------------- transformers
_HF_EMBED = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_HF_DINOV2_LAYER = [
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(?:fc1|weights_in)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.(?:fc2|weights_out)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]
_HF_TOWER = [  # SigLIP and CLIP vision towers (CLIP-style encoder names)
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
    (r"head\.probe", "attn_pool.latent"),
    (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
    (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
    (r"head\.mlp\.fc([12])\.(weight|bias)", r"attn_pool.mlp.fc\1.\2"),
]
_TOWER_QKV = r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)"


def from_hf_dinov2(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> timm names."""
    sd, notes = _split_off(_strip(state_dict, "dinov2."), ("embeddings.mask_token",),
                           "masked-image training (mask_token)")
    if "classifier.weight" in sd:
        raise VitlabError(f"{source}: a Dinov2ForImageClassification head (it reads the class token next to the mean "
                          "patch token) has no vitlab equivalent; load the backbone alone (Dinov2Model)")
    sd = rename_keys(fuse_qkv(sd, HF_QKV, ("query", "key", "value"), QKV_TARGET, source),
                     _HF_DINOV2_LAYER + _HF_EMBED)
    if "reg_token" in sd:
        _fold_class_slot(sd)
    return sd, notes


def from_hf_deit(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ``DeiTForImageClassificationWithTeacher`` / ``DeiTForImageClassification`` / ``DeiTModel`` ->
    timm's distilled names (``dist_token``, ``head``, ``head_dist``).

    ``DeiTForImageClassification`` keeps the distillation token but classifies the class token alone; vitlab's
    distilled model averages the two heads, so its head is the classifier doubled and its distillation head zero,
    which gives the same logits."""
    sd, notes = _split_off(_strip(state_dict, "deit."), ("pooler.",), "pooler (unused by the classifiers)")
    if "classifier.weight" in sd:
        weight, bias = sd.pop("classifier.weight"), sd.pop("classifier.bias")
        sd.update({"head.weight": 2 * weight, "head.bias": 2 * bias, "head_dist.weight": torch.zeros_like(weight),
                   "head_dist.bias": torch.zeros_like(bias)})
        notes.append("DeiTForImageClassification classifies the class token alone: loaded as a distilled model "
                     "whose head is the classifier x2 and whose distillation head is zero (same logits)")
    sd = rename_keys(sd, [(r"cls_classifier\.(weight|bias)", r"head.\1"),
                      (r"distillation_classifier\.(weight|bias)", r"head_dist.\1")])
    sd = rename_keys(fuse_qkv(sd, HF_QKV, ("query", "key", "value"), QKV_TARGET, source), HF_VIT_LAYER + _HF_EMBED)
    return sd, notes


def from_hf_tower(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ``SiglipVisionModel`` / ``CLIPVisionModel(WithProjection)``, or the vision tower of a full
    ``SiglipModel`` / ``CLIPModel`` -> timm names (SigLIP's ``map`` head as ``attn_pool``, CLIP's projection as
    ``head``)."""
    sd, notes = _split_off(state_dict, ("text_model.", "text_projection.", "logit_scale", "logit_bias"),
                           "text tower")
    sd = _strip(sd, "vision_model.")
    sd.pop("embeddings.position_ids", None)  # transformers < 4.31 saved this index buffer (an arange) with the weights
    if "classifier.weight" in sd:
        raise VitlabError(f"{source}: an image-classification head on a SigLIP / CLIP tower (it averages the patch "
                          "tokens) is not read by vitlab; load the vision tower alone")
    if "embeddings.class_embedding" in sd:
        sd["cls_token"] = sd.pop("embeddings.class_embedding").reshape(1, 1, -1)
    if "embeddings.position_embedding.weight" in sd:
        sd["pos_embed"] = sd.pop("embeddings.position_embedding.weight").unsqueeze(0)
    if "visual_projection.weight" in sd:
        weight = sd.pop("visual_projection.weight")
        sd["head.weight"], sd["head.bias"] = weight, weight.new_zeros(weight.shape[0])
    for kind in ("weight", "bias"):
        fused = sd.pop(f"head.attention.in_proj_{kind}", None)
        if fused is not None:  # nn.MultiheadAttention's in_proj: the query of the probe, key and value of the tokens
            dim = fused.shape[0] // 3
            sd[f"attn_pool.q.{kind}"], sd[f"attn_pool.kv.{kind}"] = fused[:dim], fused[dim:]
    sd = rename_keys(fuse_qkv(sd, _TOWER_QKV, ("q", "k", "v"), QKV_TARGET, source), _HF_TOWER)
    return sd, notes


# ------------------------------------------------------------------------------------------------- original releases
def open_clip_block_rules(prefix: str) -> list[tuple[str, str]]:
    """OpenAI CLIP / OpenCLIP residual blocks under ``prefix`` (``visual.transformer`` for the image tower,
    ``transformer`` for the text tower) -> vitlab's ``blocks.{i}.*`` names, as (pattern, replacement) rules."""
    p = re.escape(prefix) + r"\.resblocks\.(\d+)"
    return [(p + r"\.ln_([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
            (p + r"\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
            (p + r"\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
            (p + r"\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
            (p + r"\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2")]


_OPEN_CLIP = [
    (r"visual\.conv1\.weight", "patch_embed.proj.weight"),
    (r"visual\.ln_pre\.(weight|bias)", r"norm_pre.\1"),
    *open_clip_block_rules("visual.transformer"),
    (r"visual\.ln_post\.(weight|bias)", r"norm.\1"),
]


def from_open_clip(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An OpenAI CLIP / OpenCLIP state dict (``visual.conv1``, ``visual.class_embedding``, ...) -> the image tower in
    timm names; the text tower is ignored. ``visual.proj`` (D, P) becomes ``head`` (P, D) with a zero bias."""
    visual = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    notes = [f"{len(state_dict) - len(visual)} tensors of the text tower ignored"] if len(visual) < len(state_dict) \
        else []
    sd = dict(visual)
    if "visual.class_embedding" in sd:
        sd["cls_token"] = sd.pop("visual.class_embedding").reshape(1, 1, -1)
    if "visual.positional_embedding" in sd:
        sd["pos_embed"] = sd.pop("visual.positional_embedding").unsqueeze(0)
    if "visual.proj" in sd:
        proj = sd.pop("visual.proj")
        sd["head.weight"], sd["head.bias"] = proj.t().contiguous(), proj.new_zeros(proj.shape[1])
    return rename_keys(sd, _OPEN_CLIP), notes


def from_dinov2(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A DINOv2 release (torch.hub ``dinov2_vits14[_reg]`` ``.pth``: ``cls_token``, ``register_tokens``,
    ``mask_token``, ``blocks.{i}.ls1.gamma``, SwiGLU ``mlp.w12`` / ``mlp.w3``; training checkpoints chunk the blocks
    as ``blocks.{chunk}.{i}.``) -> timm names."""
    sd, notes = _split_off(state_dict, ("mask_token",), "masked-image training (mask_token)")
    sd = rename_keys(sd, [(r"blocks\.\d+\.(\d+)\.(.*)", r"blocks.\1.\2")] if any(
        re.match(r"blocks\.\d+\.\d+\.", k) for k in sd) else [])
    sd = rename_keys(sd, [(r"register_tokens", "reg_token"),
                      (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
                      (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2")])
    if "reg_token" in sd:
        _fold_class_slot(sd)
    return sd, notes


def from_deit3(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A DeiT III release (``blocks.{i}.gamma_1`` / ``gamma_2``, otherwise timm names) -> timm names."""
    return rename_keys(state_dict, [(r"blocks\.(\d+)\.gamma_([12])", r"blocks.\1.ls\2.gamma")]), []


_READERS = {"hf_dinov2": from_hf_dinov2, "hf_deit": from_hf_deit, "hf_siglip": from_hf_tower,
            "hf_clip": from_hf_tower, "open_clip": from_open_clip, "dinov2": from_dinov2, "deit3": from_deit3,
            "dinov3": from_dinov3, "timm_dinov3": from_timm_dinov3, "hf_dinov3": from_hf_dinov3,
            "eva02": from_eva02, "timm_eva02": from_timm_eva02}


def to_timm_names(state_dict: Mapping[str, torch.Tensor], layout: str,
                  source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict in one of :data:`FAMILY_LAYOUTS` -> timm (= vitlab) names. Returns (state dict, notes)."""
    if layout not in _READERS:
        raise InvalidValueError(f"unknown family layout {layout!r}; choose one of {', '.join(FAMILY_LAYOUTS)}")
    return _READERS[layout](dict(state_dict), source)


# ------------------------------------------------------------------------------------------------- HF config.json
def hf_vision_config(hf: dict, source: str) -> tuple[str, dict]:
    """(family layout, the vision part of a transformers ``config.json``): a full SigLIP / CLIP model nests it under
    ``vision_config``; CLIP's ``projection_dim`` sits at the top there."""
    model_type = hf.get("model_type")
    layout = HF_FAMILY_TYPES.get(model_type)
    if layout is None:
        raise VitlabError(f"{source}: model_type {model_type!r} is not one vitlab reads")
    if model_type in ("siglip", "clip"):
        vision = hf.get("vision_config")
        if not isinstance(vision, dict):
            raise VitlabError(f"{source}: a {model_type!r} config without a vision_config object")
        vision = dict(vision)
        if model_type == "clip" and "projection_dim" in hf:
            vision["projection_dim"] = hf["projection_dim"]
        return layout, vision
    return layout, dict(hf)


def hf_hints(vision: dict, source: str) -> dict:
    """The ViTConfig fields a transformers vision config fixes that the weights cannot show (heads, LayerNorm
    epsilon, GELU flavour), and the image and patch size (for the token grid)."""
    if vision.get("model_type") == "dinov3_vit":
        return hf_dinov3_hints(vision, source)
    act = vision.get("hidden_act", "gelu")
    gelu = HF_ACTIVATIONS.get(act)
    if gelu is None:
        raise VitlabError(f"{source}: hidden_act {act!r} is not one vitlab computes ({', '.join(HF_ACTIVATIONS)})")

    def pair(value):
        return (value, value) if isinstance(value, int) else tuple(value)

    return {"num_heads": int(vision.get("num_attention_heads", 12)),
            "norm_eps": float(vision.get("layer_norm_eps", 1e-12)), "gelu": gelu,
            "img_size": pair(vision.get("image_size", 224)), "patch_size": pair(vision.get("patch_size", 16))}


# ------------------------------------------------------------------------------------------------- writing transformers
_GELU_TO_HF = {"exact": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}


def transformers_class(cfg) -> str | None:
    """The transformers class that holds a model with these options (None: the paper's ViT, written as
    ``ViTForImageClassification``). Raises InvalidValueError for option sets no transformers class computes."""
    if getattr(cfg, "rope_kind", None) == "eva" or getattr(cfg, "mlp_norm", False):
        raise InvalidValueError("cannot write a transformers layout for this model: transformers has no EVA-02 "
                                "(rope_kind='eva', mlp_norm); use the timm or vitlab layout")
    if getattr(cfg, "pos_embed", None) == "rope":
        problems = export_problems(cfg, "transformers")
        if problems:
            raise InvalidValueError("cannot write the transformers DINOv3ViTModel layout for this model: "
                                    + "; ".join(problems))
        return "DINOv3ViTModel"
    pool, pre_norm = getattr(cfg, "pool", "token"), getattr(cfg, "pre_norm", False)
    distilled, layer_scale = getattr(cfg, "distilled", False), getattr(cfg, "layer_scale", None)
    regs, patch_only = getattr(cfg, "reg_tokens", 0), getattr(cfg, "no_embed_class", False)
    swiglu = getattr(cfg, "mlp_type", "mlp") == "swiglu"
    problems = []
    if pool == "map":
        name = "SiglipVisionModel"
        if cfg.class_token or regs or distilled or pre_norm or layer_scale or swiglu:
            problems.append("SiglipVisionModel has no class, register or distillation token, ln_pre, LayerScale or "
                            "SwiGLU")
        if cfg.num_classes:
            problems.append("SiglipVisionModel has no classifier (num_classes must be 0)")
    elif pre_norm:
        name = "CLIPVisionModelWithProjection" if cfg.num_classes else "CLIPVisionModel"
        if not cfg.class_token or regs or distilled or layer_scale or swiglu or patch_only:
            problems.append("CLIP's vision tower has a class token with a position, and no registers, distillation "
                            "token, LayerScale or SwiGLU")
        if getattr(cfg, "patch_bias", True):
            problems.append("CLIP's patch embedding has no bias (patch_bias must be False)")
    elif distilled:
        name = "DeiTForImageClassificationWithTeacher"
        if layer_scale or regs or patch_only or swiglu or not cfg.num_classes:
            problems.append("DeiT in transformers has no LayerScale, registers, SwiGLU, patch-only position "
                            "embedding, and needs a classifier")
    elif layer_scale:
        name = "Dinov2WithRegistersModel" if regs else "Dinov2Model"
        if cfg.num_classes:
            problems.append(f"{name} has no classifier (num_classes must be 0; transformers has no DeiT III)")
    else:
        return None
    if cfg.pos_embed != "learned" or getattr(cfg, "representation_size", None) or cfg.pool == "gap":
        problems.append("transformers' towers have a learned 1D position embedding, no pre-logits layer and no "
                        "global-average pooling")
    if problems:
        raise InvalidValueError(f"cannot write the transformers {name} layout for this model: " + "; ".join(problems))
    return name


def _class_slot(sd: dict[str, torch.Tensor]) -> None:
    """A patch-only position embedding gets a zero row for the class token (which already holds its position)."""
    pos = sd["pos_embed"]
    sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)


def _common_hf(cfg) -> dict:
    size = cfg.img_size[0] if cfg.img_size[0] == cfg.img_size[1] else list(cfg.img_size)
    patch = cfg.patch_size[0] if cfg.patch_size[0] == cfg.patch_size[1] else list(cfg.patch_size)
    return {"hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "hidden_act": _GELU_TO_HF[cfg.gelu], "layer_norm_eps": cfg.norm_eps, "image_size": size,
            "patch_size": patch, "num_channels": cfg.in_chans}


def to_transformers(state_dict: Mapping[str, torch.Tensor], cfg, class_names: list[str] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """A vitlab (= timm) state dict of a DINOv2 / DeiT / SigLIP / CLIP model -> (transformers on-disk tensors,
    ``config.json``), for the class :func:`transformers_class` names."""
    name = transformers_class(cfg)
    if name == "DINOv3ViTModel":
        return to_hf_dinov3(state_dict, cfg)
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    common = _common_hf(cfg)
    if name.startswith("Dinov2"):
        if getattr(cfg, "no_embed_class", False):
            _class_slot(sd)
        sd = split_qkv(sd, "encoder.layer.{block}.attention.attention.{which}.{kind}", ("query", "key", "value"))
        rules = [(r"cls_token", "embeddings.cls_token"), (r"reg_token", "embeddings.register_tokens"),
                 (r"pos_embed", "embeddings.position_embeddings"),
                 (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
                 (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layer.\1.norm\2.\3"),
                 (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
                 (r"blocks\.(\d+)\.ls([12])\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
                 (r"norm\.(weight|bias)", r"layernorm.\1")]
        swiglu = cfg.mlp_type == "swiglu"
        mlp = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
        rules += [(rf"blocks\.(\d+)\.mlp\.fc{i + 1}\.(weight|bias)", rf"encoder.layer.\1.mlp.{n}.\2")
                  for i, n in enumerate(mlp)]
        tensors = rename_keys(sd, rules)
        tensors["embeddings.mask_token"] = torch.zeros(1, cfg.embed_dim)  # only used for masked-image training
        ratio = cfg.mlp_dim / cfg.embed_dim
        ratio = int(ratio) if ratio == int(ratio) else ratio  # transformers' Dinov2Config types it as an int
        if swiglu:  # transformers derives the gated width as round(2/3 * D * mlp_ratio) up to a multiple of 8
            ratio = next((r for r in (4, cfg.mlp_dim * 1.5 / cfg.embed_dim)
                          if (int(int(cfg.embed_dim * r) * 2 / 3) + 7) // 8 * 8 == cfg.mlp_dim), None)
            if ratio is None:
                raise InvalidValueError(f"cannot write the transformers {name} layout: no mlp_ratio gives the "
                                        f"SwiGLU width {cfg.mlp_dim}")
        config = {**common, "architectures": [name], "mlp_ratio": ratio, "layerscale_value": cfg.layer_scale,
                  "use_swiglu_ffn": swiglu, "qkv_bias": cfg.qkv_bias, "drop_path_rate": 0.0,
                  "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                  "model_type": "dinov2_with_registers" if cfg.reg_tokens else "dinov2"}
        if cfg.reg_tokens:
            config["num_register_tokens"] = cfg.reg_tokens
        return tensors, config
    if name.startswith("DeiT"):
        sd = split_qkv(sd, "deit.encoder.layer.{block}.attention.attention.{which}.{kind}", ("query", "key", "value"))
        # ViT's names under ``deit.``, plus the distillation token and DeiT's two classifiers
        rules = [(p, r.replace("vit.", "deit.", 1)) for p, r in HF_TO if not p.startswith("head")] + [
            (r"dist_token", "deit.embeddings.distillation_token"), (r"head\.(weight|bias)", r"cls_classifier.\1"),
            (r"head_dist\.(weight|bias)", r"distillation_classifier.\1")]
        names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
        config = {**common, "architectures": [name], "model_type": "deit", "intermediate_size": cfg.mlp_dim,
                  "qkv_bias": cfg.qkv_bias, "encoder_stride": cfg.patch_size[0], "hidden_dropout_prob": 0.0,
                  "attention_probs_dropout_prob": 0.0, "id2label": {str(i): n for i, n in enumerate(names)},
                  "label2id": {n: i for i, n in enumerate(names)}}
        return rename_keys(sd, rules), config
    # SigLIP and CLIP towers: vision_model.* (+ CLIP's visual_projection)
    sd = split_qkv(sd, "vision_model.encoder.layers.{block}.self_attn.{which}_proj.{kind}", ("q", "k", "v"))
    tensors = {}
    if "cls_token" in sd:
        tensors["vision_model.embeddings.class_embedding"] = sd.pop("cls_token").reshape(-1)
    tensors["vision_model.embeddings.position_embedding.weight"] = sd.pop("pos_embed")[0]
    if "head.weight" in sd:
        bias = sd.pop("head.bias", None)
        if bias is not None and bias.any():
            raise InvalidValueError(f"cannot write the transformers {name} layout: CLIP's visual_projection has no "
                                    "bias and this head's bias is not zero")
        tensors["visual_projection.weight"] = sd.pop("head.weight")
    if "attn_pool.q.weight" in sd:
        for kind in ("weight", "bias"):
            tensors[f"vision_model.head.attention.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"attn_pool.q.{kind}"), sd.pop(f"attn_pool.kv.{kind}")], dim=0)
    rules = [(r"patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
             (r"norm_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
             (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
             (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.out_proj.\2"),
             (r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc\2.\3"),
             (r"norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
             (r"attn_pool\.latent", "vision_model.head.probe"),
             (r"attn_pool\.proj\.(weight|bias)", r"vision_model.head.attention.out_proj.\1"),
             (r"attn_pool\.norm\.(weight|bias)", r"vision_model.head.layernorm.\1"),
             (r"attn_pool\.mlp\.fc([12])\.(weight|bias)", r"vision_model.head.mlp.fc\1.\2")]
    tensors.update(rename_keys(sd, rules))
    config = {**common, "architectures": [name], "intermediate_size": cfg.mlp_dim, "attention_dropout": 0.0}
    if name.startswith("Siglip"):
        config.update(model_type="siglip_vision_model", vision_use_head=True)
    else:
        config.update(model_type="clip_vision_model", projection_dim=cfg.num_classes or 512)
    return tensors, config
