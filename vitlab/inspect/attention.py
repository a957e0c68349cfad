"""Run a model over many images once and gather the attention analyses (mean distance, rollout, predictions)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import InvalidValueError
from .distance import mean_attention_distance
from .rollout import HeadFusion, attention_rollout


class AttentionStatistics(NamedTuple):
    """``mean_distance`` (layers, heads): pixels, averaged over queries and all images. ``rollout`` (K, gh, gw): maps
    for the first K images. ``logits`` (K, classes): the model's output for those images (empty when it has no head).
    ``grid_size``: the token grid of the images (the build grid unless they have another size)."""

    mean_distance: torch.Tensor
    rollout: torch.Tensor
    logits: torch.Tensor
    grid_size: tuple[int, int] = (0, 0)


@torch.no_grad()
def attention_statistics(
    model: nn.Module,
    images: torch.Tensor,
    rollout_images: int = 8,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dynamic_img_size: bool | None = None,
) -> AttentionStatistics:
    """Mean attention distance over all of ``images`` (N, C, H, W; preprocessed) and the rollout of the first
    ``rollout_images``, in batches of ``batch_size`` through ``model.forward_with_attention`` (the model's normal
    forward is untouched). The rollout starts from the class token for ``pool='token'`` models, from the pooling
    probe's attention for ``pool='map'`` ones and from the mean of the patch tokens for ``pool='gap'`` ones. Register
    and distillation tokens are prefix tokens: no position, left out of the distances and the maps. The model is
    put in eval mode for the call and restored afterwards.
    Everything follows the images' token grid: ``dynamic_img_size=True`` (or a model built with it) takes images of
    another size than the build size. Distances are in input pixels (a hybrid's token covers stride x patch)."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of images (N, C, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be at least 1, got {batch_size}")
    cfg = model.cfg
    grid = model.input_grid(images[:1], dynamic_img_size)
    pixels_per_token = getattr(cfg, "reduction", cfg.patch_size)
    # where the classifier reads from: the class token, the pooling probe (pool='map'), or all patch tokens
    source = {"token": "class", "map": "probe"}.get(cfg.pool, "mean")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        distance_sum = None
        maps, logits = [], []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            if source == "probe":
                out, attn, probe = model.forward_with_attention(batch, dynamic_img_size=dynamic_img_size,
                                                                return_pool_attention=True)
            else:
                (out, attn), probe = model.forward_with_attention(batch, dynamic_img_size=dynamic_img_size), None
            per_image = mean_attention_distance(attn, grid, pixels_per_token, cfg.num_prefix_tokens,
                                                per_image=True)  # (b, L, H)
            total = per_image.double().sum(dim=0)
            distance_sum = total if distance_sum is None else distance_sum + total
            wanted = max(0, min(rollout_images - start, batch.shape[0]))
            if wanted:
                first = [layer[:wanted] for layer in attn]
                maps.append(attention_rollout(first, cfg.num_prefix_tokens, grid, head_fusion, discard_ratio,
                                              source, None if probe is None else probe[:wanted]).cpu())
                logits.append(out[:wanted].float().cpu())
    finally:
        model.train(was_training)
    return AttentionStatistics(
        mean_distance=(distance_sum / images.shape[0]).float(),
        rollout=torch.cat(maps) if maps else torch.zeros(0, *grid),
        logits=torch.cat(logits) if logits else torch.zeros(0, cfg.num_classes),
        grid_size=tuple(grid),
    )
