"""Principal components of the patch-embedding filters E (paper Fig. 7, left)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import InvalidValueError


class FilterComponents(NamedTuple):
    """PCA of the D patch-embedding filters, each a (C, ph, pw) image patch.

    ``components`` (K, C, ph, pw): unit-norm principal directions, strongest first (sign fixed so that each one's
    largest-magnitude entry is positive). ``explained_variance_ratio`` (K,): share of the filters' total variance
    along each. ``mean`` (C, ph, pw): the mean filter that was subtracted.
    """

    components: torch.Tensor
    explained_variance_ratio: torch.Tensor
    mean: torch.Tensor


def embedding_filters_pca(model_or_weight: nn.Module | torch.Tensor, num_components: int = 28) -> FilterComponents:
    """PCA of the patch-embedding filters (the rows of E; the paper draws the first 28).

    ``model_or_weight`` is a model with ``patch_embed.proj`` or the conv weight itself, (D, C, ph, pw). At most
    ``min(num_components, D, C * ph * pw)`` components are returned. Computed in float64 on the CPU.
    """
    weight = model_or_weight
    if isinstance(model_or_weight, nn.Module):
        weight = model_or_weight.patch_embed.proj.weight
    if weight.ndim != 4:
        raise ValueError(f"expected patch-embedding weights of shape (D, C, ph, pw), got {tuple(weight.shape)}")
    if num_components < 1:
        raise InvalidValueError(f"num_components must be at least 1, got {num_components}")
    D, C, ph, pw = weight.shape
    filters = weight.detach().to("cpu", torch.float64).reshape(D, C * ph * pw)  # one filter per row
    mean = filters.mean(dim=0)
    _, singular, directions = torch.linalg.svd(filters - mean, full_matrices=False)
    variance = singular.square()
    ratio = variance / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)
    k = min(num_components, directions.shape[0])
    directions = directions[:k]
    # Singular vectors have an arbitrary sign; fix it so that repeated runs draw the same pictures.
    peak = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
    directions = directions * torch.where(peak < 0, -1.0, 1.0)
    return FilterComponents(
        components=directions.reshape(k, C, ph, pw).float(),
        explained_variance_ratio=ratio[:k].float(),
        mean=mean.reshape(C, ph, pw).float(),
    )
