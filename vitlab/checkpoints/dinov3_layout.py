"""The three layouts DINOv3 ViTs (Siméoni et al. 2025) are published in, mapped onto vitlab's (timm ViT) names.

Per vitlab name: Meta's torch.hub ``.pth`` / timm's ``Eva`` port (``vit_*_dinov3``) / transformers'
``DINOv3ViTModel`` (on disk ``layer.{i}.``, in memory ``model.layer.{i}.``):

- ``cls_token``, ``reg_token``: ``cls_token``, ``storage_tokens`` / ``cls_token``, ``reg_token`` /
  ``embeddings.cls_token``, ``embeddings.register_tokens``
- ``patch_embed.proj``: the same / the same / ``embeddings.patch_embeddings``
- ``blocks.{i}.attn.qkv.weight``: the same / the same / ``layer.{i}.attention.{q,k,v}_proj.weight`` fused
- ``blocks.{i}.attn.qkv.bias``: ``qkv.bias`` times ``qkv.bias_mask`` / ``attn.q_bias``, zeros, ``attn.v_bias`` /
  ``{q,v}_proj.bias`` with zeros for k
- ``blocks.{i}.attn.proj``: the same / the same / ``layer.{i}.attention.o_proj``
- ``blocks.{i}.ls1.gamma``, ``ls2.gamma``: the same / ``blocks.{i}.gamma_1``, ``gamma_2`` /
  ``layer.{i}.layer_scale1.lambda1``, ``layer_scale2.lambda1``
- ``blocks.{i}.mlp.fc1`` (SwiGLU: gate rows, then value rows): ``mlp.fc1`` (SwiGLU: ``mlp.w1`` gate, ``mlp.w2`` value) /
  ``mlp.fc1`` (``mlp.fc1_g``, ``mlp.fc1_x``) / ``mlp.up_proj`` (``mlp.gate_proj``, ``mlp.up_proj``)
- ``blocks.{i}.mlp.fc2``: ``mlp.fc2`` (SwiGLU: ``mlp.w3``) / ``mlp.fc2`` / ``mlp.down_proj``
- ``norm``: ``norm`` in all three

Dropped with a note: ``mask_token`` (masked-image training), ``local_cls_norm`` (7B's norm for local crops in
training), ``rope_embed.periods`` (the rotary periods, recomputed from the base; checked against it first). None of
the layouts stores a position table: the rotary embedding is computed (:func:`vitlab.models.vit.rope_2d`).

The key third of a q/k/v bias is masked in DINOv3 (``bias_mask``, transformers' ``key_bias=False``, timm's fixed zero
``k_bias``): it is written as zeros and vitlab's attention leaves it out of the sum anyway.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ..errors import VitlabError
from .statedicts import rename_keys

DINOV3_LAYOUTS = ("dinov3", "timm_dinov3", "hf_dinov3")
DINOV3_SIZE = 256  # the input size of timm's default_cfg for these models (what they were pre-trained at)
# what DINOv3's code computes that the weights cannot show (dinov3/models/vision_transformer.py, timm's and
# transformers' ports): exact GELU (SwiGLU: SiLU), LayerNorm eps 1e-5, 2-D RoPE with base 100 and the pre-training's
# coordinate rescale 2, any input size; timm's pooling (mean patch token after the final norm)
DINOV3_NUMERICS = {"gelu": "exact", "norm_eps": 1e-5, "pos_embed": "rope", "rope_base": 100.0, "rope_rescale": 2.0,
                   "pool": "gap", "norm_after_pool": False, "dynamic_img_size": True}

_HF_LAYER = r"(?:model\.)?layer\.(\d+)\."


def detect_dinov3_layout(keys: set[str]) -> str | None:
    """``dinov3`` (Meta's ``.pth``), ``timm_dinov3`` (timm's Eva port) or ``hf_dinov3`` (transformers), or None."""
    if "storage_tokens" in keys or "rope_embed.periods" in keys:
        return "dinov3"
    if "embeddings.register_tokens" in keys and any(re.match(_HF_LAYER + r"attention\.q_proj\.", k) for k in keys):
        return "hf_dinov3"
    # timm's other Eva RoPE ViTs lack the class token or the registers, or learn their frequencies (rope.freqs)
    if {"patch_embed.proj.weight", "blocks.0.gamma_1", "cls_token", "reg_token"} <= keys and "pos_embed" not in keys \
            and "rope.freqs" not in keys:
        return "timm_dinov3"
    return None


def default_grid(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """The token grid of timm's default input size (256 px) for a DINOv3 state dict in vitlab names: no position
    table fixes one, and the rotary embedding runs at any size."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    return (max(DINOV3_SIZE // proj.shape[2], 1), max(DINOV3_SIZE // proj.shape[3], 1))


