"""A ViT config as timm describes it in a Hub repo: an ``architecture`` (a timm model name) plus ``model_args`` (the
keywords of timm's ``VisionTransformer`` that differ from it), the two fields of the ``config.json`` that
``timm.create_model("hf-hub:...")`` builds a model from.

:func:`timm_architecture` writes them for a config (choosing the registered timm name that needs the fewest
keywords and checking that the name plus the keywords give back exactly that config), :func:`config_overrides`
reads ``model_args`` back as vitlab config fields (what the ``hf-hub:`` reader applies to the architecture's
config). The two are inverses on every key written here.
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import InvalidValueError
from .registry import _ALIASES, get_config
from .vit import ViTConfig

# vitlab's GELU flavours as timm's act_layer names (timm.layers.get_act_layer)
TIMM_GELU = {"exact": "gelu", "tanh": "gelu_tanh", "quick": "quick_gelu"}
# timm's global_pool values for vitlab's pool kinds
TIMM_POOL = {"token": "token", "gap": "avg", "map": "map"}
# vitlab's timm-style aliases that timm itself does not register (the paper's sizes at patch sizes timm skipped);
# tests/test_hub_push.py checks that timm has every other one
NOT_IN_TIMM = frozenset({
    "vit_base_patch14_224", "vit_base_patch14_518", "vit_base_patch8_384", "vit_huge_patch14_518",
    "vit_huge_patch16_224", "vit_huge_patch16_384", "vit_huge_patch32_224", "vit_huge_patch32_384",
    "vit_huge_patch8_224", "vit_huge_patch8_384", "vit_large_patch14_518", "vit_large_patch8_224",
    "vit_large_patch8_384", "vit_small_patch14_224", "vit_small_patch14_518", "vit_small_patch8_384",
    "vit_tiny_patch14_224", "vit_tiny_patch14_518", "vit_tiny_patch32_224", "vit_tiny_patch32_384",
    "vit_tiny_patch8_224", "vit_tiny_patch8_384",
})
# fields that change training only, not what the weights compute (DINOv3's RoPE coordinate augmentations included)
_TRAINING_FIELDS = ("dropout", "attn_dropout", "drop_path_rate", "rope_shift", "rope_jitter", "rope_rescale")


def _size(pair) -> int | list[int]:
    return pair[0] if pair[0] == pair[1] else list(pair)


def timm_model_args(cfg: ViTConfig) -> dict:
    """The timm ``VisionTransformer`` keywords for what ``model_args`` can say of ``cfg`` (the rest, such as the
    LayerNorm epsilon or a distillation token, comes with the architecture name)."""
    args = {
        "img_size": _size(cfg.img_size), "patch_size": _size(cfg.patch_size), "in_chans": cfg.in_chans,
        "num_classes": cfg.num_classes, "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_dim / cfg.embed_dim, "qkv_bias": cfg.qkv_bias, "class_token": cfg.class_token,
        "global_pool": TIMM_POOL[cfg.pool], "init_values": cfg.layer_scale, "reg_tokens": cfg.reg_tokens,
        "no_embed_class": cfg.no_embed_class, "pre_norm": cfg.pre_norm, "act_layer": TIMM_GELU[cfg.gelu],
    }
    if cfg.pool == "gap":  # where the final LayerNorm goes (timm's fc_norm: after the average)
        args["fc_norm"] = cfg.norm_after_pool
    if cfg.dynamic_img_size:
        args["dynamic_img_size"] = True
    return args


def timm_dinov3_model_args(cfg: ViTConfig) -> dict:
    """The keywords of timm's DINOv3 port (``Eva``) for what ``model_args`` can say of a ``pos_embed='rope'``
    config (the rotary embedding, LayerNorm epsilon and MLP kind come with the architecture name)."""
    return {"img_size": _size(cfg.img_size), "patch_size": _size(cfg.patch_size), "in_chans": cfg.in_chans,
            "num_classes": cfg.num_classes, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
            "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_dim / cfg.embed_dim, "qkv_bias": cfg.qkv_bias,
            "global_pool": TIMM_POOL[cfg.pool], "use_fc_norm": cfg.norm_after_pool, "init_values": cfg.layer_scale,
            "num_reg_tokens": cfg.reg_tokens, "dynamic_img_size": cfg.dynamic_img_size}


def timm_eva02_model_args(cfg: ViTConfig) -> dict:
    """The keywords of timm's ``Eva`` (``eva02_*``) for what ``model_args`` can say of a ``rope_kind='eva'`` config
    (the rotary embedding, SwiGLU and LayerNorm epsilon come with the name). ``qkv_fused`` follows the MLP's sub-LN
    as in timm's functions (B, L: separate q, k, v)."""
    return {"img_size": _size(cfg.img_size), "patch_size": _size(cfg.patch_size), "in_chans": cfg.in_chans,
            "num_classes": cfg.num_classes, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
            "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_dim / cfg.embed_dim, "qkv_bias": cfg.qkv_bias,
            "qkv_fused": not cfg.mlp_norm, "scale_mlp": cfg.mlp_norm, "global_pool": TIMM_POOL[cfg.pool],
            "use_fc_norm": cfg.norm_after_pool, "dynamic_img_size": cfg.dynamic_img_size}


