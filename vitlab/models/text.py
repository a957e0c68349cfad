"""The text tower of a two-tower image-text model (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023).

A pre-norm transformer over token embeddings plus a learned position embedding, a final LayerNorm, one position
pooled and an optional linear projection into the joint embedding space:

- CLIP: causal self-attention (each token sees itself and the tokens before it), QuickGELU (OpenAI) or exact GELU
  (OpenCLIP's LAION models), the end-of-text token's position pooled (``pool='eos'``), a projection without bias;
- SigLIP: bidirectional attention over text padded to a fixed length, tanh GELU, the last position pooled
  (``pool='last'``), a projection with bias (transformers' ``text_model.head``).

The blocks reuse the image tower's MLP and GELU kinds (:mod:`vitlab.models.vit`); the state-dict names follow the
image tower's (``blocks.{i}.attn.qkv``, ``blocks.{i}.mlp.fc1``, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError
from .vit import Mlp, _tracing

TEXT_POOLS = ("eos", "argmax", "last", "first")
GELU_KINDS = ("exact", "tanh", "quick")


@dataclass(frozen=True)
class TextConfig:
    """The text tower's architecture. ``proj_dim`` 0: no projection (the pooled width is ``embed_dim``).

    ``pool``: ``eos`` pools the first position holding ``eos_id`` (transformers' CLIP; with ``eos_id=None`` the
    highest token id, as OpenAI's CLIP, whose end-of-text token has the largest id); ``argmax`` always the highest
    token id; ``last`` the last position (SigLIP, whose text is padded to ``context_length``); ``first`` the first."""

    vocab_size: int = 49408
    context_length: int = 77
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    causal: bool = True
    pool: str = "eos"
    gelu: str = "quick"
    norm_eps: float = 1e-5
    proj_dim: int = 512
    proj_bias: bool = False
    pad_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self) -> None:
        errors = []
        for name in ("vocab_size", "context_length", "embed_dim", "depth", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                errors.append(f"{name} must be a positive int, got {value!r}")
        if not errors and self.embed_dim % self.num_heads:
            errors.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pool not in TEXT_POOLS:
            errors.append(f"pool must be one of {', '.join(TEXT_POOLS)}, got {self.pool!r}")
        if self.gelu not in GELU_KINDS:
            errors.append(f"gelu must be one of {', '.join(GELU_KINDS)}, got {self.gelu!r}")
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or self.proj_dim < 0:
            errors.append(f"proj_dim must be an int >= 0, got {self.proj_dim!r}")
        if not self.norm_eps > 0:
            errors.append(f"norm_eps must be > 0, got {self.norm_eps!r}")
        for name in ("pad_id", "eos_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                errors.append(f"{name} must be None or a token id >= 0, got {value!r}")
        if errors:
            raise InvalidValueError("invalid text config: " + "; ".join(errors))

    @property
    def out_dim(self) -> int:
        """The width of the pooled (projected) output."""
        return self.proj_dim or self.embed_dim

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TextConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so that typos are not ignored."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidValueError(f"unknown text config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> TextConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise InvalidValueError(f"unknown text config keys: {', '.join(unknown)}")
        return replace(self, **changes)


class TextAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (the image tower's names), causal or not."""

    def __init__(self, dim: int, num_heads: int, causal: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.causal = num_heads, dim // num_heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class TextBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = TextAttention(cfg.embed_dim, cfg.num_heads, cfg.causal)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim, gelu=cfg.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Token ids (B, L) -> one pooled, projected (not normalised) vector per text (B, ``cfg.out_dim``).

    ``L`` may be shorter than ``cfg.context_length`` (the first ``L`` positions are used)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.embed_dim))
        self.blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.embed_dim, cfg.proj_dim, bias=cfg.proj_bias) if cfg.proj_dim else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's initialisation: token embedding N(0, 0.02), position embedding N(0, 0.01), attention and MLP
        weights scaled by width and depth, the projection N(0, width^-0.5); biases zero."""
        width, depth = self.cfg.embed_dim, self.cfg.depth
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(layer.bias)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=width**-0.5)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """One-line errors for token tensors the tower cannot read."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
                or tokens.dtype == torch.bool:
            what = f"a {tuple(tokens.shape)} {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) \
                else f"a {type(tokens).__name__}"
            raise InvalidValueError(f"text tokens must be an integer tensor (batch, length), got {what}")
        length = tokens.shape[1]
        if isinstance(length, int) and not 0 < length <= self.cfg.context_length:
            raise InvalidValueError(f"text tokens of length {length}: the text tower reads 1 to "
                                    f"{self.cfg.context_length} positions")
        if _tracing():  # the value check reads the tensor: not inside a compiled or exported graph
            return
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise InvalidValueError(f"text token ids must be in [0, {self.cfg.vocab_size}), got "
                                    f"[{int(tokens.min())}, {int(tokens.max())}]")

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position pooled in each row (B,)."""
        pool, B, L = self.cfg.pool, tokens.shape[0], tokens.shape[1]
        if pool == "last":
            return torch.full((B,), L - 1, dtype=torch.long, device=tokens.device)
        if pool == "first":
            return torch.zeros(B, dtype=torch.long, device=tokens.device)
        if pool == "eos" and self.cfg.eos_id is not None:
            # the first end-of-text position (the padding may use the same id); argmax of a bool picks the first True
            return (tokens == self.cfg.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> the final-norm token features (B, L, embed_dim)."""
        self.check_tokens(tokens)
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        index = self.pool_index(tokens)
        if self.cfg.causal and self.cfg.pool in ("eos", "argmax") and not torch.jit.is_tracing() \
                and not torch.compiler.is_compiling():
            # causal attention: no position sees the ones after it, so the positions after the last pooled one
            # (padding up to the context length) change nothing; leaving them out makes a short prompt ~10x cheaper
            tokens = tokens[:, : int(index.max()) + 1]
        x = self.forward_features(tokens)
        pooled = x[torch.arange(x.shape[0], device=x.device), index]
        return self.proj(pooled)