def _drop(sd: dict[str, torch.Tensor], notes: list[str], pattern: str, what: str) -> None:
    dropped = [k for k in sd if re.match(pattern, k)]
    for k in dropped:
        del sd[k]
    if dropped:
        notes.append(f"{len(dropped)} tensor{'s' if len(dropped) > 1 else ''} of {what} ignored")


def _masked_qkv_bias(q: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor | None:
    """(q bias, zeros for the masked key bias, v bias), a missing one of q / v as zeros; None when both are."""
    if q is None and v is None:
        return None
    ref = q if q is not None else v
    zeros = torch.zeros_like(ref)
    return torch.cat([q if q is not None else zeros, zeros, v if v is not None else zeros])


def _pack_swiglu(sd: dict[str, torch.Tensor], gate: str, value: str) -> dict[str, torch.Tensor]:
    """``blocks.{i}.mlp.{gate|value}.{kind}`` -> vitlab's packed ``blocks.{i}.mlp.fc1.{kind}`` (gate rows first); a
    half without its partner passes through (strict loading names it)."""
    out = dict(sd)
    for key in list(sd):
        m = re.match(rf"^blocks\.(\d+)\.mlp\.{gate}\.(weight|bias)$", key)
        partner = m and f"blocks.{m.group(1)}.mlp.{value}.{m.group(2)}"
        if m and partner in sd:
            out[f"blocks.{m.group(1)}.mlp.fc1.{m.group(2)}"] = torch.cat([out.pop(key), out.pop(partner)])
    return out


# DINOv3's head counts per width (H+ and 7B are not width / 64)
DINOV3_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}


def dinov3_heads(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The head count of a DINOv3 state dict (any of the layouts): from Meta's ``rope_embed.periods`` (head_dim / 4
    of them) when stored, else DINOv3's count for the width; None when neither tells."""
    proj = state_dict.get("patch_embed.proj.weight", state_dict.get("embeddings.patch_embeddings.weight"))
    if proj is None:
        return None
    periods = state_dict.get("rope_embed.periods")
    if periods is not None and periods.numel() and proj.shape[0] % (4 * periods.numel()) == 0:
        return proj.shape[0] // (4 * periods.numel())
    return DINOV3_HEADS.get(proj.shape[0])


def _check_periods(periods: torch.Tensor, source: str) -> str:
    """Meta's files keep the rotary periods (in bfloat16): they must be base 100's, which vitlab recomputes."""
    n = max(periods.numel(), 1)
    expected = 100.0 ** (torch.arange(periods.numel(), dtype=torch.float64) / n)
    if not torch.allclose(periods.double().flatten(), expected, rtol=1e-2):
        raise VitlabError(f"{source}: rope_embed.periods are not those of base 100 (DINOv3's); vitlab's rotary "
                          "embedding uses base-period schedules")
    return "rope_embed.periods (base 100, stored in low precision) recomputed in float32, as timm and transformers do"