def config_overrides(model_args: dict) -> dict:
    """vitlab config fields for the ``model_args`` of a timm ``config.json`` (keys not listed here are left out:
    they do not change what the weights compute, or the checks on the weights catch them)."""
    out = {}
    simple = ("in_chans", "num_classes", "embed_dim", "depth", "num_heads", "qkv_bias", "class_token", "reg_tokens",
              "no_embed_class", "pre_norm", "dynamic_img_size")
    for key in simple:
        if key in model_args:
            out[key] = model_args[key]
    if "scale_mlp" in model_args:  # timm's Eva (EVA-02): the LayerNorm inside the MLP
        out["mlp_norm"] = bool(model_args["scale_mlp"])
    if "num_reg_tokens" in model_args:  # timm's Eva (DINOv3) spelling
        out["reg_tokens"] = model_args["num_reg_tokens"]
    for key in ("img_size", "patch_size"):
        if key in model_args:
            value = model_args[key]
            out[key] = tuple(value) if isinstance(value, list) else value
    if "init_values" in model_args:
        out["layer_scale"] = model_args["init_values"]
    if "act_layer" in model_args:
        out["gelu"] = _vitlab_value(TIMM_GELU, model_args, "act_layer", "GELU")
    if "global_pool" in model_args:
        pool = out["pool"] = _vitlab_value(TIMM_POOL, model_args, "global_pool", "pooling")
        if pool == "gap":  # timm: fc_norm None means after the average for 'avg'
            fc_norm = model_args.get("fc_norm", model_args.get("use_fc_norm"))  # ViT / Eva spelling
            out["norm_after_pool"] = True if fc_norm is None else bool(fc_norm)
    if "mlp_ratio" in model_args:
        dim = out.get("embed_dim")
        if dim is not None:
            out["mlp_dim"] = int(dim * model_args["mlp_ratio"])  # timm's Mlp: int(dim * mlp_ratio)
    return out


def _vitlab_value(table: dict[str, str], model_args: dict, key: str, what: str) -> str:
    """The vitlab value of timm keyword ``key`` through ``table`` (vitlab value -> timm's), or one error naming it."""
    value = {timm: ours for ours, timm in table.items()}.get(model_args[key])
    if value is None:
        raise InvalidValueError(f"model_args {key}={model_args[key]!r} is not a {what} vitlab has (one of "
                                f"{', '.join(table.values())})")
    return value


def _comparable(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _TRAINING_FIELDS}


def timm_architecture(cfg: ViTConfig) -> tuple[str, dict]:
    """(timm model name, ``model_args``) that build ``cfg`` in timm and, read back by vitlab's ``hf-hub:`` reader,
    give ``cfg`` again. Raises :class:`InvalidValueError` naming what timm's layout cannot hold."""
    if type(cfg) is not ViTConfig:  # hybrids and CNNs: timm names them, but their model_args are not these
        raise InvalidValueError(f"cannot write the timm Hub layout for a {type(cfg).__name__} model (it holds ViTs "
                                "here); use the vitlab layout")
    if cfg.rope_kind == "eva":
        return _eva02_architecture(cfg)
    if cfg.pos_embed == "rope":
        return _dinov3_architecture(cfg)
    problems = []
    if cfg.mlp_type != "mlp":
        problems.append(f"mlp_type={cfg.mlp_type!r}")
    if cfg.representation_size:
        problems.append("a pre-logits layer (timm's ViT has none)")
    if cfg.head_proj_dim or cfg.head_l2_norm:
        problems.append("a zero-shot head (projection / L2 norm; timm's ViT has none)")
    if cfg.pos_embed != "learned":
        problems.append(f"pos_embed={cfg.pos_embed!r}")
    if cfg.drop_remainder or cfg.dynamic_img_pad:
        problems.append("drop_remainder / dynamic_img_pad")
    args = timm_model_args(cfg)
    if not problems and int(cfg.embed_dim * args["mlp_ratio"]) != cfg.mlp_dim:
        problems.append(f"mlp_dim {cfg.mlp_dim} is not int(embed_dim * a ratio) as timm computes it")
    if problems:
        raise InvalidValueError("cannot write the timm Hub layout for this model: " + "; ".join(problems)
                                + " (use the vitlab layout)")
    want = _comparable(cfg)
    overrides = config_overrides(args)
    best = None
    for alias in sorted(set(_ALIASES) - NOT_IN_TIMM):  # timm's names; the fewest changed keywords wins, then vit_*
        base = get_config(alias)
        if type(base) is not ViTConfig:
            continue
        try:
            built = base.replace(**overrides)
        except (ValueError, TypeError):
            continue
        if _comparable(built) != want:
            continue
        base_args = timm_model_args(base)
        rank = (sum(base_args.get(k) != v for k, v in args.items()), not alias.startswith("vit_"), alias)
        best = rank if best is None or rank < best else best
    if best is None:
        raise InvalidValueError("cannot write the timm Hub layout for this model: no timm architecture plus "
                                "model_args builds it (a LayerNorm epsilon, patch bias or token set no timm "
                                "ViT name has); use the vitlab layout")
    return best[2], args


