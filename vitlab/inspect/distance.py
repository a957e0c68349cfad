"""Mean attention distance (paper Fig. 7 right, Fig. 11): how far, in pixels, each head looks."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def patch_centre_distances(grid_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of every two patches: (N, N), row-major grid order."""
    (gh, gw), (ph, pw) = grid_size, patch_size
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64) * ph, torch.arange(gw, dtype=torch.float64) * pw,
                          indexing="ij")
    centres = torch.stack([y.reshape(-1), x.reshape(-1)], dim=1)  # the half-patch offset cancels in differences
    return torch.cdist(centres, centres)


def attention_layers(attn_maps: Sequence[torch.Tensor] | torch.Tensor, num_tokens: int) -> list[torch.Tensor]:
    """Per-layer attention maps as a list of (B, heads, T, T) tensors, checked against the expected token count T.

    Accepts the list ``model.forward_with_attention`` returns or one stacked (L, B, heads, T, T) tensor."""
    layers = list(attn_maps)
    if not layers:
        raise ValueError("no attention maps given")
    first = tuple(layers[0].shape)
    for layer in layers:
        shape = tuple(layer.shape)
        if len(shape) != 4 or shape[-1] != shape[-2] or shape != first:
            raise ValueError(f"expected one (B, heads, T, T) attention tensor per layer, all one shape; got {shape}")
    if first[-1] != num_tokens:
        raise ValueError(f"attention over {first[-1]} tokens, but the grid and prefix tokens make {num_tokens}")
    return layers


def mean_attention_distance(
    attn_maps: Sequence[torch.Tensor] | torch.Tensor,
    grid_size: tuple[int, int],
    patch_size: tuple[int, int],
    num_prefix_tokens: int = 1,
    renormalize: bool = True,
    per_image: bool = False,
) -> torch.Tensor:
    """Attention-weighted distance between query and key patch centres, in pixels, averaged over patch queries.

    ``attn_maps``: one (B, heads, T, T) probability tensor per layer (``model.forward_with_attention``), T = prefix
    tokens + gh * gw. Prefix tokens have no position, so only patch queries and patch keys count; with ``renormalize``
    each query's attention over the patch keys is rescaled to sum to 1 (a proper weighted mean), otherwise attention to
    prefix tokens counts as distance 0. Returns (layers, heads) averaged over the images, or (B, layers, heads) with
    ``per_image``.
    """
    num_patches = grid_size[0] * grid_size[1]
    layers = attention_layers(attn_maps, num_prefix_tokens + num_patches)
    dist = patch_centre_distances(grid_size, patch_size).to(layers[0].device)
    per_layer = []
    for layer in layers:  # one layer at a time keeps the float64 copy small
        patches = layer[..., num_prefix_tokens:, num_prefix_tokens:].to(torch.float64)  # (B, H, N, N)
        weighted = (patches * dist).sum(dim=-1)  # (B, H, N): per query
        if renormalize:
            weighted = weighted / patches.sum(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
        per_layer.append(weighted.mean(dim=-1))
    per_query_mean = torch.stack(per_layer, dim=1)  # (B, L, H)
    result = per_query_mean if per_image else per_query_mean.mean(dim=0)
    return result.float().cpu()
