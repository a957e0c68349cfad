"""PyTorch state-dict layouts: timm (= vitlab's own parameter names), Hugging Face (on-disk names) and torchvision.

Each layout is a pair of pure functions between its names and vitlab's, plus the container unwrapping every training
script adds (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``state_dict`` / ``model`` / ``model_ema``
wrappers), and the inference of a :class:`ViTConfig` from the shapes of a vitlab-named state dict.

Key tables (the parameter names of timm's ``vision_transformer.py``, transformers' ``modeling_vit.py`` and
torchvision's ``models/vision_transformer.py``):

======================  ===========================================  ==============================================
vitlab / timm           Hugging Face (on disk)                       torchvision
======================  ===========================================  ==============================================
patch_embed.proj        vit.embeddings.patch_embeddings.projection   conv_proj
cls_token               vit.embeddings.cls_token                     class_token
pos_embed               vit.embeddings.position_embeddings           encoder.pos_embedding
blocks.{i}.norm1        vit.encoder.layer.{i}.layernorm_before       encoder.layers.encoder_layer_{i}.ln_1
blocks.{i}.attn.qkv     ...attention.attention.{query,key,value}     ...self_attention.in_proj_{weight,bias}
blocks.{i}.attn.proj    ...attention.output.dense                    ...self_attention.out_proj
blocks.{i}.norm2        ...layernorm_after                           ...ln_2
blocks.{i}.mlp.fc1/fc2  ...intermediate.dense / ...output.dense      ...mlp.0 / ...mlp.3
norm                    vit.layernorm                                encoder.ln
pre_logits.fc           (vit.pooler.dense, ViTModel only)            heads.pre_logits
head                    classifier                                   heads.head
======================  ===========================================  ==============================================
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import torch

from ..errors import InvalidValueError, VitlabError
from ..models import ViTConfig

STATE_DICT_LAYOUTS = ("timm", "hf", "torchvision")
WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema", "module", "model_state_dict", "weights")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# widths of the standard sizes -> heads (Table 1 + AugReg's Ti/S); state dicts with fused qkv do not record the heads
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


# ------------------------------------------------------------------------------------------------- unwrapping
def unwrap_state_dict(obj: object, source: str, prefer_ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the state dict inside what ``torch.load`` returned and strip DDP / compile prefixes.

    Returns (state dict, notes). With ``prefer_ema`` an EMA copy (``model_ema``/``state_dict_ema``) wins when present.
    A training checkpoint's other entries (optimizer, epoch, ...) are ignored and mentioned in the notes."""
    notes: list[str] = []
    order = WRAPPER_KEYS
    if prefer_ema:
        order = ("model_ema", "state_dict_ema") + tuple(k for k in WRAPPER_KEYS if "ema" not in k)
    depth = 0
    if prefer_ema and not (isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in order[:2])):
        raise VitlabError(no_ema_message(source))  # asked for EMA: never the plain weights without a word
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj) and depth < 3:
        found = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
        if found is None:
            break
        others = sorted(str(k) for k in obj if k != found)
        ema = [k for k in others if "ema" in k]
        if ema:
            notes.append(f"also holds EMA weights ({', '.join(ema)}); loaded {found!r}")
        if others:
            notes.append(f"training checkpoint: used {found!r}, ignored {', '.join(others[:6])}"
                         f"{', ...' if len(others) > 6 else ''}")
        obj = obj[found]
        depth += 1
    if not isinstance(obj, Mapping):
        raise VitlabError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not tensors:
        raise VitlabError(f"{source}: no tensors found (keys: {', '.join(sorted(map(str, obj))[:8])})")
    if skipped:
        notes.append(f"non-tensor entries ignored: {', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''}")
    return strip_prefixes(tensors), notes


def no_ema_message(source: str) -> str:
    """The error for ``prefer_ema`` / ``--ema`` on a file without EMA weights."""
    return (f"{source}: --ema / prefer_ema asks for EMA weights, but this file holds none (only a training "
            "checkpoint of a run with ema_decay has model_ema)")