def eva02_export_problems(cfg) -> list[str]:
    """What timm's ``eva02_*`` functions (plus ``model_args``) cannot hold of a ``rope_kind='eva'`` config."""
    problems = []
    if cfg.pos_embed != "learned" or cfg.no_embed_class:
        problems.append("EVA-02 has a learned position table with a class slot next to its RoPE")
    if not cfg.class_token or cfg.distilled or cfg.reg_tokens or cfg.pre_norm or not cfg.patch_bias:
        problems.append("EVA-02 has a class token, no distillation token or registers, no ln_pre, a patch bias")
    if cfg.mlp_type != "swiglu" or cfg.layer_scale:
        problems.append("EVA-02 has a SwiGLU MLP and no LayerScale")
    if cfg.representation_size or cfg.head_proj_dim or cfg.head_l2_norm or cfg.pool == "map":
        problems.append("a pre-logits layer, head projection or attention pooling")
    if (cfg.norm_eps, cfg.rope_base, cfg.rope_ref_grid) != (1e-6, 10000.0, (16, 16)):
        problems.append(f"LayerNorm eps {cfg.norm_eps:g}, rope_base {cfg.rope_base:g}, rope_ref_grid "
                        f"{cfg.rope_ref_grid} (timm's eva02_* fix 1e-6, 10000 and (16, 16))")
    if cfg.drop_remainder or cfg.dynamic_img_pad:
        problems.append("drop_remainder / dynamic_img_pad")
    return problems


def _eva02_architecture(cfg: ViTConfig) -> tuple[str, dict]:
    """timm's ``eva02_*`` name and ``Eva`` keywords for a ``rope_kind='eva'`` config (the name needing the fewest
    changed keywords)."""
    problems = eva02_export_problems(cfg)
    args = timm_eva02_model_args(cfg)
    want = _comparable(cfg)
    overrides = config_overrides(args)
    best = None
    for alias in sorted(a for a in _ALIASES if a.startswith("eva02_")):
        base = get_config(alias)
        try:
            built = base.replace(**overrides)
        except (ValueError, TypeError):
            continue
        if not problems and _comparable(built) == want:
            rank = (sum(timm_eva02_model_args(base).get(k) != v for k, v in args.items()), alias)
            best = rank if best is None or rank < best else best
    if best is not None:
        return best[1], args
    raise InvalidValueError("cannot write the timm Hub layout for this model: " + "; ".join(
        problems or ["no timm eva02_* architecture plus model_args builds it"]) + " (use the vitlab layout)")


def _dinov3_architecture(cfg: ViTConfig) -> tuple[str, dict]:
    """timm's ``vit_*_dinov3`` name and ``Eva`` keywords for a ``pos_embed='rope'`` config (what
    :func:`timm_architecture` returns for DINOv3 models)."""
    problems = []
    if cfg.mlp_type == "swiglu" and cfg.mlp_dim % 8:
        problems.append(f"a SwiGLU width {cfg.mlp_dim} timm would round up to a multiple of 8")
    if cfg.representation_size or cfg.head_proj_dim or cfg.head_l2_norm or cfg.pool == "map":
        problems.append("a pre-logits layer, head projection or attention pooling")
    if cfg.drop_remainder or cfg.dynamic_img_pad:
        problems.append("drop_remainder / dynamic_img_pad")
    args = timm_dinov3_model_args(cfg)
    want = _comparable(cfg)
    overrides = config_overrides(args)
    best = None
    for alias in sorted(a for a in _ALIASES if a.endswith("_dinov3")):
        if alias.startswith("vit_7b") and cfg.mlp_dim % 64:  # timm's 7B rounds its SwiGLU width to 64
            continue
        base = get_config(alias)
        try:
            built = base.replace(**overrides)
        except (ValueError, TypeError):
            continue
        if not problems and _comparable(built) == want:  # the fewest changed keywords wins
            rank = (sum(timm_dinov3_model_args(base).get(k) != v for k, v in args.items()), alias)
            best = rank if best is None or rank < best else best
    if best is not None:
        return best[1], args
    raise InvalidValueError("cannot write the timm Hub layout for this model: " + "; ".join(
        problems or ["no timm vit_*_dinov3 architecture plus model_args builds it (its RoPE base, LayerNorm epsilon, "
                     "token set or GELU differ from DINOv3's)"]) + " (use the vitlab layout)")
