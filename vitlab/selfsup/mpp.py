"""Masked patch prediction (paper section 4.6 and appendix B.1.2), the ViT analogue of BERT's masked language model.

Half of each image's patch embeddings are corrupted: 80% of them are replaced by a learnable [mask] embedding, 10% by
the embedding of another random patch (from any image of the batch) and 10% left as they are. The encoder then
predicts, from each corrupted position's final representation, the patch's mean colour quantised to 3 bits per
channel: 8^3 = 512 classes for RGB (8 for grey images). The loss is cross-entropy over the corrupted positions only.
After pre-training, the ViT (without the [mask] embedding and the prediction head) is fine-tuned as usual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError
from ..models import VisionTransformer


def mean_colour_targets(images: torch.Tensor, patch_size: tuple[int, int], mean: Sequence[float],
                        std: Sequence[float], bits: int = 3) -> torch.Tensor:
    """Each patch's mean colour as a class index: (B, C, H, W) normalised images -> (B, N) int64, patches in
    row-major order.

    Pixels are brought back to [0, 1] with ``mean`` / ``std`` (the normalisation the loader applied), averaged over
    each ``patch_size`` patch, each channel quantised to ``2**bits`` levels (level = floor(value * 2**bits), the top
    value joining the top level) and the levels combined with the first channel most significant:
    ``r * 64 + g * 8 + b`` for 3 bits of RGB."""
    C = images.shape[1]
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean and std need {C} values each, got {len(mean)} and {len(std)}")
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, C, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, C, 1, 1)
    pixels = (images * s + m).clamp(0.0, 1.0)
    patch_means = F.avg_pool2d(pixels.float(), kernel_size=patch_size, stride=patch_size)  # (B, C, gh, gw)
    levels = 2**bits
    quantised = (patch_means * levels).floor().clamp(max=levels - 1).long()
    weights = torch.tensor([levels ** (C - 1 - c) for c in range(C)], device=images.device).view(1, C, 1, 1)
    return (quantised * weights).sum(dim=1).flatten(1)


def corrupt_patches(tokens: torch.Tensor, mask_token: torch.Tensor, ratio: float = 0.5,
                    probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption of patch embeddings (B, N, D).

    Exactly ``round(ratio * N)`` positions of each image are chosen; each chosen position independently becomes the
    ``mask_token`` (1, 1, D) with probability ``probs[0]``, the embedding of a uniformly drawn patch of the batch with
    ``probs[1]``, and stays unchanged with ``probs[2]``. Returns (corrupted tokens (B, N, D), chosen (B, N) bool)."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidValueError(f"mask ratio must be in (0, 1], got {ratio}")
    if len(probs) != 3 or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise InvalidValueError(f"probs must be three non-negative numbers summing to 1, got {probs}")
    B, N, D = tokens.shape
    device = tokens.device
    count = max(1, round(ratio * N))
    order = torch.rand(B, N, device=device, generator=generator).argsort(dim=1)
    chosen = torch.zeros(B, N, dtype=torch.bool, device=device)
    chosen.scatter_(1, order[:, :count], True)
    draw = torch.rand(B, N, device=device, generator=generator)
    use_mask = chosen & (draw < probs[0])
    use_random = chosen & (draw >= probs[0]) & (draw < probs[0] + probs[1])
    flat = tokens.reshape(B * N, D)
    random_rows = flat[torch.randint(0, B * N, (B, N), device=device, generator=generator)]  # (B, N, D)
    out = torch.where(use_random.unsqueeze(-1), random_rows, tokens)
    out = torch.where(use_mask.unsqueeze(-1), mask_token.to(tokens.dtype).expand(B, N, D), out)
    return out, chosen


class MaskedPatchPrediction(nn.Module):
    """A ViT with a learnable [mask] embedding and a linear head over its patch tokens for masked patch prediction.

    ``forward(images)`` returns the mean cross-entropy over the corrupted patches (a scalar), so the module trains
    like any other model whose output is its loss; :meth:`predict` returns the pieces. ``mean`` and ``std`` are the
    normalisation of the images it receives (used to recover colours for the targets). ``vit`` is the encoder that
    is fine-tuned afterwards."""

    def __init__(self, vit: VisionTransformer, mean: Sequence[float], std: Sequence[float], bits: int = 3,
                 ratio: float = 0.5, probs: tuple[float, float, float] = (0.8, 0.1, 0.1)):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"masked patch prediction needs a VisionTransformer, got {type(vit).__name__}")
        cfg = vit.cfg
        self.vit = vit
        self.mean, self.std = tuple(mean), tuple(std)
        self.bits, self.ratio, self.probs = bits, ratio, tuple(probs)
        # the pixels each token covers (the patch, or the backbone's receptive cell times the patch for hybrids)
        self.pixel_patch = (cfg.img_size[0] // cfg.grid_size[0], cfg.img_size[1] // cfg.grid_size[1])
        self.num_colours = (2**bits) ** cfg.in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(cfg.embed_dim, self.num_colours)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def cfg(self):
        """The encoder's config (input size, channels), so that the wrapper can stand where the ViT stood."""
        return self.vit.cfg

    def predict(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(colour logits (B, N, num_colours), targets (B, N), corrupted positions (B, N) bool)."""
        vit = self.vit
        tokens = vit.patch_embed(images)  # (B, N, D)
        tokens, chosen = corrupt_patches(tokens, self.mask_token, self.ratio, self.probs, generator)
        x = vit.embed_tokens(tokens)
        rope = vit.rotary_embedding()  # pos_embed='rope' models: positions enter each attention
        for block in vit.blocks:
            x = block(x, rope=rope)
        x = vit.norm(x)[:, vit.num_prefix_tokens:]  # (B, N, D), patch tokens only
        targets = mean_colour_targets(images, self.pixel_patch, self.mean, self.std, self.bits)
        return self.head(x), targets, chosen

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, targets, chosen = self.predict(images)
        return F.cross_entropy(logits[chosen].float(), targets[chosen])

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[float, float, int]:
        """(summed loss, number of correct colour predictions, number of corrupted patches) for one batch."""
        logits, targets, chosen = self.predict(images, generator)
        picked, wanted = logits[chosen].float(), targets[chosen]
        loss = F.cross_entropy(picked, wanted, reduction="sum").item()
        return loss, int((picked.argmax(-1) == wanted).sum()), int(chosen.sum())
