"""Small checkpoints built in code, in the exact layouts of the originals, and independent reference forwards.

Nothing here uses vitlab's checkpoint code: the npz writers follow the parameter names of vit_jax / big_vision directly
(from a timm model's weights), and :func:`jax_reference_logits` is a plain numpy forward written in the JAX layout
with tanh GELU, so that tests compare vitlab against things it did not produce.
"""

from __future__ import annotations

import math

import numpy as np
import torch

timm = None


def _timm():
    global timm
    if timm is None:
        import timm as _t

        timm = _t
    return timm


def random_timm_vit(num_classes: int = 7, img_size: int = 32, patch: int = 8, depth: int = 2, width: int = 192,
                    heads: int = 3, mlp: int = 384, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small timm VisionTransformer with every weight random (zero heads and unit norms would hide mistakes)."""
    model = _timm().models.VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=width, depth=depth,
                                             num_heads=heads, mlp_ratio=mlp / width, num_classes=num_classes, **kwargs)
    randomize_weights_(model, seed)
    return model.eval()


def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights at a realistic scale: LayerNorm scales near 1, dense weights with std 1/sqrt(fan_in), so that
    activations are O(1) and e.g. tanh and exact GELU give clearly different logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight") and ("norm" in name or "ln" in name.split(".")[-2]):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2 and name.endswith("weight"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# ------------------------------------------------------------------------------------------------- npz layouts
def vit_jax_arrays(model: torch.nn.Module, representation: tuple[np.ndarray, np.ndarray] | None = None,
                   zero_head: bool = False) -> dict[str, np.ndarray]:
    """The vit_jax (pre-Linen) arrays of a timm ViT, written from vit_jax's parameter names.

    ``representation`` = (pre_logits kernel (D, R), bias (R,)) adds a pre-logits layer; the head kernel must then
    have R rows, so the head is replaced by a random (R, K) one."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    D = sd["cls_token"].shape[-1] if "cls_token" in sd else sd["patch_embed.proj.weight"].shape[0]
    heads = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if "cls_token" in sd:
        out["cls"] = sd["cls_token"]
    depth = len(model.blocks)
    for i in range(depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * D:(j + 1) * D]  # (out, in)
            out[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(D, heads, D // heads)
            out[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * D:(j + 1) * D].reshape(heads, -1)
        out[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, -1, D)
        out[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        out[p + "MlpBlock_3/Dense_0/kernel"], out[p + "MlpBlock_3/Dense_0/bias"] = (sd[b + "mlp.fc1.weight"].T,
                                                                                      sd[b + "mlp.fc1.bias"])
        out[p + "MlpBlock_3/Dense_1/kernel"], out[p + "MlpBlock_3/Dense_1/bias"] = (sd[b + "mlp.fc2.weight"].T,
                                                                                      sd[b + "mlp.fc2.bias"])
    if "head.weight" in sd:
        out["head/kernel"], out["head/bias"] = sd["head.weight"].T, sd["head.bias"]
        if representation is not None:
            kernel, bias = representation
            out["pre_logits/kernel"], out["pre_logits/bias"] = kernel, bias
            rng = np.random.default_rng(5)
            out["head/kernel"] = (rng.standard_normal((kernel.shape[1], sd["head.weight"].shape[0])) * 0.05).astype(
                np.float32)
        if zero_head:
            out["head/kernel"] = np.zeros_like(out["head/kernel"])
            out["head/bias"] = np.zeros_like(out["head/bias"])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def to_big_vision(arrays: dict[str, np.ndarray], *, prefix: str = "params/", scanned: bool = False,
                  bfloat16: bool = False, drop_class_slot: bool = True) -> dict[str, np.ndarray]:
    """vit_jax arrays -> big_vision layout: Linen block names, top-level ``pos_embedding`` (class slot removed when the
    model has one), optional scanned encoder and bfloat16 stored as ``|V2``, under ``prefix``."""
    linen = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
             "MlpBlock_3": "MlpBlock_0"}
    out = {}
    blocks: dict[str, dict[int, np.ndarray]] = {}
    for key, value in arrays.items():
        if key == "Transformer/posembed_input/pos_embedding":
            out["pos_embedding"] = value[:, 1:] if ("cls" in arrays and drop_class_slot) else value
            continue
        parts = key.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            parts[2] = linen.get(parts[2], parts[2])
            if scanned:
                layer = int(parts[1].split("_")[1])
                blocks.setdefault("/".join(["Transformer", "encoderblock", *parts[2:]]), {})[layer] = value
                continue
        out["/".join(parts)] = value
    for key, per_layer in blocks.items():
        out[key] = np.stack([per_layer[i] for i in range(len(per_layer))])
    if bfloat16:
        out = {k: to_bfloat16_void(v) for k, v in out.items()}
    return {prefix + k: v for k, v in out.items()}


def to_bfloat16_void(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even) stored as numpy void ``|V2``, as big_vision files hold them."""
    bits = a.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded.view("V2")


def bfloat16_round(a: np.ndarray) -> np.ndarray:
    """The float32 values a bfloat16 round trip gives (computed with ml_dtypes when available, else bit arithmetic)."""
    try:
        import ml_dtypes

        return a.astype(ml_dtypes.bfloat16).astype(np.float32)
    except ImportError:
        return (to_bfloat16_void(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------------------------------------- reference forward
def _layernorm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def jax_reference_logits(arrays: dict[str, np.ndarray], images: np.ndarray, pool: str = "token",
                         pos_has_class_slot: bool = True) -> np.ndarray:
    """A plain float64 numpy forward over canonical vit_jax arrays (no prefix, float32 values), as Flax computes it:
    tanh GELU, LayerNorm eps 1e-6, einsums over the per-head kernels. ``images`` is NHWC."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    x = images.astype(np.float64)
    kernel = a["embedding/kernel"]
    P, Q = kernel.shape[:2]
    n, h, w, c = x.shape
    patches = x.reshape(n, h // P, P, w // Q, Q, c).transpose(0, 1, 3, 2, 4, 5)  # (n, gh, gw, P, Q, c)
    tokens = np.einsum("nyxpqc,pqcd->nyxd", patches, kernel) + a["embedding/bias"]
    tokens = tokens.reshape(n, -1, kernel.shape[-1])
    pos = a["Transformer/posembed_input/pos_embedding"]
    if "cls" in a:
        if not pos_has_class_slot:
            tokens = tokens + pos
        cls = np.broadcast_to(a["cls"], (n, 1, tokens.shape[-1]))
        tokens = np.concatenate([cls, tokens], axis=1)
        if pos_has_class_slot:
            tokens = tokens + pos
    else:
        tokens = tokens + pos
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        y = _layernorm(tokens, a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"])
        q = np.einsum("ntd,dhk->nhtk", y, a[mha + "query/kernel"]) + a[mha + "query/bias"][None, :, None, :]
        k = np.einsum("ntd,dhk->nhtk", y, a[mha + "key/kernel"]) + a[mha + "key/bias"][None, :, None, :]
        v = np.einsum("ntd,dhk->nhtk", y, a[mha + "value/kernel"]) + a[mha + "value/bias"][None, :, None, :]
        logits = np.einsum("nhqk,nhsk->nhqs", q, k) / math.sqrt(q.shape[-1])
        logits -= logits.max(-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("nhqs,nhsk->nqhk", probs, v)
        tokens = tokens + np.einsum("nqhk,hkd->nqd", attn, a[mha + "out/kernel"]) + a[mha + "out/bias"]
        y = _layernorm(tokens, a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"])
        y = _gelu_tanh(y @ a[p + "MlpBlock_3/Dense_0/kernel"] + a[p + "MlpBlock_3/Dense_0/bias"])
        tokens = tokens + y @ a[p + "MlpBlock_3/Dense_1/kernel"] + a[p + "MlpBlock_3/Dense_1/bias"]
        i += 1
    tokens = _layernorm(tokens, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    rep = tokens[:, 0] if pool == "token" else tokens.mean(axis=1)
    if "pre_logits/kernel" in a:
        rep = np.tanh(rep @ a["pre_logits/kernel"] + a["pre_logits/bias"])
    return rep @ a["head/kernel"] + a["head/bias"]


def save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` as the original releases wrote them (uncompressed)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
