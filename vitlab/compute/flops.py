"""Compute of a forward pass and of a pre-training run (paper section 4.4, Table 6).

Counts multiply-accumulates (MACs) of the matrix products only, as the paper does; one MAC is two FLOPs. Norms,
softmax, GELU and additions are left out (each well under 1% of a ViT's products).

A plain ViT has a closed form per image, with g grid cells, N tokens (g + the class token), D width, M MLP size,
L depth, P x P patches, C channels:

    MACs = g P^2 C D  +  L (4 N D^2 + 2 N^2 D + 2 N D M)  +  head

(4 N D^2: q, k, v and output projections; 2 N^2 D: scores and weighted sum; 2 N D M: the two MLP layers.)
Any other model (a hybrid with a ResNet stem, a ResNet) is counted by :mod:`vitlab.compute.counting`, which runs
it on the meta device and adds up a rule per module type (convolutions counted in general). A BiT ResNet-v2 also has a
closed form here (:func:`resnetv2_forward_macs`: output positions x kernel area x input x output channels per
convolution), which the tests hold against the counted value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidValueError
from ..models.resnetv2 import ResNetV2Config
from ..models.vit import ViTConfig
from .counting import count_config_macs


def vit_macs_breakdown(cfg: ViTConfig, include_head: bool = True) -> dict[str, int]:
    """A plain ViT's forward MACs per image by part: ``patch_embed``, ``qkv_and_out_proj``, ``attention``
    (scores and weighted sum), ``mlp``, ``head`` (pre-logits and classifier)."""
    D, M, L = cfg.embed_dim, cfg.mlp_dim, cfg.depth
    ph, pw = cfg.patch_size
    g = cfg.num_patches
    N = g + cfg.num_prefix_tokens
    head = 0
    if include_head:
        width = D
        if cfg.representation_size:
            head += D * cfg.representation_size
            width = cfg.representation_size
        head += width * cfg.num_classes
    return {
        "patch_embed": g * ph * pw * cfg.in_chans * D,
        "qkv_and_out_proj": L * 4 * N * D * D,
        "attention": L * 2 * N * N * D,
        "mlp": L * 2 * N * D * M,
        "head": head,
    }


def forward_macs(cfg, include_head: bool = True) -> int:
    """Multiply-accumulates of one image's forward pass for ``cfg``.

    A plain :class:`ViTConfig` uses the closed form; any other config (a subclass such as a hybrid, a ViT with the
    options of a later family such as SwiGLU or a MAP head, or another model family) is counted by building its
    model on the meta device (:func:`~vitlab.compute.counting.count_config_macs`).
    """
    # the closed form counts the paper's matrix products (LayerScale, registers and ln_pre add none of them)
    if type(cfg) is ViTConfig and not {"mlp_type", "pool", "distilled"} & set(cfg.family_options()):
        return sum(vit_macs_breakdown(cfg, include_head).values())
    return count_config_macs(cfg, include_head=include_head)


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


def pretraining_exaflops(cfg, epochs: float, images: float, include_head: bool = True) -> float:
    """Training compute in exaFLOPs: 3 passes (forward + backward) x 2 FLOPs per MAC x MACs x images seen."""
    return 6.0 * forward_macs(cfg, include_head=include_head) * epochs * images / 1e18


# ----- accelerator time

# dense bf16 peak per accelerator unit, FLOP/s (vendor figures; a TPUv3 chip has two cores of 61.5 TFLOP/s each)
ACCELERATOR_PEAK_FLOPS: dict[str, float] = {
    "tpuv3-core": 61.5e12,
    "a100": 312e12,
    "h100-sxm": 989e12,
    "h100-pcie": 756e12,
    "h200": 989e12,
}
# image counts of the pre-training sets (JFT-300M as the paper counts it: 303M images after de-duplication)
DATASET_IMAGES: dict[str, float] = {"jft300m": 303e6, "imagenet21k": 14.2e6, "imagenet1k": 1.281167e6}


def accelerator_days(exaflops: float, accelerator: str = "tpuv3-core", mfu: float = 0.4) -> float:
    """Accelerator-unit-days that ``exaflops`` of training take at model FLOPs utilisation ``mfu`` (0..1] of the
    unit's dense bf16 peak (:data:`ACCELERATOR_PEAK_FLOPS`); e.g. TPUv3-core-days as in the paper's Table 2."""
    if accelerator not in ACCELERATOR_PEAK_FLOPS:
        raise InvalidValueError(f"unknown accelerator {accelerator!r}; "
                                f"expected one of {', '.join(ACCELERATOR_PEAK_FLOPS)}")
    if not 0.0 < mfu <= 1.0:
        raise InvalidValueError(f"mfu must be in (0, 1], got {mfu}")
    return exaflops * 1e18 / (ACCELERATOR_PEAK_FLOPS[accelerator] * mfu) / 86400.0


def implied_mfu(exaflops: float, days: float, accelerator: str = "tpuv3-core") -> float:
    """The utilisation that ``exaflops`` done in ``days`` accelerator-unit-days imply (inverse of
    :func:`accelerator_days`)."""
    return exaflops * 1e18 / (ACCELERATOR_PEAK_FLOPS[accelerator] * days * 86400.0)


# ----- the paper's Table 6

@dataclass(frozen=True)
class Table6Row:
    """One ViT row of the paper's Table 6: model, pre-training epochs on JFT-300M and the exaFLOPs it reports."""

    model: str
    label: str
    epochs: int
    paper_exaflops: float


TABLE6: tuple[Table6Row, ...] = (
    Table6Row("vit_b32", "ViT-B/32", 7, 55.0),
    Table6Row("vit_b16", "ViT-B/16", 7, 224.0),
    Table6Row("vit_l32", "ViT-L/32", 7, 196.0),
    Table6Row("vit_l16", "ViT-L/16", 7, 783.0),
    Table6Row("vit_l16", "ViT-L/16", 14, 1567.0),
    Table6Row("vit_h14", "ViT-H/14", 14, 4262.0),
)


def table6_reproduction(get_config: Callable[[str], ViTConfig], images: float = DATASET_IMAGES["jft300m"],
                        class_token: bool = True) -> list[dict]:
    """Our exaFLOPs for each Table 6 ViT row next to the paper's: the section 4.4 formula without head at 224 px.

    ``class_token=False`` counts N = g tokens instead of g + 1 (the variant that reproduces the B/32 row; see
    docs/performance.md). Each dict: model, label, epochs, paper, ours, rel_error (ours / paper - 1).
    """
    rows = []
    for row in TABLE6:
        cfg = get_config(row.model).replace(img_size=224)
        if not class_token:
            cfg = cfg.replace(class_token=False, pool="gap")
        ours = pretraining_exaflops(cfg, row.epochs, images, include_head=False)
        rows.append({"model": row.model, "label": row.label, "epochs": row.epochs, "paper": row.paper_exaflops,
                     "ours": ours, "rel_error": ours / row.paper_exaflops - 1.0})
    return rows
