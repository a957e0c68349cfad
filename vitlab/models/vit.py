"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), read top to bottom in the order data flows.

    z0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
    z'l = MSA(LN(z_{l-1})) + z_{l-1}
    zl  = MLP(LN(z'l)) + z'l
    y   = LN(z_L^0)                       -> optional pre-logits (Dense + tanh) -> head

Module and parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.attn.qkv``,
...), so a timm state dict loads as it is; the checkpoint package maps every other layout onto these names.

As a backbone: :meth:`VisionTransformer.forward_intermediates` returns the tokens of chosen blocks (timm's
interface), ``dynamic_img_size`` runs the model at any input size with the position embedding resampled for the
input's grid (cached per grid; a rotary embedding, ``pos_embed='rope'``, is computed for it), ``dynamic_img_pad``
pads inputs up to a multiple of the patch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidValueError
from .metadata import ModelMetadata
from .resample import RESAMPLE_METHODS, resample_grid

PoolType = Literal["token", "gap", "map"]
GeluType = Literal["exact", "tanh", "quick"]
MlpType = Literal["mlp", "swiglu"]
PosEmbedType = Literal["learned", "learned_2d", "sincos", "rope", "none"]
RopeKind = Literal["dinov3", "eva"]


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise InvalidValueError(f"expected an int or a pair of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


class ModelInputError(InvalidValueError):
    """Input a model cannot take (wrong channel count, a size it was not built for, a bad feature index)."""


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes a ViT's architecture; the registry is a table of these.

    ``img_size`` and ``patch_size`` are (height, width); an int means a square. ``mlp_dim`` is the MLP hidden size M.
    ``representation_size`` adds the paper's pre-logits layer (Dense D->R + tanh) before the head.
    ``pool='gap'`` averages the patch tokens; ``norm_after_pool`` chooses where the final LayerNorm goes for it:
    False applies it to every token and then averages (vit_jax, big_vision), True averages and then normalises
    (timm's ``fc_norm``).

    Options of the ViTs that came after the paper (all off by default; docs/families.md says which family uses
    which; module names are timm's):

    - ``layer_scale``: LayerScale init value (None: off). Each residual branch is multiplied by a learned per-channel
      ``ls1.gamma`` / ``ls2.gamma`` started at this value (DeiT III 1e-6, DINOv2 1e-5).
    - ``reg_tokens``: register tokens (``reg_token``, (1, n, D)) after the class token; they take part in attention
      and are dropped at the output (DINOv2 with registers: 4).
    - ``distilled``: DeiT's distillation token (``dist_token``, right after the class token) and its own classifier
      ``head_dist``; inference averages the two heads' logits, training with :meth:`VisionTransformer.
      set_distilled_training` returns both.
    - ``no_embed_class``: the learned position embedding covers the patches only (gh*gw rows); prefix tokens get
      none (DeiT III, DINOv2 with registers, SigLIP). The other ``pos_embed`` kinds always cover the patches only.
    - ``pre_norm``: a LayerNorm (``norm_pre``) on all tokens before the encoder (CLIP's ``ln_pre``).
    - ``patch_bias``: the patch embedding's bias (CLIP's ``conv1`` has none).
    - ``pool='map'``: multi-head attention pooling (``attn_pool``): a learned probe attends over the patch tokens,
      then LayerNorm + MLP with a residual (big_vision's MAP head; SigLIP).
    - ``gelu``: ``exact`` (erf), ``tanh`` (the approximation of big_vision / SigLIP) or ``quick``
      (x * sigmoid(1.702 x), OpenAI CLIP).
    - ``mlp_type='swiglu'``: the MLP is SiLU(x W_g) * (x W_v) -> W_o with ``fc1`` (D -> 2M; gate rows first, then
      value rows, timm's SwiGLUPacked) and ``fc2`` (M -> D); ``mlp_dim`` is the gated width M (DINOv2 ViT-g: 4096).
    - ``head_proj_dim``: a bias-free linear projection (``head_proj``, D -> P) between the pooled features and the
      head (the image tower's projection of CLIP into the space it shares with text).
    - ``head_l2_norm``: the head sees L2-normalised features, so a logit is a scaled cosine similarity: a zero-shot
      classifier of an image-text model is such a head whose rows are the class prompts' text embeddings times the
      logit scale (:mod:`vitlab.zeroshot`).
    - ``drop_remainder``: accept image sizes that are not a multiple of the patch; the strided patch convolution
      ignores the last ``size % patch`` pixel rows / columns (SigLIP So400m/14 at 384 px: a 27x27 grid).
    - ``pos_embed='rope'``: no additive position embedding; attention rotates the queries and keys of the patch
      tokens by their grid position (2-D rotary embedding, DINOv3; see :func:`rope_2d`), prefix tokens unrotated.
      ``rope_base`` is the base period (DINOv3: 100); ``rope_shift`` / ``rope_jitter`` / ``rope_rescale`` are
      DINOv3's training-time coordinate augmentations (a uniform shift in [-s, s], a per-axis scale and a shared
      scale log-uniform in [1/f, f]; drawn once per forward, in training mode only; None: off). A query / key bias
      (``qkv_bias``) keeps its key third out of the sum (DINOv3's masked key bias: under RoPE a key bias would not
      cancel in the softmax).
    - ``rope_kind='eva'``: EVA-02's rotary embedding (:func:`rope_eva`) instead of DINOv3's: integer grid positions
      scaled onto ``rope_ref_grid`` (the pre-training grid; None: unscaled), periods ``rope_base ** (4 j /
      head_dim)`` (EVA-02: 10000), rotation of interleaved channel pairs. It rotates the patch tokens *on top of*
      ``pos_embed='learned'`` (EVA-02 has both: the learned table, class slot included, and RoPE) or alone with
      ``pos_embed='rope'``; the key bias is left out as above (EVA-02 has none). No coordinate augmentations.
    - ``mlp_norm``: a LayerNorm over the MLP's hidden width before ``fc2`` (``mlp.norm``; EVA-02 B/L's sub-LN in
      the SwiGLU, timm's ``scale_mlp``).

    Prefix tokens are one concept: ``[class] [distillation] [registers...]`` in that order, then the patches;
    :attr:`num_prefix_tokens` counts them and :attr:`prefix_token_names` names them.
    """

    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pool: PoolType = "token"
    class_token: bool = True
    pos_embed: PosEmbedType = "learned"
    norm_after_pool: bool = False
    representation_size: int | None = None
    gelu: GeluType = "exact"
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    layer_scale: float | None = None
    reg_tokens: int = 0
    distilled: bool = False
    no_embed_class: bool = False
    pre_norm: bool = False
    patch_bias: bool = True
    mlp_type: MlpType = "mlp"
    drop_remainder: bool = False
    rope_base: float = 100.0
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = None
    rope_kind: RopeKind = "dinov3"
    rope_ref_grid: tuple[int, int] | None = None
    mlp_norm: bool = False
    head_proj_dim: int = 0
    head_l2_norm: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False
    dynamic_img_pad: bool = False
    dynamic_resample: str = "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", _pair(self.img_size))
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        errors = []
        if self.rope_ref_grid is not None:
            ref = _pair(self.rope_ref_grid)
            object.__setattr__(self, "rope_ref_grid", ref)
            if min(ref) <= 0:
                errors.append(f"rope_ref_grid must be a positive grid (rows, columns), got {self.rope_ref_grid!r}")
        if self.rope_kind not in ("dinov3", "eva"):
            errors.append(f"rope_kind must be 'dinov3' or 'eva', got {self.rope_kind!r}")
        elif self.rope_kind == "eva" and self.pos_embed not in ("learned", "rope"):
            errors.append("rope_kind='eva' needs pos_embed='learned' (EVA-02: learned table plus RoPE) or 'rope'")
        if self.rope_ref_grid is not None and self.rope_kind != "eva":
            errors.append("rope_ref_grid needs rope_kind='eva' (DINOv3's coordinates are normalised already)")
        for (size, patch, axis) in zip(self.img_size, self.patch_size, ("height", "width")):
            if patch <= 0 or size <= 0 or (size % patch and not self.drop_remainder) or size < patch:
                errors.append(f"image {axis} {size} is not a positive multiple of patch {axis} {patch}")
        if self.embed_dim % self.num_heads:
            errors.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("token", "gap", "map"):
            errors.append(f"pool must be 'token', 'gap' or 'map', got {self.pool!r}")
        if self.pool == "token" and not self.class_token:
            errors.append("pool='token' needs class_token=True")
        if self.pos_embed not in ("learned", "learned_2d", "sincos", "rope", "none"):
            errors.append(f"pos_embed must be learned, learned_2d, sincos, rope or none, got {self.pos_embed!r}")
        if self.rotary and (self.embed_dim // self.num_heads) % 4:
            errors.append(f"a rotary embedding needs a head width (embed_dim / num_heads = "
                          f"{self.embed_dim // self.num_heads}) divisible by 4")
        if not self.rope_base > 0:
            errors.append(f"rope_base must be > 0, got {self.rope_base!r}")
        for name, low in (("rope_shift", 0.0), ("rope_jitter", 1.0), ("rope_rescale", 1.0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < low):
                errors.append(f"{name} must be None or a number >= {low:g}, got {value!r}")
            elif value is not None and self.pos_embed != "rope":
                errors.append(f"{name} needs pos_embed='rope'")
            elif value is not None and self.rope_kind == "eva":
                errors.append(f"{name}: rope_kind='eva' has no coordinate augmentations (DINOv3's)")
        if self.pos_embed == "learned_2d" and self.embed_dim % 2:
            errors.append("pos_embed='learned_2d' needs an even embed_dim")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            errors.append("pos_embed='sincos' needs embed_dim divisible by 4")
        if self.gelu not in ("exact", "tanh", "quick"):
            errors.append(f"gelu must be 'exact', 'tanh' or 'quick', got {self.gelu!r}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            errors.append(f"layer_scale must be a positive init value or None, got {self.layer_scale!r}")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            errors.append(f"reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        if self.distilled:
            if not self.class_token or self.pool != "token":
                errors.append("distilled=True needs class_token=True and pool='token' (the two heads read the class "
                              "and distillation tokens)")
            if self.reg_tokens:
                errors.append("distilled=True does not combine with reg_tokens")
            if self.representation_size or self.norm_after_pool:
                errors.append("distilled=True does not combine with representation_size or norm_after_pool")
        if self.mlp_type not in ("mlp", "swiglu"):
            errors.append(f"mlp_type must be 'mlp' or 'swiglu', got {self.mlp_type!r}")
        if self.mlp_type == "swiglu" and self.pool == "map":
            errors.append("pool='map' does not combine with mlp_type='swiglu' (the pooling head's MLP uses GELU)")
        if self.pool == "map" and self.norm_after_pool:
            errors.append("pool='map' does not combine with norm_after_pool (the pooling head has its own norm)")
        if isinstance(self.head_proj_dim, bool) or not isinstance(self.head_proj_dim, int) or self.head_proj_dim < 0:
            errors.append(f"head_proj_dim must be an int >= 0, got {self.head_proj_dim!r}")
        if self.distilled and (self.head_proj_dim or self.head_l2_norm):
            errors.append("distilled=True does not combine with head_proj_dim or head_l2_norm")
        if self.num_classes < 0:
            errors.append(f"num_classes must be >= 0, got {self.num_classes}")
        if self.dynamic_resample not in RESAMPLE_METHODS:
            errors.append(f"dynamic_resample must be one of {', '.join(RESAMPLE_METHODS)}, got "
                          f"{self.dynamic_resample!r}")
        if errors:
            raise InvalidValueError("invalid ViT config: " + "; ".join(errors))

    @property
    def rotary(self) -> bool:
        """True when attention rotates the patch tokens' queries and keys (``pos_embed='rope'`` or
        ``rope_kind='eva'``)."""
        return self.pos_embed == "rope" or self.rope_kind == "eva"

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def reduction(self) -> tuple[int, int]:
        """Pixels per token along (height, width): the patch size (hybrids: backbone stride x patch size)."""
        return self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation and register tokens."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def prefix_token_names(self) -> tuple[str, ...]:
        """Each prefix token's role in sequence order: ``class``, ``dist``, ``reg0``, ``reg1``, ..."""
        names = ("class",) * self.class_token + ("dist",) * self.distilled
        return names + tuple(f"reg{i}" for i in range(self.reg_tokens))

    @property
    def num_pos_prefix(self) -> int:
        """Rows of the learned position embedding that belong to prefix tokens (before the grid rows): all prefix
        tokens, or none with ``no_embed_class`` or a kind of embedding that covers the patches only."""
        return self.num_prefix_tokens if self.pos_embed == "learned" and not self.no_embed_class else 0

    def family_options(self) -> dict:
        """The options beyond the paper's ViT that are set (field -> value), e.g. ``{'layer_scale': 1e-05,
        'reg_tokens': 4, 'no_embed_class': True}`` for DINOv2 with registers; empty for the paper's models. Layouts
        that cannot hold them (vit_jax, torchvision) name them in their error."""
        changed = {name: getattr(self, name) for name, default in _FAMILY_DEFAULTS.items()
                   if getattr(self, name) != default}
        if self.pool == "map":
            changed["pool"] = "map"
        if self.gelu == "quick":
            changed["gelu"] = "quick"
        if self.rotary:
            if self.pos_embed == "rope":
                changed["pos_embed"] = "rope"
            if self.rope_kind != "dinov3":
                changed["rope_kind"] = self.rope_kind
            if self.rope_ref_grid is not None:
                changed["rope_ref_grid"] = self.rope_ref_grid
            if self.rope_base != 100.0:
                changed["rope_base"] = self.rope_base
            changed.update({name: getattr(self, name) for name in ("rope_shift", "rope_jitter", "rope_rescale")
                            if getattr(self, name) is not None})
        return changed

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["img_size"] = list(self.img_size)
        out["patch_size"] = list(self.patch_size)
        if self.rope_ref_grid is not None:
            out["rope_ref_grid"] = list(self.rope_ref_grid)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so that typos are not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidValueError(f"unknown ViT config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> ViTConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise InvalidValueError(f"unknown ViT config keys: {', '.join(unknown)}")
        return replace(self, **changes)


_FAMILY_DEFAULTS = {"layer_scale": None, "reg_tokens": 0, "distilled": False, "no_embed_class": False,
                    "pre_norm": False, "patch_bias": True, "mlp_type": "mlp", "drop_remainder": False,
                    "head_proj_dim": 0, "head_l2_norm": False, "mlp_norm": False}


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each linearly: a P x P convolution with stride P."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid


def sincos_2d_position_embedding(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, (gh * gw, dim), rows in row-major grid order.

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y), with geometric frequencies (big_vision's
    ``posemb_sincos_2d``)."""
    if dim % 4:
        raise InvalidValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid_size
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def rope_2d(grid_size: tuple[int, int], head_dim: int, base: float = 100.0, *, shift: float | None = None,
            jitter: float | None = None, rescale: float | None = None, device: torch.device | str | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """DINOv3's 2-D rotary position embedding for a (gh, gw) patch grid: (gh * gw, 2 * head_dim), the sines then
    the cosines, rows in row-major grid order, for :func:`apply_rope`.

    Each patch's centre is a coordinate in [-1, 1] per axis (row i: 2 (i + 0.5) / gh - 1, the same for columns), so
    any grid covers the same range and no resampling is needed at another input size. A quarter of the head's
    channels turns with the row coordinate and a quarter with the column coordinate, at angles 2 pi c / period for
    periods ``base ** (4 j / head_dim)``, j < head_dim / 4; the other half of the channels pairs with them
    (rotate-half layout). ``shift`` / ``jitter`` / ``rescale`` (training-time augmentations, see
    :class:`ViTConfig`) move and scale the coordinates, in that order, with draws from ``generator``."""
    gh, gw = grid_size
    rows = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) / gh
    cols = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) / gw
    coords = 2.0 * torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2) - 1.0  # (N, 2)

    def draw(n: int, bound: float) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=coords.device).uniform_(-bound, bound, generator=generator)

    if shift is not None:
        coords = coords + draw(2, shift)
    if jitter is not None:
        coords = coords * draw(2, math.log(jitter)).exp()
    if rescale is not None:
        coords = coords * draw(1, math.log(rescale)).exp()
    periods = base ** (4.0 * torch.arange(head_dim // 4, dtype=torch.float32, device=coords.device) / head_dim)
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1)  # (N, head_dim / 2): rows, then columns
    angles = torch.cat([angles, angles], dim=1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def rope_eva(grid_size: tuple[int, int], head_dim: int, base: float = 10000.0,
             ref_grid: tuple[int, int] | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """EVA-02's 2-D rotary position embedding for a (gh, gw) patch grid: (gh * gw, 2 * head_dim), the sines then the
    cosines, rows in row-major grid order, for :func:`apply_rope` with ``interleaved=True``.

    Patch (i, j) sits at (i, j), or at (i ref_h / gh, j ref_w / gw) with ``ref_grid`` (the pre-training grid: a model
    fine-tuned at 448 px from a 224 px pre-training sees positions in steps of 1/2). Frequencies are
    ``base ** (-k / (head_dim / 4))``, k < head_dim / 4; the first half of the channels turns with the row, the second
    with the column, each frequency on two adjacent channels (an interleaved pair)."""
    gh, gw = grid_size
    n = head_dim // 4
    bands = 1.0 / base ** (torch.arange(n, dtype=torch.float32, device=device) / n)
    rows = torch.arange(gh, dtype=torch.float32, device=device)
    cols = torch.arange(gw, dtype=torch.float32, device=device)
    if ref_grid is not None:  # the order of operations is timm's (equal float32 results)
        rows, cols = rows / gh * ref_grid[0], cols / gw * ref_grid[1]
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)  # (N, 2)
    angles = (coords[:, :, None] * bands).flatten(1).repeat_interleave(2, dim=1)  # (N, head_dim)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x`` (B, heads, N, head_dim) by ``rope`` ((N, 2 head_dim) from :func:`rope_2d` / :func:`rope_eva`, or
    (B, N, 2 head_dim) for a different token subset per image): x cos + rotate(x) sin, in float32 at least
    (bfloat16 activations are not rotated in bfloat16), returned in x's dtype. ``rotate`` pairs channel c with
    c + head_dim / 2 (rotate-half, DINOv3) or, ``interleaved``, channel 2c with 2c + 1 (EVA-02)."""
    sin, cos = rope.chunk(2, dim=-1)
    if rope.ndim == 3:
        sin, cos = sin.unsqueeze(1), cos.unsqueeze(1)
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    if interleaved:
        turned = torch.stack([-wide[..., 1::2], wide[..., 0::2]], dim=-1).reshape(wide.shape)
    else:
        first, second = wide.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    return (wide * cos + turned * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The normal forward calls ``scaled_dot_product_attention`` (flash / memory-efficient kernels where available); the
    explicit softmax, which exposes the attention probabilities, runs only when ``return_attention=True``. With
    ``rotary`` (a rotary-embedding model) the forward takes the rotary embedding of the patch tokens, which are the
    last rows of the sequence (the prefix tokens before them are not rotated), and the key bias is left out.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rotary: bool = False, interleaved: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.rotary = rotary
        self.interleaved = interleaved  # the rotation's channel pairs (apply_rope): EVA-02's layout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False, rope: torch.Tensor | None = None):
        B, N, D = x.shape
        # (B, N, 3D) -> (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rotary:
            q, k = self.rotate(q, k, rope)
        drop = self.attn_drop if self.training else 0.0
        if return_attention:
            probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
            out = F.dropout(probs, drop, self.training) @ v
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))
        return (out, probs) if return_attention else out

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE models: the key bias taken back out (DINOv3 masks it, EVA-02 has none), then the patch rows of q and
        k rotated."""
        if rope is None:
            raise ModelInputError("a rotary-position-embedding (pos_embed='rope') block needs the rotary embedding "
                                  "of its tokens: run it through VisionTransformer (forward, forward_features, ...)")
        linear = getattr(self.qkv, "base_layer", self.qkv)  # a LoRA wrapper keeps the layer inside
        if linear.bias is not None:
            D = self.num_heads * self.head_dim
            k = k - linear.bias[D : 2 * D].reshape(self.num_heads, 1, self.head_dim)
        p = q.shape[2] - rope.shape[-2]
        q = torch.cat([q[:, :, :p], apply_rope(q[:, :, p:], rope, self.interleaved)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rope(k[:, :, p:], rope, self.interleaved)], dim=2)
        return q, k


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def gelu_module(kind: str) -> nn.Module:
    """The activation of a ``gelu`` config value: ``exact``, ``tanh`` or ``quick``."""
    return QuickGELU() if kind == "quick" else nn.GELU(approximate="tanh" if kind == "tanh" else "none")


def _inner_norm(hidden_dim: int, norm_eps: float | None) -> nn.Module:
    """The MLP's LayerNorm over its hidden width (``mlp_norm``; a ``norm_eps`` of None: none)."""
    return nn.Identity() if norm_eps is None else nn.LayerNorm(hidden_dim, eps=norm_eps)


class Mlp(nn.Module):
    """Dense(D->M), GELU, Dense(M->D), with dropout after each dense layer as in the paper; ``norm_eps`` adds a
    LayerNorm over the hidden width before the second layer (``mlp_norm``)."""

    def __init__(self, dim: int, hidden_dim: int, gelu: str = "exact", drop: float = 0.0,
                 norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = gelu_module(gelu)
        self.drop1 = nn.Dropout(drop)
        self.norm = _inner_norm(hidden_dim, norm_eps)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class SwiGLU(nn.Module):
    """SiLU(x W_g) * (x W_v), then Dense(M->D). ``fc1`` holds W_g and W_v packed (D -> 2M, gate rows first), so
    the names and shapes are timm's ``SwiGLUPacked`` (DINOv2 ViT-g); ``norm_eps`` adds a LayerNorm over the gated
    width before ``fc2`` (``mlp_norm``, EVA-02 B/L's sub-LN)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.norm = _inner_norm(hidden_dim, norm_eps)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # (B, N, M) each
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(gate) * value))))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, learned from ``init_value`` (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples, rescaling the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)); with ``layer_scale`` each branch is scaled by
    its learned ``ls1`` / ``ls2`` before the sum."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout, rotary=cfg.rotary,
                              interleaved=cfg.rotary and cfg.rope_kind == "eva")
        self.ls1 = LayerScale(D, cfg.layer_scale) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        inner = cfg.norm_eps if cfg.mlp_norm else None
        if cfg.mlp_type == "swiglu":
            self.mlp = SwiGLU(D, cfg.mlp_dim, cfg.dropout, norm_eps=inner)
        else:
            self.mlp = Mlp(D, cfg.mlp_dim, cfg.gelu, cfg.dropout, norm_eps=inner)
        self.ls2 = LayerScale(D, cfg.layer_scale) if cfg.layer_scale else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, return_attention: bool = False, rope: torch.Tensor | None = None):
        """``rope``: the rotary embedding of the patch tokens (:meth:`VisionTransformer.rotary_embedding`), for
        ``pos_embed='rope'`` models."""
        if return_attention:
            y, probs = self.attn(self.norm1(x), return_attention=True, rope=rope)
            x = x + drop_path(self.ls1(y), self.drop_path_rate, self.training)
        else:  # one expression: the attention output is freed before the MLP allocates (the allocator reuses it)
            probs = None
            x = x + drop_path(self.ls1(self.attn(self.norm1(x), rope=rope)), self.drop_path_rate, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)
        return (x, probs) if return_attention else x


class AttentionPool(nn.Module):
    """Multi-head attention pooling (big_vision's MAP head): a learned probe (``latent``, (1, 1, D)) attends over the
    tokens with its own ``q`` and fused ``kv`` projections, ``proj`` maps the result, and an MLP on its LayerNorm is
    added: (B, N, D) -> (B, D). Names and shapes are timm's ``AttentionPoolLatent``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, gelu: str = "exact", norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, gelu)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if return_attention:
            probs = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
            out = probs @ v
        else:
            probs, out = None, F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, D))
        out = (out + self.mlp(self.norm(out)))[:, 0]  # (B, D)
        return (out, probs) if return_attention else out


class L2Norm(nn.Module):
    """Scales each feature vector to unit length (the last dimension)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class PreLogits(nn.Module):
    """The pre-training head's hidden layer: Dense(D->R) + tanh."""

    def __init__(self, dim: int, representation_size: int):
        super().__init__()
        self.fc = nn.Linear(dim, representation_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def key_bias_slices(model: nn.Module) -> list[tuple[torch.Tensor, slice]]:
    """The key-projection biases inside ``model``'s attention layers, as (bias parameter, the key part of it), for
    those that train. A key bias adds the same ``q . b_k`` to every score of a query, a shift softmax ignores, so its
    gradient is zero in exact arithmetic; what autograd returns is rounding noise, which Adam would scale up to the
    learning rate (moving weights that change nothing, and differently on different numbers of processes)."""
    found = []
    for module in model.modules():
        if isinstance(module, Attention):
            linear, part = module.qkv, 1  # fused (q, k, v)
        elif isinstance(module, AttentionPool):
            linear, part = module.kv, 0  # fused (k, v)
        else:
            continue
        bias = getattr(getattr(linear, "base_layer", linear), "bias", None)  # a LoRA wrapper keeps the layer inside
        if bias is not None and bias.requires_grad:
            dim = module.num_heads * module.head_dim
            found.append((bias, slice(part * dim, (part + 1) * dim)))
    return found


def _tracing() -> bool:
    """True inside torch.compile / torch.export / ONNX export / TorchScript tracing: no Python-side caching or
    size-dependent shortcuts there (a shortcut would fix the graph to the example's size)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    return bool(torch.compiler.is_exporting())


def take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's meaning of ``indices``: None takes all ``num_features``, an int n the last n, a sequence those positions
    (negative ones count from the end). Returns (absolute indices, largest index); out of range: ModelInputError."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ModelInputError(f"indices={indices}: the last-n count must be 1 to {num_features}")
        taken = list(range(num_features - indices, num_features))
    else:
        taken = []
        for i in indices:
            idx = num_features + int(i) if int(i) < 0 else int(i)
            if not 0 <= idx < num_features:
                raise ModelInputError(f"indices: feature index {i} is out of range for {num_features} features "
                                      f"(-{num_features} to {num_features - 1})")
            taken.append(idx)
        if not taken:
            raise ModelInputError("indices: an empty list selects no feature")
    return taken, max(taken)


class GridCache:
    """Position embeddings computed for other grids than the build grid, kept per grid (least recently used first
    out) so that repeated calls at one size cost a dictionary look-up.

    An entry is valid while the tensors it was computed from are unchanged: its stamp holds each source tensor's
    identity, storage address, in-place version counter (bumped by optimiser steps and ``load_state_dict``), device
    and dtype. Nothing is cached when the result would carry autograd history (training: the gradient must reach
    the parameters through the resampling) or inside a compiled / exported graph."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()

    @staticmethod
    def stamp(sources: Sequence[torch.Tensor]) -> tuple:
        # entries made under inference mode hold inference tensors: keep them apart from the others
        return (torch.is_inference_mode_enabled(),) + tuple(
            (id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in sources)

    def get(self, key, sources: Sequence[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        if needs_graph or _tracing() or any(t.is_inference() for t in sources):  # inference tensors: no version
            return compute()
        stamp = self.stamp(sources)
        hit = self.entries.get(key)
        if hit is not None and hit[0] == stamp:
            self.entries.move_to_end(key)
            return hit[1]
        value = compute()
        self.entries[key] = (stamp, value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


class VisionTransformer(nn.Module, ModelMetadata):
    """ViT built from a :class:`ViTConfig`. ``forward`` returns logits (B, num_classes). ``preprocessing``,
    ``class_names`` and ``loss`` are the weights' metadata (:class:`~vitlab.models.metadata.ModelMetadata`)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grad_checkpointing = False

        self.patch_embed = self.build_patch_embed(cfg)
        # prefix tokens, in sequence order: class, distillation, registers
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        gh, gw = cfg.grid_size
        if cfg.pos_embed == "learned":  # one row per token, prefix slots first (vit_jax layout) unless no_embed_class
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_pos_prefix + cfg.num_patches, D))
        elif cfg.pos_embed == "learned_2d":  # paper's 2D ablation: X and Y halves concatenated
            self.pos_embed_y = nn.Parameter(torch.zeros(gh, D // 2))
            self.pos_embed_x = nn.Parameter(torch.zeros(gw, D // 2))
        elif cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed_fixed", sincos_2d_position_embedding(cfg.grid_size, D), persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.pos_cache = GridCache()  # position embeddings for other grids (dynamic_img_size)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()

        # stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, rate) for rate in rates])
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if not cfg.norm_after_pool else nn.Identity()
        self.attn_pool = (AttentionPool(D, cfg.num_heads, cfg.mlp_dim, cfg.gelu, cfg.norm_eps)
                          if cfg.pool == "map" else None)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.norm_after_pool else nn.Identity()
        self.pre_logits = PreLogits(D, cfg.representation_size) if cfg.representation_size else nn.Identity()
        self.head_proj = (nn.Linear(cfg.representation_size or D, cfg.head_proj_dim, bias=False)
                          if cfg.head_proj_dim else nn.Identity())
        self.head_norm = L2Norm() if cfg.head_l2_norm else nn.Identity()
        self.head = self._new_head(self.head_in_features, cfg.num_classes)
        self.head_dist = self._new_head(D, cfg.num_classes) if cfg.distilled else None
        self.distilled_training = False  # timm's switch: training then returns both heads' logits
        self.init_weights()

    # ----- construction helpers
    def build_patch_embed(self, cfg: ViTConfig) -> nn.Module:
        """The module that turns images (B, C, H, W) into patch tokens (B, N, D) and has the linear map E as
        ``.proj``; hybrid models override this to put a ResNet in front of it."""
        return PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, bias=cfg.patch_bias)

    @property
    def head_in_features(self) -> int:
        """Width of the features the head reads: the projection's, else the pre-logits layer's, else D."""
        return self.cfg.head_proj_dim or self.cfg.representation_size or self.cfg.embed_dim

    @staticmethod
    def _new_head(in_features: int, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(in_features, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def init_weights(self) -> None:
        """vit_jax initialisation: dense xavier-uniform (q, k, v each on its own), MLP biases normal(1e-6), other
        biases zero, patch embedding LeCun normal, position embeddings normal(0.02), class token and head zero.
        Tokens the paper does not have start as timm starts them: registers normal(1e-6), the distillation token
        normal(0.02), the pooling probe normal(D^-0.5); LayerScale at ``cfg.layer_scale``."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.head and module is not self.head_dist:
                if name.endswith("attn.qkv"):
                    for chunk in module.weight.chunk(3, dim=0):
                        nn.init.xavier_uniform_(chunk)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    if ".mlp." in f".{name}.":
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        for name in ("pos_embed", "pos_embed_x", "pos_embed_y"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.normal_(self.dist_token, std=0.02)
        if self.attn_pool is not None:
            nn.init.normal_(self.attn_pool.latent, std=self.cfg.embed_dim**-0.5)

    def reset_head(self, num_classes: int, drop_pre_logits: bool = True) -> None:
        """Replace the head for ``num_classes`` classes, zero-initialised as in the paper's fine-tuning.

        With ``drop_pre_logits`` (the paper's choice) the pre-logits layer is removed too."""
        if drop_pre_logits and self.cfg.representation_size:
            self.pre_logits = nn.Identity()
            self.cfg = self.cfg.replace(representation_size=None)
        device = self.patch_embed.proj.weight.device
        dtype = self.patch_embed.proj.weight.dtype
        self.head = self._new_head(self.head_in_features, num_classes).to(device, dtype)
        if self.cfg.distilled:
            self.head_dist = self._new_head(self.cfg.embed_dim, num_classes).to(device, dtype)
        self.cfg = self.cfg.replace(num_classes=num_classes)

    reset_classifier = reset_head  # timm's name

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """Distilled models (timm's switch): in training mode ``forward`` then returns the (class-head,
        distillation-head) logits for a distillation loss against a teacher; otherwise, and always at inference,
        their average. vitlab's training loop switches it on when it distils from a teacher
        (:mod:`vitlab.train.distill`) and otherwise trains on the average."""
        if not self.cfg.distilled:
            raise ModelInputError("set_distilled_training needs a model built with distilled=True")
        self.distilled_training = enable

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (timm's meaning, see :meth:`forward_intermediates`) and,
        with ``prune_head``, the pre-logits layer and the head (``forward`` then returns the pooled features);
        ``prune_norm`` drops the final norm. Returns the absolute indices kept for ``forward_intermediates``."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.cfg = self.cfg.replace(depth=last + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.head_proj, self.head_norm = nn.Identity(), nn.Identity()
            self.cfg = self.cfg.replace(head_proj_dim=0, head_l2_norm=False)
            self.reset_head(0, drop_pre_logits=True)
        return taken

    @property
    def feature_info(self) -> list[dict]:
        """One entry per block, as detection / segmentation code expects: ``module`` name, ``num_chs`` channels and
        ``reduction`` (pixels per token; the stride of the block's NCHW map)."""
        rh, rw = self.cfg.reduction
        r = rh if rh == rw else (rh, rw)
        return [{"module": f"blocks.{i}", "num_chs": self.cfg.embed_dim, "reduction": r}
                for i in range(len(self.blocks))]

    def set_dynamic_img_size(self, enable: bool = True, pad: bool | None = None, resample: str | None = None) -> None:
        """Turn running at any input size on or off after construction (e.g. on a loaded checkpoint); ``pad`` sets
        ``dynamic_img_pad``, ``resample`` the position-embedding method (:mod:`vitlab.models.resample`)."""
        changes = {"dynamic_img_size": enable}
        if pad is not None:
            changes["dynamic_img_pad"] = pad
        if resample is not None:
            changes["dynamic_resample"] = resample
        try:
            self.cfg = self.cfg.replace(**changes)
        except ValueError as exc:
            raise ModelInputError(str(exc)) from None
        self.pos_cache.clear()

    # ----- input size
    def input_grid(self, x: torch.Tensor, dynamic_img_size: bool | None = None) -> tuple[int, int]:
        """The token grid (rows, columns) for images ``x`` (B, C, H, W). Without ``dynamic_img_size`` (the config's
        value unless given) only the build size is accepted; with it any size that is a multiple of the patch, or
        any size at all with ``dynamic_img_pad`` (the grid is then rounded up). Raises :class:`ModelInputError`."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_chans:
            raise ModelInputError(f"expected input of shape (B, {cfg.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        (rh, rw), unit = cfg.reduction, "patch" if cfg.reduction == cfg.patch_size else "token (stride x patch)"
        if H < rh or W < rw:
            raise ModelInputError(f"input {H}x{W} is smaller than one {rh}x{rw} {unit}")
        dynamic = cfg.dynamic_img_size if dynamic_img_size is None else dynamic_img_size
        if not dynamic:
            if (H, W) != cfg.img_size:
                raise ModelInputError(f"expected input of shape (B, {cfg.in_chans}, {cfg.img_size[0]}, "
                                      f"{cfg.img_size[1]}), got {tuple(x.shape)}; build the model with "
                                      "dynamic_img_size=True (or pass dynamic_img_size=True) to run at other sizes")
            return cfg.grid_size
        if cfg.dynamic_img_pad:
            return (-(-H // rh), -(-W // rw))
        if (H % rh or W % rw) and not cfg.drop_remainder:
            raise ModelInputError(f"input {H}x{W} is not a multiple of the {rh}x{rw} {unit}; build the model with "
                                  "dynamic_img_pad=True to pad it")
        return (H // rh, W // rw)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """With ``dynamic_img_pad``: zero-pad (B, C, H, W) at the bottom and right up to a multiple of the patch."""
        if not self.cfg.dynamic_img_pad:
            return x
        (rh, rw), (H, W) = self.cfg.reduction, x.shape[-2:]
        return F.pad(x, (0, (rw - W % rw) % rw, 0, (rh - H % rh) % rh))

    # ----- forward
    def position_embedding(self, grid_size: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The position embedding for the patch tokens, (1, N, D), or for all tokens (1, prefix + N, D) for
        ``learned`` with prefix tokens and without ``no_embed_class`` (``cfg.num_pos_prefix`` rows first); None when
        there is none. ``grid_size`` other than the build grid: the learned grid resampled with
        ``cfg.dynamic_resample`` (prefix rows unchanged), a sin-cos embedding computed for it; cached per grid (see
        :class:`GridCache`)."""
        kind, build = self.cfg.pos_embed, self.cfg.grid_size
        grid = build if grid_size is None else tuple(grid_size)
        if kind in ("none", "rope"):  # rope: positions enter the attention instead (rotary_embedding)
            return None
        if grid == build and not _tracing():
            return self._position_embedding_for(build)
        sources = [getattr(self, n) for n in ("pos_embed", "pos_embed_y", "pos_embed_x", "pos_embed_fixed")
                   if getattr(self, n, None) is not None]
        return self.pos_cache.get(grid, sources, lambda: self._position_embedding_for(grid))

    def _position_embedding_for(self, grid: tuple[int, int]) -> torch.Tensor:
        cfg, (gh, gw) = self.cfg, grid
        same = grid == cfg.grid_size and not _tracing()
        if cfg.pos_embed == "learned":
            if same:
                return self.pos_embed
            p = cfg.num_pos_prefix
            prefix, rows = self.pos_embed[:, :p], self.pos_embed[0, p:]
            resampled = resample_grid(rows.reshape(*cfg.grid_size, -1), grid, cfg.dynamic_resample)
            return torch.cat([prefix, resampled.reshape(1, gh * gw, -1)], dim=1)
        if cfg.pos_embed == "learned_2d":
            y, x = self.pos_embed_y, self.pos_embed_x
            if not same:  # each axis table (n, D2) resampled as an (n, 1) grid
                y = resample_grid(y[:, None], (gh, 1), cfg.dynamic_resample)[:, 0]
                x = resample_grid(x[:, None], (gw, 1), cfg.dynamic_resample)[:, 0]
            D2 = cfg.embed_dim // 2
            return torch.cat([y[:, None, :].expand(gh, gw, D2), x[None, :, :].expand(gh, gw, D2)],
                             dim=-1).reshape(1, gh * gw, 2 * D2)
        fixed = self.pos_embed_fixed  # sincos: exact for any grid, no interpolation needed
        if not same:
            fixed = sincos_2d_position_embedding((gh, gw), cfg.embed_dim).to(fixed)
        return fixed.unsqueeze(0)

    def embed(self, x: torch.Tensor, dynamic_img_size: bool | None = None) -> torch.Tensor:
        """Patch embedding, class token and position embedding: (B, C, H, W) -> (B, N + prefix, D)."""
        grid = self.input_grid(x, dynamic_img_size)
        return self.embed_tokens(self.patch_embed(self.pad_input(x)), grid)

    def embed_tokens(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix tokens and position embedding added to patch embeddings: (B, N, D) -> (B, prefix + N, D), N the
        tokens of ``grid_size`` (default: the build grid), then ``norm_pre``. (Masked patch prediction corrupts the
        patch embeddings between the two halves of :meth:`embed`.) ``keep`` (B, K) int64: only these patch tokens
        go on, after their position embedding is added (a masked autoencoder's visible patches): (B, prefix + K, D)."""
        pos = self.position_embedding(grid_size)
        with_prefix = pos is not None and self.cfg.num_pos_prefix > 0
        if keep is not None:
            p = self.cfg.num_pos_prefix if with_prefix else 0
            if pos is not None:
                x = x + pos[:, p:]
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            prefix = self.prefix_tokens()
            if prefix:
                lead = torch.cat(prefix, dim=1)
                lead = lead + pos[:, :p] if with_prefix else lead
                x = torch.cat([lead.expand(x.shape[0], -1, -1), x], dim=1)
            return self.norm_pre(self.pos_drop(x))
        if pos is not None and not with_prefix:
            x = x + pos  # patch-only embedding: prefix tokens get none (they are learned themselves)
        prefix = [t.expand(x.shape[0], -1, -1) for t in self.prefix_tokens()]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        if with_prefix:
            x = x + pos
        return self.norm_pre(self.pos_drop(x))

    def rotary_embedding(self, grid_size: tuple[int, int] | None = None,
                         keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """Rotary models (``pos_embed='rope'`` or ``rope_kind='eva'``): the rotary embedding of the patch tokens of
        ``grid_size`` (default: the build grid), (N, 2 head_dim) (:func:`rope_2d`, :func:`rope_eva`), which every
        block's attention applies; with ``keep`` (B, K) int64 the rows of those patches only, (B, K, 2 head_dim). In
        training mode DINOv3's coordinate augmentations are drawn (once per call: every block sees the same
        positions). None for the other kinds."""
        cfg = self.cfg
        if not cfg.rotary:
            return None
        grid = cfg.grid_size if grid_size is None else tuple(grid_size)
        if cfg.rope_kind == "eva":
            rope = rope_eva(grid, cfg.embed_dim // cfg.num_heads, cfg.rope_base, cfg.rope_ref_grid,
                            device=self.patch_embed.proj.weight.device)
            return rope if keep is None else rope[keep]
        augment = dict(shift=cfg.rope_shift, jitter=cfg.rope_jitter, rescale=cfg.rope_rescale) if self.training \
            else {}
        rope = rope_2d(grid, cfg.embed_dim // cfg.num_heads, cfg.rope_base, device=self.patch_embed.proj.weight.device,
                       **augment)
        return rope if keep is None else rope[keep]

    def prefix_tokens(self) -> list[torch.Tensor]:
        """The learned prefix tokens in sequence order (class (1, 1, D), distillation (1, 1, D), registers
        (1, n, D)); those the model has."""
        return [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]

    def run_block(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """One encoder block, recomputed in the backward pass when gradient checkpointing is on; ``rope``: the
        rotary embedding of the patch tokens (:meth:`rotary_embedding`; None for the other position embeddings)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, rope=rope)
        return block(x, rope=rope)

    def forward_features(self, x: torch.Tensor, dynamic_img_size: bool | None = None) -> torch.Tensor:
        """Tokens after the encoder (and the final norm unless it comes after pooling): (B, N + prefix, D)."""
        rope = self.rotary_embedding(self.input_grid(x, dynamic_img_size))
        x = self.embed(x, dynamic_img_size)
        for block in self.blocks:
            x = self.run_block(block, x, rope)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        dynamic_img_size: bool | None = None,
    ):
        """The outputs of chosen blocks, with timm's interface and meaning.

        ``indices``: None for every block, an int n for the last n, a sequence of block indices (negative from the
        end). ``norm`` applies the final norm to each. ``output_fmt``: ``NCHW`` maps (B, D, gh, gw) or ``NLC`` tokens
        (B, gh*gw, D), prefix tokens removed either way; ``return_prefix_tokens`` pairs each with its prefix tokens
        (B, prefix, D). ``stop_early`` skips the blocks after the last index (the final output is then not the
        model's). Returns ``(final tokens after the norm, intermediates)``, only the list with
        ``intermediates_only``, or with ``output_dict`` a dict with ``image_intermediates``,
        ``image_intermediates_prefix`` (when asked) and ``image_features`` (unless ``intermediates_only``)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ModelInputError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, last = take_indices(len(self.blocks), indices)
        grid = self.input_grid(x, dynamic_img_size)
        rope = self.rotary_embedding(grid)
        x = self.embed(x, dynamic_img_size)
        intermediates = []
        for i, block in enumerate(self.blocks[: last + 1] if stop_early else self.blocks):
            x = self.run_block(block, x, rope)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in intermediates]
        intermediates = [y[:, p:] for y in intermediates]  # (B, gh*gw, D)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if return_prefix_tokens and p:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and p:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D): the class token (distilled: the mean of the class and distillation tokens,
        timm's pre-logits), the mean of the patch tokens, or the attention-pooling head over the patch tokens."""
        p = self.num_prefix_tokens
        if self.cfg.pool == "token":
            return (x[:, 0] + x[:, 1]) / 2 if self.cfg.distilled else x[:, 0]
        if self.cfg.pool == "map":
            return self.attn_pool(x[:, p:])
        return x[:, p:].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Pool the tokens, then fc_norm / pre-logits / head. ``pre_logits=True`` returns the representation the head
        sees (B, R or D) instead of logits. Distilled models: the mean of the two heads' logits (a pair of logits
        in training mode after :meth:`set_distilled_training`)."""
        if self.cfg.distilled and not pre_logits:
            logits, logits_dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
            if self.distilled_training and self.training:
                return logits, logits_dist
            return (logits + logits_dist) / 2
        x = self.pre_logits(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.classify(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The head on pre-logits features (B, R or D): projection and L2 norm where the config has them, then the
        linear classifier."""
        return self.head(self.head_norm(self.head_proj(features)))

    def forward(self, x: torch.Tensor, dynamic_img_size: bool | None = None) -> torch.Tensor:
        """Logits (B, num_classes). ``dynamic_img_size=True`` runs this call at the input's size even when the model
        was built without it."""
        return self.forward_head(self.forward_features(x, dynamic_img_size))

    def forward_with_attention(self, x: torch.Tensor, dynamic_img_size: bool | None = None,
                               return_pool_attention: bool = False):
        """Logits and every layer's attention probabilities, a list of ``depth`` tensors (B, heads, T, T) where
        T = tokens of the input's grid + prefix tokens. Uses the explicit softmax; the normal forward is not
        affected. ``return_pool_attention`` (``pool='map'`` models) adds a third element: the pooling probe's
        attention over the patch tokens, (B, heads, 1, N)."""
        rope = self.rotary_embedding(self.input_grid(x, dynamic_img_size))
        x = self.embed(x, dynamic_img_size)
        maps = []
        for block in self.blocks:
            x, probs = block(x, return_attention=True, rope=rope)
            maps.append(probs)
        x = self.norm(x)
        if not return_pool_attention:
            return self.forward_head(x), maps
        if self.attn_pool is None:
            raise ModelInputError("return_pool_attention needs a model with pool='map'")
        pooled, probe = self.attn_pool(x[:, self.num_prefix_tokens :], return_attention=True)
        logits = self.classify(self.pre_logits(self.fc_norm(pooled)))
        return logits, maps, probe

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (buffers such as a fixed sin-cos embedding excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
