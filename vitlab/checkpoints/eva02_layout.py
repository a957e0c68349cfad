"""The two layouts EVA-02 ViTs (Fang et al. 2023) are published in, mapped onto vitlab's (timm ViT) names.

Per vitlab name: timm's ``Eva`` (``eva02_*``, the ``timm/eva02_*`` Hub repos) / BAAI's original ``.pt`` files
(``eva02_B_pt_in21k_p14.pt``, ...; timm's ``checkpoint_filter_fn`` reads them):

- ``cls_token``, ``pos_embed`` (class slot first), ``patch_embed.proj``, ``norm1`` / ``norm2``, ``attn.proj``,
  ``fc_norm``, ``head``: the same in both
- ``blocks.{i}.attn.qkv.weight``: ``attn.qkv.weight`` (Ti, S) or ``attn.{q,k,v}_proj.weight`` fused (B, L) / the same
- ``blocks.{i}.attn.qkv.bias``: ``attn.q_bias``, zeros, ``attn.v_bias`` (B, L: ``q_proj.bias``, ``v_proj.bias``) /
  ``attn.q_bias``, zeros, ``attn.v_bias``: EVA-02 has no key bias (timm's fixed zero ``k_bias``), which vitlab's
  rotary attention leaves out of the sum anyway
- ``blocks.{i}.mlp.fc1`` (SwiGLU: gate rows, then value rows): ``mlp.fc1`` (Ti, S: packed, gate first) or
  ``mlp.fc1_g`` + ``mlp.fc1_x`` (B, L) / ``mlp.w12`` or ``mlp.w1`` (gate) + ``mlp.w2`` (value)
- ``blocks.{i}.mlp.norm`` (B, L's sub-LN, ``mlp_norm``): ``mlp.norm`` / ``mlp.ffn_ln``
- ``blocks.{i}.mlp.fc2``: ``mlp.fc2`` / ``mlp.w3``

Dropped with a note: BAAI's rotary tables (``rope.freqs_cos`` / ``freqs_sin``, recomputed by
:func:`vitlab.models.vit.rope_eva`), and of a masked-image-modelling checkpoint ``mask_token`` and ``lm_head``; its
final ``norm`` becomes ``fc_norm`` (timm's choice: the mean of the patch tokens is normalised as in the fine-tuned
models). EVA-01 (a GELU MLP, no rotary embedding) and attention with an inner LayerNorm (``attn.norm`` /
``inner_attn_ln``, EVA-02's CLIP towers) are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import VitlabError
from .dinov3_layout import from_timm_dinov3
from .statedicts import rename_keys

EVA02_LAYOUTS = ("eva02", "timm_eva02")
# what EVA-02's code computes that the weights cannot show (timm's eva02_* functions, BAAI's modeling_finetune.py):
# LayerNorm eps 1e-6, the rotary embedding at base 10000 on positions scaled to the 16x16 pre-training grid (224 px
# at patch 14) with interleaved channel pairs, the mean of the patch tokens pooled (timm's global_pool='avg')
EVA02_NUMERICS = {"norm_eps": 1e-6, "rope_kind": "eva", "rope_base": 10000.0, "rope_ref_grid": (16, 16)}

_ATTN = r"blocks\.\d+\.attn\."
_BAAI_MLP = r"blocks\.\d+\.mlp\.(?:w1|w2|w3|w12|ffn_ln)\."


def detect_eva02_layout(keys: set[str]) -> str | None:
    """``eva02`` (BAAI's files) or ``timm_eva02`` (timm's ``Eva``), or None: a learned position embedding and
    separate query / value biases (``q_bias`` or ``q_proj``) mark EVA; BAAI's MLP names or rotary tables mark the
    original release."""
    if "pos_embed" not in keys or "patch_embed.proj.weight" not in keys:
        return None
    if not any(re.match(_ATTN + r"(?:q_bias|q_proj\.weight)$", k) for k in keys):
        return None
    # timm's other Eva ViTs (the RoPE ViTs of SBB and Naver, DINOv3) have registers or LayerScale: EVA-02 has neither
    if "reg_token" in keys or any(re.match(r"blocks\.\d+\.gamma_[12]$", k) for k in keys):
        return None
    if any(re.match(_BAAI_MLP, k) for k in keys) or any(re.search(r"(?:^|\.)rope\.freqs_(?:cos|sin)$", k)
                                                          for k in keys):
        return "eva02"
    return "timm_eva02"


def _refuse_other_evas(sd: Mapping[str, torch.Tensor], source: str) -> None:
    if any(re.match(_ATTN + r"(?:norm|inner_attn_ln)\.", k) for k in sd):
        raise VitlabError(f"{source}: attention with an inner LayerNorm (EVA-02's CLIP image towers, "
                          "scale_attn_inner) is not an EVA-02 classification model vitlab reads")
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.ndim == fc2.ndim == 2 and fc1.shape[0] != 2 * fc2.shape[1]:
        raise VitlabError(f"{source}: a GELU MLP without a rotary embedding is EVA-01 (eva_giant_*), which vitlab "
                          "does not build; EVA-02 has a SwiGLU MLP")


def from_timm_eva02(state_dict: Mapping[str, torch.Tensor],
                    source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm's ``Eva`` (``eva02_*``) -> vitlab names: separate q / k / v projections fused, ``q_bias`` / ``v_bias``
    as a q/k/v bias with a zero key third, the SwiGLU halves ``fc1_g`` / ``fc1_x`` packed."""
    sd = dict(state_dict)
    for key in [k for k in sd if k.endswith(".attn.q_proj.weight")]:
        stem = key[: -len("q_proj.weight")]
        parts = [sd.pop(f"{stem}{w}_proj.weight", None) for w in "qkv"]
        if any(p is None for p in parts):
            raise VitlabError(f"{source}: {stem[:-1]} has q_proj but lacks k_proj or v_proj")
        sd[stem + "qkv.weight"] = torch.cat(parts)
        if f"{stem}k_proj.bias" in sd:
            raise VitlabError(f"{source}: {stem}k_proj.bias: EVA-02 has no key bias")
        for which in "qv":
            bias = sd.pop(f"{stem}{which}_proj.bias", None)
            if bias is not None:
                sd[f"{stem}{which}_bias"] = bias
    sd, notes = from_timm_dinov3(sd, source)
    _refuse_other_evas(sd, source)
    return sd, notes