def from_dinov3(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Meta's DINOv3 torch.hub ``.pth`` (``dinov3_vitb16_pretrain_lvd1689m-*.pth``) -> vitlab names."""
    sd, notes = dict(state_dict), []
    if any(k.startswith(("cls_norm.", "patch_norm.")) for k in sd):
        raise VitlabError(f"{source}: separate class-token and patch-token norms (untie_cls_and_patch_norms) are not "
                          "a DINOv3 release vitlab reads")
    _drop(sd, notes, r"mask_token$", "masked-image training (mask_token)")
    _drop(sd, notes, r"local_cls_norm\.", "the local-crop class-token norm (training only)")
    periods = sd.pop("rope_embed.periods", None)
    if periods is not None:
        notes.append(_check_periods(periods, source))
    for key in [k for k in sd if k.endswith(".attn.qkv.bias")]:
        mask = sd.pop(key + "_mask", None)
        bias = sd[key] if mask is None else sd[key] * mask.to(sd[key].dtype)
        q, _, v = bias.chunk(3)
        sd[key] = _masked_qkv_bias(q, v)
    sd = {("reg_token" if k == "storage_tokens" else k): v for k, v in sd.items()}
    sd = _pack_swiglu(sd, "w1", "w2")
    return rename_keys(sd, [(r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2")]), notes


def from_timm_dinov3(state_dict: Mapping[str, torch.Tensor],
                     source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm's DINOv3 port (``Eva`` with ``gamma_1`` / ``gamma_2``, ``q_bias`` / ``v_bias``, SwiGLU ``fc1_g`` /
    ``fc1_x``) -> vitlab names."""
    sd = dict(state_dict)
    for key in [k for k in sd if k.endswith(".attn.q_bias")]:
        stem = key[: -len("q_bias")]
        sd[stem + "qkv.bias"] = _masked_qkv_bias(sd.pop(key), sd.pop(stem + "v_bias", None))
    for key in [k for k in sd if k.endswith(".attn.v_bias")]:  # a v bias without a q bias
        sd[key[: -len("v_bias")] + "qkv.bias"] = _masked_qkv_bias(None, sd.pop(key))
    sd = _pack_swiglu(sd, "fc1_g", "fc1_x")
    return rename_keys(sd, [(r"blocks\.(\d+)\.gamma_([12])", r"blocks.\1.ls\2.gamma")]), []


_HF_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.proj.\1"),
    (_HF_LAYER + r"norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_HF_LAYER + r"attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_HF_LAYER + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (_HF_LAYER + r"mlp\.gate_proj\.(weight|bias)", r"blocks.\1.mlp.gate.\2"),
    (_HF_LAYER + r"mlp\.up_proj\.(weight|bias)", r"blocks.\1.mlp.up.\2"),
    (_HF_LAYER + r"mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]


def from_hf_dinov3(state_dict: Mapping[str, torch.Tensor],
                   source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ``DINOv3ViTModel`` / ``DINOv3ViTBackbone`` (``layer.{i}.`` on disk, ``model.layer.{i}.`` in
    memory) -> vitlab names; separate q, k, v are fused (a k bias must be zero: DINOv3 masks it)."""
    sd, notes = dict(state_dict), []
    _drop(sd, notes, r"embeddings\.mask_token$", "masked-image training (mask_token)")
    sd = rename_keys(sd, _HF_RULES)
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(_HF_LAYER + r"attention\.", k))})
    for i in blocks:
        found = {}
        for key in [k for k in sd if re.match(rf"^(?:model\.)?layer\.{i}\.attention\.[qkv]_proj\.", k)]:
            which, kind = re.match(r".*\.([qkv])_proj\.(weight|bias)$", key).groups()
            found[(which, kind)] = sd.pop(key)
        missing = [w for w in "qkv" if (w, "weight") not in found]
        if missing:
            raise VitlabError(f"{source}: layer {i}: attention lacks {', '.join(w + '_proj' for w in missing)}")
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([found[(w, "weight")] for w in "qkv"])
        k_bias = found.get(("k", "bias"))
        if k_bias is not None and k_bias.any():
            raise VitlabError(f"{source}: layer {i}: a non-zero key bias (key_bias=True); DINOv3 masks the key bias "
                              "and vitlab's rotary attention leaves it out")
        bias = _masked_qkv_bias(found.get(("q", "bias")), found.get(("v", "bias")))
        if bias is not None:
            sd[f"blocks.{i}.attn.qkv.bias"] = bias
    gated = any(re.match(r"blocks\.\d+\.mlp\.gate\.", k) for k in sd)
    if gated:
        sd = _pack_swiglu(sd, "gate", "up")
    return rename_keys(sd, [(r"blocks\.(\d+)\.mlp\.up\.(weight|bias)", r"blocks.\1.mlp.fc1.\2")]), notes


def hf_dinov3_hints(vision: dict, source: str) -> dict:
    """The ViTConfig fields a transformers ``DINOv3ViTConfig`` fixes that the weights cannot show."""
    gated = bool(vision.get("use_gated_mlp", False))
    act = vision.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        raise VitlabError(f"{source}: hidden_act {act!r} with use_gated_mlp={gated}; vitlab computes DINOv3's "
                          "GELU MLP and SiLU SwiGLU")
    for flag in ("proj_bias", "mlp_bias"):
        if vision.get(flag, True) is False:
            raise VitlabError(f"{source}: {flag}=false; vitlab's DINOv3 has output-projection and MLP biases")

    def pair(value):
        return (value, value) if isinstance(value, int) else tuple(value)

    def factor(name: str):
        value = vision.get(name)
        return None if value is None else float(value)

    hints = {**DINOV3_NUMERICS, "num_heads": int(vision.get("num_attention_heads", 6)),
             "norm_eps": float(vision.get("layer_norm_eps", 1e-5)), "rope_base": float(vision.get("rope_theta", 100.0)),
             "rope_shift": factor("pos_embed_shift"), "rope_jitter": factor("pos_embed_jitter"),
             "rope_rescale": factor("pos_embed_rescale") if "pos_embed_rescale" in vision else 2.0,
             "img_size": pair(vision.get("image_size", 224)), "patch_size": pair(vision.get("patch_size", 16))}
    if not math.isfinite(hints["rope_base"]) or hints["rope_base"] <= 0:
        raise VitlabError(f"{source}: rope_theta {vision.get('rope_theta')!r} is not a positive number")
    return hints


# ------------------------------------------------------------------------------------------------- writing
def export_problems(cfg, target: str) -> list[str]:
    """What timm's DINOv3 port or transformers' ``DINOv3ViTModel`` cannot hold of a ``pos_embed='rope'`` config."""
    problems = []
    if not cfg.class_token or cfg.distilled or cfg.pre_norm or not cfg.patch_bias or cfg.representation_size:
        problems.append("DINOv3 has a class token, no distillation token, ln_pre or pre-logits layer, and a patch "
                        "bias")
    if cfg.pool == "map" or cfg.norm_after_pool or not cfg.layer_scale:
        problems.append("DINOv3 has LayerScale and no attention pooling or norm after pooling")
    if getattr(cfg, "head_proj_dim", 0) or getattr(cfg, "head_l2_norm", False):
        problems.append("a head projection / L2 norm (head_proj_dim, head_l2_norm)")
    if cfg.gelu != "exact":
        problems.append(f"gelu={cfg.gelu!r} (DINOv3's MLP uses exact GELU)")
    if target == "transformers" and cfg.num_classes:
        problems.append("DINOv3ViTModel has no classifier (num_classes must be 0)")
    return problems


def to_timm_dinov3(state_dict: Mapping[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """vitlab names -> timm's ``vit_*_dinov3`` (``_qkvb`` with a q/k/v bias): the inverse of
    :func:`from_timm_dinov3`."""
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    for key in [k for k in sd if k.endswith(".attn.qkv.bias")]:
        q, _, v = sd.pop(key).chunk(3)
        stem = key[: -len("qkv.bias")]
        sd[stem + "q_bias"], sd[stem + "v_bias"] = q.contiguous(), v.contiguous()
    if cfg.mlp_type == "swiglu":
        for key in [k for k in sd if re.match(r"blocks\.\d+\.mlp\.fc1\.", k)]:
            gate, value = sd.pop(key).split(cfg.mlp_dim)
            sd[key.replace(".fc1.", ".fc1_g.")], sd[key.replace(".fc1.", ".fc1_x.")] = gate.contiguous(), \
                value.contiguous()
    return rename_keys(sd, [(r"blocks\.(\d+)\.ls([12])\.gamma", r"blocks.\1.gamma_\2")])


def to_hf_dinov3(state_dict: Mapping[str, torch.Tensor], cfg) -> tuple[dict[str, torch.Tensor], dict]:
    """vitlab names -> (transformers ``DINOv3ViTModel`` on-disk tensors, its ``config.json``)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    out = {"embeddings.mask_token": torch.zeros(1, 1, cfg.embed_dim)}  # used only in masked-image training
    for key in [k for k in sd if re.match(r"blocks\.\d+\.attn\.qkv\.", k)]:
        i, kind = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key).groups()
        q, k, v = sd.pop(key).chunk(3)
        names = ("q", "k", "v") if kind == "weight" else ("q", "v")  # the key bias is masked: none on disk
        for which, part in zip(names, (q, k, v) if kind == "weight" else (q, v)):
            out[f"layer.{i}.attention.{which}_proj.{kind}"] = part.contiguous()
    if cfg.mlp_type == "swiglu":
        for key in [k for k in sd if re.match(r"blocks\.\d+\.mlp\.fc1\.", k)]:
            gate, value = sd.pop(key).split(cfg.mlp_dim)
            i, kind = re.match(r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", key).groups()
            out[f"layer.{i}.mlp.gate_proj.{kind}"], out[f"layer.{i}.mlp.up_proj.{kind}"] = gate.contiguous(), \
                value.contiguous()
    rules = [(r"cls_token", "embeddings.cls_token"), (r"reg_token", "embeddings.register_tokens"),
             (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
             (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"layer.\1.norm\2.\3"),
             (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"layer.\1.attention.o_proj.\2"),
             (r"blocks\.(\d+)\.ls([12])\.gamma", r"layer.\1.layer_scale\2.lambda1"),
             (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"layer.\1.mlp.up_proj.\2"),
             (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"layer.\1.mlp.down_proj.\2")]
    out.update(rename_keys(sd, rules))
    if "embeddings.register_tokens" not in out:
        out["embeddings.register_tokens"] = torch.zeros(1, 0, cfg.embed_dim)
    size = cfg.img_size[0] if cfg.img_size[0] == cfg.img_size[1] else list(cfg.img_size)
    patch = cfg.patch_size[0] if cfg.patch_size[0] == cfg.patch_size[1] else list(cfg.patch_size)
    gated = cfg.mlp_type == "swiglu"
    config = {"architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", "hidden_size": cfg.embed_dim,
              "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
              "num_attention_heads": cfg.num_heads, "hidden_act": "silu" if gated else "gelu",
              "layer_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base, "image_size": size, "patch_size": patch,
              "num_channels": cfg.in_chans, "query_bias": cfg.qkv_bias, "key_bias": False,
              "value_bias": cfg.qkv_bias, "proj_bias": True, "mlp_bias": True, "layerscale_value": cfg.layer_scale,
              "use_gated_mlp": gated, "num_register_tokens": cfg.reg_tokens, "pos_embed_shift": cfg.rope_shift,
              "pos_embed_jitter": cfg.rope_jitter, "pos_embed_rescale": cfg.rope_rescale, "drop_path_rate": 0.0,
              "attention_dropout": 0.0}
    return out, config
