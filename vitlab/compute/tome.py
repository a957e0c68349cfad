"""Token merging (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster") on a built ViT, without retraining.

After each block's attention, the patch tokens are split alternately into two sets A and B; each A token is joined
by an edge to the B token whose key (averaged over the heads) is the most cosine-similar, and the ``r`` A tokens with
the most similar edges are merged into their B partners by a size-weighted average. A block then runs its MLP, and
every later block its attention, on ``r`` fewer tokens. Each token remembers how many patches it stands for (its
size); attention adds ``log(size)`` to the logits of its key ("proportional attention"), so a merged token is
attended to as much as the copies it replaced, and average pooling weights the tokens by size. The prefix tokens
(class, distillation, registers) are never merged. ``r`` is clamped per block so that at most half of the remaining
patch tokens go (A's size).

:func:`merge_tokens` switches it on in place (the model's class becomes a subclass that overrides
``forward_features`` and ``pool``; parameters, buffers and the state dict stay as they are) and ``r=0`` switches it
off again, after which the model is exactly the one it was. ``forward_intermediates`` and ``forward_with_attention``
keep every token (they return per-patch maps), as do training wrappers that call the blocks themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError, VitlabError
from ..models import has_tokens
from ..models.vit import Attention, AttentionPool, Block, VisionTransformer, drop_path

# merging class -> the model class it extends, and back (one merging class per model class)
_ORIGINAL: dict[type, type] = {}
_MERGING: dict[type, type] = {}


def bipartite_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of tokens ``metric`` (B, M, C): set A is the even positions, B the odd ones; each A
    token's edge goes to its most cosine-similar B token, and the ``r`` most similar edges are kept. Returns
    ``(kept, merged, into)``, (B, |A| - r), (B, r) and (B, r): the A indices that stay, the A indices merged away
    (most similar first) and the B index each of those goes into."""
    metric = F.normalize(metric, dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|) cosine similarities
    best, partner = scores.max(dim=-1)  # (B, |A|)
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    return order[:, r:], merged, partner.gather(1, merged)


def merge_matched(x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor, merged: torch.Tensor, into: torch.Tensor,
                  prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens ``x`` (B, N, D) of sizes ``size`` (B, N, 1) as :func:`bipartite_matching` chose for the tokens
    after the first ``prefix``: each merged A token is averaged into its B token, weighted by size. Returns the
    prefix tokens, the kept A tokens and the B tokens, (B, N - r, D), and their sizes (B, N - r, 1)."""
    B, N, D = x.shape
    half = (N - prefix) // 2  # |B|
    positions = torch.cat([torch.arange(prefix, device=x.device).expand(B, prefix), prefix + 2 * kept,
                           torch.arange(prefix + 1, N, 2, device=x.device).expand(B, half)], dim=1)  # (B, N - r)
    out = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, D))
    src_size = size.gather(1, (prefix + 2 * merged).unsqueeze(-1))  # (B, r, 1)
    dst = (prefix + kept.shape[1] + into).unsqueeze(-1)  # where each merged token's partner sits in `out`
    out_size = size.gather(1, positions.unsqueeze(-1)).scatter_add(1, dst, src_size)
    # (s_b x_b + sum s_a x_a) / (s_b + sum s_a) = x_b + sum s_a (x_a - x_b) / (s_b + sum s_a): only the r merged
    # rows are computed and added (the whole sequence is not scaled by its sizes and back)
    src, partner = (x.gather(1, (prefix + offset + 2 * idx).unsqueeze(-1).expand(-1, -1, D))
                    for offset, idx in ((0, merged), (1, into)))
    step = (src - partner) * (src_size / out_size.gather(1, dst))
    return out.scatter_add_(1, dst.expand(-1, -1, D), step), out_size


def proportional_attention(attn: Attention, x: torch.Tensor,
                           size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn``'s forward on tokens ``x`` (B, N, D) of sizes ``size`` (B, N, 1; None: all 1), with ``log(size)``
    added to every query's logit for that key. Returns the output (B, N, D) and the keys averaged over the heads,
    (B, N, head_dim), the similarity that matching uses."""
    B, N, D = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None if size is None else size.log().reshape(B, 1, 1, N).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop if attn.training else 0.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, D))), k.mean(dim=1)


