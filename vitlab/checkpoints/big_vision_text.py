"""The text tower of a big_vision two-tower ``.npz`` (SigLIP's own releases, e.g. ``webli_en_b16_224_63724782.npz``).

big_vision saves the image tower under ``params/img/`` (read by :mod:`vitlab.checkpoints.npz`), the text tower under
``params/txt/`` and the sigmoid loss's log temperature and bias as ``params/t`` and ``params/b``. Its text tower
(``big_vision/models/proj/image_text/text_transformer.py``) is the ViT encoder over token embeddings: ``Embed_0``
(token embedding), a top-level ``pos_embedding``, ``Encoder_0`` (the image tower's encoder blocks, Linen names,
possibly scanned: ``encoderblock/`` with a leading layer axis), bidirectional attention, tanh GELU (Flax's
``nn.gelu``), LayerNorm epsilon 1e-6, the last position pooled (text padded with the end-of-text token, "sticky"
EOS) and a ``head`` Dense with bias into the joint space. Some older files repeat the position embedding as
``Encoder_0/pos_embedding``; big_vision adds the two, as is done here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import VitlabError
from ..models.text import TextConfig
from .npz import NpzLayout, _dense, _same, apply_rules, canonical_encoder, encoder_rules, float32_arrays
from .text_tower import TextTower

TEXT_PREFIXES = ("params/txt/", "txt/")
_EMBED = "Embed_0/embedding"


def text_prefix(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The prefix of a big_vision text tower in ``arrays`` (``params/txt/`` or ``txt/``), None without one."""
    return next((p for p in TEXT_PREFIXES if f"{p}{_EMBED}" in arrays), None)


def _loss_scalar(arrays: Mapping[str, np.ndarray], name: str, prefix: str) -> torch.Tensor | None:
    root = prefix[: -len("txt/")]  # "params/" or ""
    value = arrays.get(f"{root}{name}")
    return None if value is None else torch.from_numpy(np.asarray(value, dtype=np.float32).reshape(1).copy())


def big_vision_text_tower(arrays: Mapping[str, np.ndarray], source: str) -> TextTower:
    """The text tower, logit scale (``t``, a log) and logit bias (``b``) of a big_vision two-tower ``.npz``."""
    prefix = text_prefix(arrays)
    if prefix is None:
        raise VitlabError(f"{source}: no text tower in this .npz (no 'params/txt/{_EMBED}'); an image-only "
                          "checkpoint loads with vitlab.load")
    layout = NpzLayout(prefix=prefix)
    txt = float32_arrays(arrays, layout, source)
    txt = {("Transformer/" + k[len("Encoder_0/"):] if k.startswith("Encoder_0/") else k): v for k, v in txt.items()}
    txt = canonical_encoder(txt, layout, source)
    notes = [f"big_vision text tower ({'scanned' if layout.scanned else 'per-block'} encoder)"]
    extra = txt.pop("Transformer/pos_embedding", None)
    if extra is not None and "pos_embedding" in txt:
        txt["pos_embedding"] = txt["pos_embedding"] + extra
        notes.append("Encoder_0/pos_embedding added to pos_embedding (an older file's second position embedding)")
    blocks = {k.split("/")[1] for k in txt if k.startswith("Transformer/encoderblock_")}
    query = txt.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    mlp = txt.get("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel")
    if not blocks or query is None or mlp is None or "pos_embedding" not in txt:
        raise VitlabError(f"{source}: the text tower under {prefix!r} lacks encoder blocks or its position "
                          "embedding; not a big_vision text transformer")
    vocab, width = txt[_EMBED].shape
    head = txt.get("head/kernel")
    rules = encoder_rules(len(blocks), int(query.shape[1])) + [_same("token_embed.weight", _EMBED),
                                                              _same("pos_embed", "pos_embedding")]
    if head is not None:
        rules += _dense("proj", "head")
    state_dict = apply_rules(txt, rules, source)
    try:
        config = TextConfig(vocab_size=int(vocab), context_length=int(txt["pos_embedding"].shape[1]),
                            embed_dim=int(width), depth=len(blocks), num_heads=int(query.shape[1]),
                            mlp_dim=int(mlp.shape[1]), causal=False, pool="last", gelu="tanh", norm_eps=1e-6,
                            proj_dim=int(head.shape[1]) if head is not None else 0, proj_bias=head is not None)
    except (TypeError, ValueError) as exc:
        raise VitlabError(f"{source}: the text tower's arrays describe no tower vitlab can build ({exc})") from None
    scale = _loss_scalar(arrays, "t", prefix)
    if scale is None:
        raise VitlabError(f"{source}: no 't' (the log temperature) beside the towers; not a two-tower checkpoint")
    return TextTower(config, state_dict, scale, _loss_scalar(arrays, "b", prefix), "big_vision", notes + layout.notes)
