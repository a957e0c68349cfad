"""Attention rollout (Abnar & Zuidema 2020; paper Fig. 6 and Fig. 14): where the prediction draws its information from.

Each layer's attention is fused over heads, optionally thinned, re-normalised and mixed half-and-half with the
identity (the residual path); the product of these matrices over the layers says how much each input token contributes
to each output token. Batched, any number of prefix tokens, any grid shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError
from .distance import attention_layers

HeadFusion = Literal["mean", "max", "min"]
RolloutSource = Literal["class", "mean", "probe"]


def rollout_matrix(
    attn_maps: Sequence[torch.Tensor] | torch.Tensor,
    num_prefix_tokens: int = 1,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """The full rollout, (B, T, T), rows summing to 1: ``A_L @ ... @ A_1`` with ``A_l = (W_l + I) / 2``.

    ``W_l`` is layer l's attention (B, heads, T, T) fused over heads (``mean``, ``max`` or ``min``), with the lowest
    ``discard_ratio`` share of each query's attentions to patch keys set to zero (attention to prefix tokens is always
    kept), then re-normalised so that each row sums to 1. Computed in float64.
    """
    if head_fusion not in ("mean", "max", "min"):
        raise InvalidValueError(f"head_fusion must be mean, max or min, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise InvalidValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    layers = list(attn_maps)
    if not layers:
        raise ValueError("no attention maps given")
    num_tokens = layers[0].shape[-1]
    layers = attention_layers(layers, num_tokens)
    if not 0 <= num_prefix_tokens < num_tokens:
        raise ValueError(f"num_prefix_tokens {num_prefix_tokens} does not fit attention over {num_tokens} tokens")
    batch = layers[0].shape[0]
    identity = torch.eye(num_tokens, dtype=torch.float64, device=layers[0].device)
    rollout = identity.expand(batch, num_tokens, num_tokens)
    num_discard = int(discard_ratio * (num_tokens - num_prefix_tokens))
    for layer in layers:
        layer = layer.to(torch.float64)
        if head_fusion == "mean":
            fused = layer.mean(dim=1)
        elif head_fusion == "max":
            fused = layer.amax(dim=1)
        else:
            fused = layer.amin(dim=1)  # (B, T, T)
        if num_discard:
            patch_keys = fused[..., num_prefix_tokens:]
            lowest = patch_keys.topk(num_discard, dim=-1, largest=False).indices
            fused = torch.cat([fused[..., :num_prefix_tokens], patch_keys.scatter(-1, lowest, 0.0)], dim=-1)
        fused = fused / fused.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        rollout = 0.5 * (fused + identity) @ rollout
    return rollout


def attention_rollout(
    attn_maps: Sequence[torch.Tensor] | torch.Tensor,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    source: RolloutSource = "class",
    probe: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rollout as a map over the patch grid: (B, gh, gw), non-negative, float32.

    ``source='class'`` takes the class token's row (the first prefix token; what a ``pool='token'`` model classifies
    from); ``source='mean'`` averages the rows of the patch tokens (what a ``pool='gap'`` model classifies from).
    Entries are the shares of the source's information that come from each patch; they sum to at most 1 (the rest
    comes from prefix tokens). ``source='probe'`` starts from the attention-pooling probe of a ``pool='map'`` model:
    ``probe`` (B, heads, 1, gh*gw) is its attention over the last layer's patch tokens (fused over heads like the
    layers), which plays the class token's row. See :func:`rollout_matrix` for ``head_fusion`` and ``discard_ratio``.
    """
    gh, gw = grid_size
    if source not in ("class", "mean", "probe"):
        raise InvalidValueError(f"source must be 'class', 'mean' or 'probe', got {source!r}")
    if source == "class" and num_prefix_tokens < 1:
        raise InvalidValueError("source='class' needs a class token (num_prefix_tokens >= 1); use source='mean'")
    if source == "probe" and (probe is None or probe.ndim != 4 or probe.shape[-1] != gh * gw):
        raise InvalidValueError(f"source='probe' needs the probe's attention (B, heads, 1, {gh * gw})")
    layers = attention_layers(attn_maps, num_prefix_tokens + gh * gw)
    full = rollout_matrix(layers, num_prefix_tokens, head_fusion, discard_ratio)
    if source == "probe":
        fused = {"mean": probe.mean, "max": probe.amax, "min": probe.amin}[head_fusion](dim=1)[:, 0].double()
        fused = fused / fused.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)  # (B, N)
        rows = (fused.unsqueeze(1) @ full[:, num_prefix_tokens:])[:, 0]  # (B, T): the probe reads patch outputs
    else:
        rows = full[:, 0] if source == "class" else full[:, num_prefix_tokens:].mean(dim=1)  # (B, T)
    return rows[:, num_prefix_tokens:].reshape(-1, gh, gw).float()


def upsample_map(maps: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """(B, gh, gw) patch maps -> (B, H, W) pixel maps by bilinear interpolation, for overlaying on the input.

    With ``normalize`` each map is divided by its maximum first, so values lie in [0, 1] (an all-zero map stays 0)."""
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (B, gh, gw), got {tuple(maps.shape)}")
    maps = maps.float()
    if normalize:
        peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        maps = maps / peak[:, None, None]
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