def merging_block(block: Block, x: torch.Tensor, size: torch.Tensor | None, r: int,
                  prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder block with token merging: attention (proportional to ``size``), then up to ``r`` of the patch
    tokens merged (at most half of them; the first ``prefix`` tokens never), then the MLP. Returns the tokens
    (B, N - r, D) and their sizes (None while nothing has been merged)."""
    y, keys = proportional_attention(block.attn, block.norm1(x), size)
    x = x + drop_path(block.ls1(y), block.drop_path_rate, block.training)
    r = min(r, (x.shape[1] - prefix) // 2)
    if r > 0:
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        x, size = merge_matched(x, size, *bipartite_matching(keys[:, prefix:], r), prefix=prefix)
    x = x + drop_path(block.ls2(block.mlp(block.norm2(x))), block.drop_path_rate, block.training)
    return x, size


def pool_with_sizes(pool: AttentionPool, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """The attention-pooling head over tokens ``x`` (B, N, D) with proportional attention: (B, D)."""
    B, N, D = x.shape
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, 1, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(B, N, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None if size is None else size.log().reshape(B, 1, 1, N).to(q.dtype)
    out = pool.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, 1, D))
    return (out + pool.mlp(pool.norm(out)))[:, 0]


class TokenMerging:
    """The methods a model with token merging overrides; :func:`merge_tokens` puts this class in front of the
    model's own class. ``merge_r`` holds ``r`` per block; ``merged_sizes`` the sizes of the patch tokens that the
    last ``forward_features`` returned (B, N, 1), which ``pool`` weights by (None: nothing was merged), so that
    ``forward_head(forward_features(x))`` (features, pre-logits) works as on the unmerged model; as with the
    reference implementation, one model object runs one forward at a time (``vitlab serve`` runs its model on one
    thread)."""

    merge_r: tuple[int, ...]
    merged_sizes: torch.Tensor | None

    @property
    def architecture(self) -> str:
        """The model's own class name (what model cards show; merging is a switch on it, not another model)."""
        return _ORIGINAL[type(self)].__name__

    def forward_features(self, x: torch.Tensor, dynamic_img_size: bool | None = None) -> torch.Tensor:
        """Tokens after the encoder with ``r`` tokens merged per block: (B, prefix + N', D)."""
        x = self.embed(x, dynamic_img_size)
        size = None
        for block, r in zip(self.blocks, self.merge_r):
            x, size = merging_block(block, x, size, r, self.num_prefix_tokens)
        self.merged_sizes = None if size is None else size[:, self.num_prefix_tokens :]
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """As the model's pool, with the patch tokens weighted by their sizes (mean and attention pooling)."""
        p, size = self.num_prefix_tokens, self.merged_sizes
        if size is None or self.cfg.pool == "token" or size.shape[:2] != (x.shape[0], x.shape[1] - p):
            return super().pool(x)
        if self.cfg.pool == "map":
            return pool_with_sizes(self.attn_pool, x[:, p:], size)
        return (x[:, p:] * size).sum(dim=1) / size.sum(dim=1)


def merge_schedule(model: nn.Module, r: int | Sequence[int]) -> tuple[int, ...]:
    """``r`` as one count per block of ``model``: an int for every block, or a list with one int per block."""
    depth = len(model.blocks)
    if isinstance(r, bool) or not isinstance(r, (int, Sequence)) or isinstance(r, str):
        raise InvalidValueError(f"r must be an int or a list of {depth} ints, got {r!r}", options=("r",))
    schedule = (r,) * depth if isinstance(r, int) else tuple(r)
    if len(schedule) != depth:
        raise InvalidValueError(f"r lists {len(schedule)} counts but the model has {depth} blocks", options=("r",))
    for value in schedule:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidValueError(f"r must be tokens to merge per block (ints >= 0), got {value!r}", options=("r",))
    return schedule


def merge_tokens(model: nn.Module, r: int | Sequence[int]) -> nn.Module:
    """Switch token merging on for ``model`` (a ViT or hybrid ViT), in place, removing ``r`` tokens per block (an
    int, or a list with one int per block; clamped per block to half the remaining patch tokens); ``r=0`` (or all
    zeros) switches it off, leaving the model exactly as it was. Returns ``model``. Only the class changes: the
    weights and the state dict stay the same (switch it off before saving the model). Raises
    :class:`~vitlab.errors.VitlabError` for a model without tokens and :class:`~vitlab.errors.InvalidValueError`
    for a bad ``r``."""
    if not isinstance(model, VisionTransformer):
        cfg = getattr(model, "cfg", None)
        why = ("has no tokens to merge (a convolutional network)" if cfg is not None and not has_tokens(cfg) else
               "is not a vitlab ViT (an exported model runs as it was exported)")
        raise VitlabError(f"r={r!r}: token merging needs a ViT or hybrid ViT; a {type(model).__name__} {why}",
                          options=("r",))
    schedule = merge_schedule(model, r)
    if any(schedule) and getattr(model.cfg, "rotary", False):
        raise VitlabError(f"r={r!r}: token merging cannot keep rotary position embeddings (pos_embed='rope' or "
                          "rope_kind='eva': DINOv3, EVA-02): a merged token has no single position to rotate by",
                          options=("r",))
    original = _ORIGINAL.get(type(model), type(model))
    if not any(schedule):
        model.__class__ = original
        model.__dict__.pop("merge_r", None)
        model.__dict__.pop("merged_sizes", None)
        return model
    merging = _MERGING.get(original)
    if merging is None:
        merging = type(f"TokenMerging{original.__name__}", (TokenMerging, original), {"__module__": __name__})
        _MERGING[original], _ORIGINAL[merging] = merging, original
    model.__class__ = merging
    model.merge_r = schedule
    model.merged_sizes = None
    return model


def token_counts(model: nn.Module, grid_size: tuple[int, int] | None = None, r: int | Sequence[int] | None = None,
                 ) -> list[int]:
    """The tokens (prefix tokens included) that enter each block of ``model`` and leave the last one, for inputs of
    ``grid_size`` (default: the model's grid) with ``r`` per block (default: the model's current merging, none if
    it is off): ``depth + 1`` counts."""
    schedule = merge_schedule(model, getattr(model, "merge_r", 0) if r is None else r)
    grid = grid_size or model.cfg.grid_size
    prefix = model.num_prefix_tokens
    counts = [prefix + grid[0] * grid[1]]
    for value in schedule:
        counts.append(counts[-1] - min(value, (counts[-1] - prefix) // 2))
    return counts
