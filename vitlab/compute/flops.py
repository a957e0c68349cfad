"""Analytic compute of a forward pass (paper section 4.4).

Counts multiply-accumulates (MACs) of the matrix products only, as the paper does; one MAC is two FLOPs.
Per image, with g = grid cells, N = tokens (class token included), D width, M MLP size, L depth:

    MACs = g P^2 C D  +  L (4 N D^2 + 2 N^2 D + 2 N D M)  +  head

(4 N D^2: q, k, v and output projections; 2 N^2 D: scores and weighted sum; 2 N D M: the two MLP layers.)
Convolutional networks (BiT ResNet-v2, the hybrids' backbones) count every convolution as
output positions x kernel area x input channels x output channels; a hybrid's patch embedding then reads C' feature
channels instead of the image's C.
"""

from __future__ import annotations

import math

from ..models.hybrid import HybridConfig
from ..models.resnetv2 import ResNetV2Config
from ..models.vit import ViTConfig


def forward_macs(cfg: ViTConfig | ResNetV2Config, include_head: bool = True) -> int:
    """Multiply-accumulates of one image's forward pass for ``cfg`` (a ViT, hybrid or ResNet-v2 config)."""
    if isinstance(cfg, ResNetV2Config):
        return resnetv2_forward_macs(cfg, include_head)
    D, M, L = cfg.embed_dim, cfg.mlp_dim, cfg.depth
    ph, pw = cfg.patch_size
    g = cfg.num_patches
    N = g + cfg.num_prefix_tokens
    if isinstance(cfg, HybridConfig):
        macs = resnetv2_forward_macs(cfg.backbone, include_head=False) + g * ph * pw * cfg.backbone.num_features * D
    else:
        macs = g * ph * pw * cfg.in_chans * D
    macs += L * (4 * N * D * D + 2 * N * N * D + 2 * N * D * M)
    if include_head:
        width = D
        if cfg.representation_size:
            macs += D * cfg.representation_size
            width = cfg.representation_size
        macs += width * cfg.num_classes
    return macs


def _conv_out(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


def resnetv2_forward_macs(cfg: ResNetV2Config, include_head: bool = True) -> int:
    """Multiply-accumulates of a ResNet-v2's convolutions (and its head) for one ``cfg.img_size`` image."""
    h, w = cfg.img_size
    macs = 0

    def conv(h: int, w: int, c_in: int, c_out: int, kernel: int, stride: int) -> tuple[int, int]:
        nonlocal macs
        oh, ow = (_conv_out(s, kernel, stride, cfg.padding) for s in (h, w))
        macs += oh * ow * kernel * kernel * c_in * c_out
        return oh, ow

    width = cfg.stem_width * cfg.width_factor
    h, w = conv(h, w, cfg.in_chans, width, cfg.stem_kernel, cfg.stem_stride)
    if cfg.stem_pool:  # 3x3/2 max-pool: both "SAME" and BiT's one-pixel pad give ceil(size / 2)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    for i, depth in enumerate(cfg.layers):
        out = cfg.channels[i] * cfg.width_factor
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            if j == 0:
                conv(h, w, width, out, 1, stride)  # projection shortcut
            conv(h, w, width, out // 4, 1, 1)
            h2, w2 = conv(h, w, out // 4, out // 4, 3, stride)
            conv(h2, w2, out // 4, out, 1, 1)
            h, w, width = h2, w2, out
    if include_head:
        macs += width * cfg.num_classes
    return macs


def pretraining_exaflops(cfg: ViTConfig | ResNetV2Config, epochs: float, images: int) -> float:
    """Training compute in exaFLOPs: 3 passes (forward + backward) x 2 FLOPs per MAC x MACs x images seen."""
    return 6.0 * forward_macs(cfg) * epochs * images / 1e18
