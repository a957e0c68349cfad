"""Analytic compute of a ViT forward pass (paper section 4.4).

Counts multiply-accumulates (MACs) of the matrix products only, as the paper does; one MAC is two FLOPs.
Per image, with g = grid cells, N = tokens (class token included), D width, M MLP size, L depth:

    MACs = g P^2 C D  +  L (4 N D^2 + 2 N^2 D + 2 N D M)  +  head

(4 N D^2: q, k, v and output projections; 2 N^2 D: scores and weighted sum; 2 N D M: the two MLP layers.)
"""

from __future__ import annotations

from ..models.vit import ViTConfig


def forward_macs(cfg: ViTConfig, include_head: bool = True) -> int:
    """Multiply-accumulates of one image's forward pass for ``cfg``."""
    D, M, L = cfg.embed_dim, cfg.mlp_dim, cfg.depth
    ph, pw = cfg.patch_size
    g = cfg.num_patches
    N = g + cfg.num_prefix_tokens
    macs = g * ph * pw * cfg.in_chans * D
    macs += L * (4 * N * D * D + 2 * N * N * D + 2 * N * D * M)
    if include_head:
        width = D
        if cfg.representation_size:
            macs += D * cfg.representation_size
            width = cfg.representation_size
        macs += width * cfg.num_classes
    return macs


def pretraining_exaflops(cfg: ViTConfig, epochs: float, images: int) -> float:
    """Training compute in exaFLOPs: 3 passes (forward + backward) x 2 FLOPs per MAC x MACs x images seen."""
    return 6.0 * forward_macs(cfg) * epochs * images / 1e18