def from_eva02(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BAAI's EVA-02 ``.pt`` (pre-training or fine-tuned) -> vitlab names, through timm's names."""
    sd, notes = dict(state_dict), []
    rope = [k for k in sd if re.search(r"(?:^|\.)rope\.", k)]
    for k in rope:
        del sd[k]
    if rope:
        notes.append(f"{len(rope)} rotary tables (rope.freqs_cos / freqs_sin) ignored: recomputed for the grid")
    if "mask_token" in sd:  # a masked-image-modelling checkpoint
        dropped = [k for k in sd if k == "mask_token" or k.startswith("lm_head.")]
        for k in dropped:
            del sd[k]
        notes.append(f"{len(dropped)} tensors of masked-image modelling (mask_token, lm_head) ignored; its final norm "
                     "normalises the pooled features (fc_norm), as timm loads it")
        sd = rename_keys(sd, [(r"norm\.(weight|bias)", r"fc_norm.\1")])
    sd = rename_keys(sd, [(r"blocks\.(\d+)\.mlp\.ffn_ln\.(weight|bias)", r"blocks.\1.mlp.norm.\2"),
                          (r"blocks\.(\d+)\.attn\.inner_attn_ln\.(weight|bias)", r"blocks.\1.attn.norm.\2"),
                          (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
                          (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"blocks.\1.mlp.fc1_g.\2"),
                          (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"blocks.\1.mlp.fc1_x.\2"),
                          (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2")])
    for key in [k for k in sd if k.endswith(".attn.q_proj.weight")]:  # B, L: biases kept beside separate q, k, v
        stem = key[: -len("q_proj.weight")]
        for which in "qv":
            if f"{stem}{which}_bias" in sd:
                sd[f"{stem}{which}_proj.bias"] = sd.pop(f"{stem}{which}_bias")
    sd, more = from_timm_eva02(sd, source)
    return sd, notes + more


# ------------------------------------------------------------------------------------------------- writing
def to_timm_eva02(state_dict: Mapping[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """vitlab names -> timm's ``Eva`` as the ``eva02_*`` functions build it: with ``mlp_norm`` (B, L:
    ``qkv_fused=False``, ``scale_mlp``) separate ``q_proj`` / ``k_proj`` / ``v_proj`` and ``fc1_g`` / ``fc1_x``, else
    (Ti, S) the fused ``qkv.weight`` with ``q_bias`` / ``v_bias`` and the packed ``fc1``."""
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    separate = cfg.mlp_norm
    for key in [k for k in sd if re.match(r"blocks\.\d+\.attn\.qkv\.(weight|bias)$", k)]:
        stem, kind = key.rsplit(".", 2)[0] + ".", key.rsplit(".", 1)[1]
        q, k, v = (t.contiguous() for t in sd.pop(key).chunk(3))
        if kind == "bias":  # the key third is not part of either layout (EVA-02 has no key bias)
            names = (f"{stem}q_proj.bias", f"{stem}v_proj.bias") if separate else (f"{stem}q_bias", f"{stem}v_bias")
            sd[names[0]], sd[names[1]] = q, v
        elif separate:
            sd[f"{stem}q_proj.weight"], sd[f"{stem}k_proj.weight"], sd[f"{stem}v_proj.weight"] = q, k, v
        else:
            sd[key] = torch.cat([q, k, v])
    if separate:
        for key in [k for k in sd if re.match(r"blocks\.\d+\.mlp\.fc1\.", k)]:
            gate, value = sd.pop(key).split(cfg.mlp_dim)
            sd[key.replace(".fc1.", ".fc1_g.")], sd[key.replace(".fc1.", ".fc1_x.")] = gate.contiguous(), \
                value.contiguous()
    return sd