def _is_tensor_dict(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any order and combination."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``"timm"`` (vitlab's own names), ``"hf"`` or ``"torchvision"`` from signature keys; None if none matches."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if {"vit.embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.weight"} & keys:
        return "hf"
    if "conv_proj.weight" in keys:
        return "torchvision"
    return None


# ------------------------------------------------------------------------------------------------- renaming
def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to each key; unmatched keys pass through unchanged so that
    strict loading reports them as unexpected."""
    compiled = [(re.compile(f"^{pattern}$"), repl) for pattern, repl in rules]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out


def fuse_qkv(state_dict: Mapping[str, torch.Tensor], pattern: str, names: tuple[str, str, str],
             target: str, source: str) -> dict[str, torch.Tensor]:
    """Fuse separate q, k, v projections into ``target`` (``blocks.{block}.attn.qkv.{kind}``), query rows first.
    ``pattern`` captures (block, which, kind) with ``which`` one of ``names``."""
    regex = re.compile(f"^{pattern}$")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in state_dict.items():
        m = regex.match(key)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (block, kind), found in parts.items():
        missing = [n for n in names if n not in found]
        if missing:
            raise VitlabError(f"{source}: layer {block}: attention {kind} lacks {', '.join(missing)}")
        out[target.format(block=block, kind=kind)] = torch.cat([found[n] for n in names], dim=0)
    return out


def split_qkv(state_dict: Mapping[str, torch.Tensor], target: str, names: tuple[str, str, str]) -> dict:
    """``blocks.{i}.attn.qkv.{kind}`` -> three tensors named by ``target.format(block=, which=, kind=)``."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for which, chunk in zip(names, value.chunk(3, dim=0)):
                out[target.format(block=m.group(1), which=which, kind=m.group(2))] = chunk.contiguous()
        else:
            out[key] = value
    return out


def name_rules(pairs: list[tuple[str, str]], reverse: bool = False) -> list[tuple[str, str]]:
    """(regex, replacement) rules for :func:`rename_keys` from a table of (other layout's name, vitlab's name)
    templates, written once for both directions: ``{i}`` is a block index, ``{p}`` weight or bias, ``{a|b}`` a part
    spelled either way when read (older files) and written the first way. ``reverse``: vitlab -> the other layout."""
    def pattern(template: str) -> str:
        parts = re.split(r"(\{[^}]*\})", template)
        out = []
        for part in parts:
            if part == "{i}":
                out.append(r"(?P<i>\d+)")
            elif part == "{p}":
                out.append(r"(?P<p>weight|bias)")
            elif part.startswith("{"):
                out.append("(?:" + "|".join(map(re.escape, part[1:-1].split("|"))) + ")")
            else:
                out.append(re.escape(part))
        return "".join(out)

    def replacement(template: str) -> str:
        template = re.sub(r"\{([^}|]*)\|[^}]*\}", r"\1", template)  # {a|b} is written a
        return template.replace("{i}", r"\g<i>").replace("{p}", r"\g<p>")

    return [(pattern(ours), replacement(theirs)) if reverse else (pattern(theirs), replacement(ours))
            for theirs, ours in pairs]


TORCHVISION_NAMES = [  # torchvision VisionTransformer (in_proj is already the fused q, k, v)
    ("conv_proj.{p}", "patch_embed.proj.{p}"),
    ("class_token", "cls_token"),
    ("encoder.pos_embedding", "pos_embed"),
    ("encoder.layers.encoder_layer_{i}.ln_1.{p}", "blocks.{i}.norm1.{p}"),
    ("encoder.layers.encoder_layer_{i}.self_attention.in_proj_{p}", "blocks.{i}.attn.qkv.{p}"),
    ("encoder.layers.encoder_layer_{i}.self_attention.out_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("encoder.layers.encoder_layer_{i}.ln_2.{p}", "blocks.{i}.norm2.{p}"),
    ("encoder.layers.encoder_layer_{i}.mlp.{0|linear_1}.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("encoder.layers.encoder_layer_{i}.mlp.{3|linear_2}.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("encoder.ln.{p}", "norm.{p}"),
    ("heads.pre_logits.{p}", "pre_logits.fc.{p}"),
    ("heads.head.{p}", "head.{p}"),
]
HF_LAYER_NAMES = [  # transformers ViT encoder layers (DeiT uses the same names); q, k, v: HF_QKV
    ("encoder.layer.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.attn.proj.{p}"),
    ("encoder.layer.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "blocks.{i}.mlp.fc2.{p}"),
]
HF_NAMES = [  # transformers ViTModel / ViTForImageClassification, less the "vit." of the latter
    ("embeddings.patch_embeddings.projection.{p}", "patch_embed.proj.{p}"),
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    *HF_LAYER_NAMES,
    ("layernorm.{p}", "norm.{p}"),
    ("pooler.dense.{p}", "pre_logits.fc.{p}"),
    ("classifier.{p}", "head.{p}"),
]
_TV_FROM, _TV_TO = name_rules(TORCHVISION_NAMES), name_rules(TORCHVISION_NAMES, reverse=True)
HF_VIT_LAYER = name_rules(HF_LAYER_NAMES)
_HF_FROM = name_rules(HF_NAMES)
# vitlab -> ViTForImageClassification (DeiT: the same under deit.), which has no pooler: its classifier reads the
# normalised class token
HF_TO = name_rules([(theirs if theirs.startswith("classifier") else "vit." + theirs, ours)
                    for theirs, ours in HF_NAMES if not theirs.startswith("pooler")], reverse=True)
HF_QKV = r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)"
QKV_TARGET = "blocks.{block}.attn.qkv.{kind}"


def from_torchvision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``VisionTransformer`` names -> vitlab names (in_proj is already the fused q, k, v)."""
    return rename_keys(state_dict, _TV_FROM)


def to_torchvision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitlab names -> torchvision ``VisionTransformer`` names."""
    return rename_keys(state_dict, _TV_TO)


def from_hf(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face ``ViTForImageClassification`` / ``ViTModel`` on-disk names -> vitlab names; separate q, k, v are
    fused into ``qkv`` (query rows first). Returns (state dict, notes).

    ``ViTForImageClassification`` does not use a pooler (its classifier reads the normalised class token), so when a
    file holds both a pooler and a classifier the pooler is dropped, as HF itself does."""
    stripped = {(k[4:] if k.startswith("vit.") else k): v for k, v in state_dict.items()}
    notes = []
    if "classifier.weight" in stripped and any(k.startswith("pooler.") for k in stripped):
        stripped = {k: v for k, v in stripped.items() if not k.startswith("pooler.")}
        notes.append("pooler weights dropped: ViTForImageClassification does not use them")
    out = rename_keys(fuse_qkv(stripped, HF_QKV, ("query", "key", "value"), QKV_TARGET, "Hugging Face"), _HF_FROM)
    return out, notes


def to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitlab names -> Hugging Face ``ViTForImageClassification`` on-disk names (``qkv`` split into q, k, v)."""
    return rename_keys(split_qkv(state_dict, "vit.encoder.layer.{block}.attention.attention.{which}.{kind}",
                                 ("query", "key", "value")), HF_TO)


MAE_DECODER = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.", "decoder_pos_embed", "mask_token")


def drop_mae_decoder(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A masked autoencoder's file in timm names (the paper's ``mae_visualize_vit_*.pth``, vitlab's MAE): the
    encoder alone, the decoder and [mask] token dropped with a note. Other state dicts pass unchanged."""
    if "decoder_pred.weight" not in state_dict:
        return dict(state_dict), []
    kept = {k: v for k, v in state_dict.items() if not k.startswith(MAE_DECODER)}
    return kept, [f"masked-autoencoder decoder dropped ({len(state_dict) - len(kept)} tensors): the encoder is the ViT"]


def to_vitlab_names(state_dict: Mapping[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Any supported PyTorch layout -> vitlab names. Returns (state dict, notes)."""
    if layout == "timm":
        return drop_mae_decoder(state_dict)
    if layout == "hf":
        return from_hf(state_dict)
    if layout == "torchvision":
        return from_torchvision(state_dict), []
    raise InvalidValueError(f"unknown state-dict layout {layout!r}; choose one of {', '.join(STATE_DICT_LAYOUTS)}")


# ------------------------------------------------------------------------------------------------- config inference
def need_key(arrays: Mapping, key: str, source: str):
    """``arrays[key]``, an entry the architecture is inferred from (any layout's names), or a one-line error naming
    ``source`` and the missing key."""
    if key not in arrays:
        raise VitlabError(f"{source}: missing {key!r}; cannot infer the architecture (is this a ViT checkpoint?)")
    return arrays[key]


def infer_config(state_dict: Mapping[str, torch.Tensor], source: str, *, defaults: dict | None = None,
                 grid_hint: tuple[int, int] | None = None) -> tuple[ViTConfig, list[str]]:
    """The :class:`ViTConfig` that a vitlab-named state dict fits, from its shapes. Returns (config, notes).

    Fused-qkv layouts do not record the head count: it is taken from ``defaults`` (``num_heads``) or from the standard
    sizes (width 192 -> 3, 384 -> 6, 768 -> 12, 1024 and 1280 -> 16, else width / 64), which the notes say.
    ``defaults`` also carries fields the weights cannot show (``norm_eps``, ``gelu``). ``grid_hint`` gives the patch
    grid when the position embedding is not a square."""
    defaults = dict(defaults or {})
    notes: list[str] = []
    sd = state_dict
    need = functools.partial(need_key, sd, source=source)
    proj = need("patch_embed.proj.weight")
    if proj.ndim != 4:
        raise VitlabError(f"{source}: patch embedding weight has shape {tuple(proj.shape)}, expected (D, C, P, P)")
    dim, in_chans, ph, pw = proj.shape
    block_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if not block_ids:
        raise VitlabError(f"{source}: no transformer blocks found")
    depth = block_ids[-1] + 1
    if block_ids != list(range(depth)):
        gaps = sorted(set(range(depth)) - set(block_ids))
        raise VitlabError(f"{source}: transformer blocks {gaps} are missing (found {len(block_ids)} of {depth})")
    mlp_dim = need("blocks.0.mlp.fc1.weight").shape[0]
    fc2 = sd.get("blocks.0.mlp.fc2.weight")
    mlp_type = "mlp"
    if fc2 is not None and fc2.ndim == 2 and 2 * fc2.shape[1] == mlp_dim:  # SwiGLU: fc1 packs gate and value
        mlp_type, mlp_dim = "swiglu", fc2.shape[1]
    heads = defaults.pop("num_heads", None)
    if heads is None:
        heads = STANDARD_HEADS.get(dim, max(dim // 64, 1))
        notes.append(f"head count not stored in this layout: assumed {heads} for width {dim} (pass model_name to be "
                     "explicit)")
    class_token = "cls_token" in sd
    distilled = "dist_token" in sd
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd and sd["reg_token"].ndim == 3 else 0
    prefix = int(class_token) + int(distilled) + reg_tokens
    no_embed_class = False
    if "pos_embed" in sd:
        pos_embed = "learned"
        rows = sd["pos_embed"].shape[-2]
        # prefix tokens have rows of their own unless the embedding covers the patches only (no_embed_class)
        no_embed_class = prefix > 0 and not _fits_grid(rows - prefix, grid_hint) and _fits_grid(rows, grid_hint)
        grid = _grid_from_rows(rows if no_embed_class else rows - prefix, grid_hint, source)
    elif "pos_embed_x" in sd and "pos_embed_y" in sd:
        pos_embed = "learned_2d"
        grid = (sd["pos_embed_y"].shape[0], sd["pos_embed_x"].shape[0])
    else:
        pos_embed = defaults.pop("pos_embed", "none")
        if grid_hint is None:
            raise VitlabError(f"{source}: no learned position embedding, so the image size cannot be inferred; "
                              "pass model_name or img_size")
        grid = grid_hint
        notes.append(f"no learned position embedding: assumed pos_embed={pos_embed!r}")
    defaults.pop("pos_embed", None)
    fc_norm = "fc_norm.weight" in sd
    pool = "map" if "attn_pool.latent" in sd else "gap" if (fc_norm or not class_token) else "token"
    layer_scale = defaults.pop("layer_scale", None)
    # LayerScale in any block: a file missing one gamma is then reported as missing that key
    has_layer_scale = any(re.match(r"blocks\.\d+\.ls[12]\.gamma$", k) for k in sd)
    if has_layer_scale and not layer_scale:
        layer_scale = 1e-5  # only the initial value, which trained weights replace
    elif not has_layer_scale:
        layer_scale = None
    representation = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    kwargs = dict(
        img_size=(grid[0] * ph, grid[1] * pw), patch_size=(ph, pw), in_chans=in_chans, num_classes=num_classes,
        embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=mlp_dim, pool=pool, class_token=class_token,
        pos_embed=pos_embed, norm_after_pool=fc_norm, representation_size=representation,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, layer_scale=layer_scale, reg_tokens=reg_tokens, distilled=distilled,
        no_embed_class=no_embed_class, pre_norm="norm_pre.weight" in sd, patch_bias="patch_embed.proj.bias" in sd,
        mlp_type=mlp_type, mlp_norm="blocks.0.mlp.norm.weight" in sd,
    )
    kwargs.update(defaults)
    try:
        return ViTConfig(**kwargs), notes
    except ValueError as exc:
        raise VitlabError(f"{source}: the weights describe no valid ViT ({exc})") from None


def _fits_grid(n: int, hint: tuple[int, int] | None) -> bool:
    """Whether ``n`` position-embedding rows can be the patch grid (the hinted one, else a square)."""
    if hint is not None:
        return hint[0] * hint[1] == n
    return n > 0 and int(round(n**0.5)) ** 2 == n


def _grid_from_rows(n: int, hint: tuple[int, int] | None, source: str) -> tuple[int, int]:
    if hint is not None and hint[0] * hint[1] == n:
        return (int(hint[0]), int(hint[1]))
    side = int(round(n**0.5))
    if side * side != n:
        raise VitlabError(f"{source}: the position embedding has {n} grid rows, not a square grid; pass model_name "
                          "or the image size so that the grid is known")
    return (side, side)
