"""Position-embedding similarity (paper Fig. 7 centre, Fig. 10) and numbers for the structure it shows."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError


def patch_position_embeddings(model: nn.Module) -> torch.Tensor:
    """The position embedding of each patch token of ``model``, (gh * gw, D) in row-major grid order.

    Works for every kind the model offers (learned 1D with or without a class slot, learned X/Y halves, fixed sin-cos);
    prefix-token rows are dropped. Raises ``ValueError`` for a model without position embedding."""
    pos = model.position_embedding()
    if pos is None:
        raise InvalidValueError(f"the model has no position embedding (pos_embed={model.cfg.pos_embed!r})")
    pos = pos.detach().reshape(-1, pos.shape[-1])
    num_patches = model.cfg.grid_size[0] * model.cfg.grid_size[1]
    return pos[pos.shape[0] - num_patches :]  # a class slot, when there is one, comes first


def position_embedding_similarity(
    model_or_embedding: nn.Module | torch.Tensor,
    grid_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Cosine similarity of every patch position's embedding with every other: (gh, gw, gh, gw).

    ``out[i, j]`` is the (gh, gw) map of similarities between position (i, j) and all positions. Pass a model, or an
    embedding (N + num_prefix_tokens, D) or (1, N + num_prefix_tokens, D) together with ``grid_size`` (rows, columns).
    """
    if isinstance(model_or_embedding, nn.Module):
        grid_size = model_or_embedding.cfg.grid_size
        embedding = patch_position_embeddings(model_or_embedding)
        given_shape = tuple(embedding.shape)
    else:
        if grid_size is None:
            raise ValueError("grid_size is needed when passing an embedding tensor")
        embedding = model_or_embedding.detach()
        given_shape = tuple(embedding.shape)
        if embedding.ndim == 3:
            embedding = embedding.reshape(-1, embedding.shape[-1])
        embedding = embedding[num_prefix_tokens:]
    gh, gw = grid_size
    if embedding.ndim != 2 or embedding.shape[0] != gh * gw:
        raise ValueError(f"expected {gh * gw} patch position embeddings for a {gh}x{gw} grid "
                         f"(+{num_prefix_tokens} prefix rows), got shape {given_shape}")
    unit = F.normalize(embedding.to(torch.float64), dim=-1)
    return (unit @ unit.T).float().cpu().reshape(gh, gw, gh, gw)


class PositionEmbeddingStructure(NamedTuple):
    """How much of the paper's structure a similarity map shows, over all pairs of distinct positions.

    - ``distance_correlation``: Pearson correlation of similarity with the Euclidean grid distance (in patches);
      strongly negative when nearby patches have similar embeddings.
    - ``row_column_contrast``: mean similarity of pairs in the same row or column minus that of the other pairs.
    - ``row_column_effect``: the same contrast with distance taken out: the coefficient of the same-row-or-column
      indicator in a least-squares fit ``similarity ~ 1 + d + d^2 + same_row_or_column``. Zero for a similarity that
      depends on distance alone (quadratically), positive for the paper's row/column stripes.
    - ``neighbour_peak_rate``: share of positions whose most similar other position is one of its 8 neighbours.
    Values that a grid cannot define (e.g. a single row has no off-axis pairs) are NaN.
    """

    distance_correlation: float
    row_column_contrast: float
    row_column_effect: float
    neighbour_peak_rate: float


def position_embedding_structure(similarity: torch.Tensor) -> PositionEmbeddingStructure:
    """Summarise a (gh, gw, gh, gw) similarity from :func:`position_embedding_similarity` in four numbers."""
    if similarity.ndim != 4 or similarity.shape[:2] != similarity.shape[2:]:
        raise ValueError(f"expected a (gh, gw, gh, gw) similarity, got shape {tuple(similarity.shape)}")
    gh, gw = similarity.shape[:2]
    n = gh * gw
    sim = similarity.detach().to("cpu", torch.float64).reshape(n, n)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rows, cols = rows.reshape(-1).double(), cols.reshape(-1).double()
    dy, dx = rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]
    dist = torch.sqrt(dy.square() + dx.square())
    pair = ~torch.eye(n, dtype=torch.bool)
    s, d = sim[pair], dist[pair]
    axis = ((dy == 0) | (dx == 0))[pair].double()
    nan = math.nan

    def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        denom = a.norm() * b.norm()
        return float(a @ b / denom) if denom > 0 else nan

    correlation = pearson(s, d) if s.numel() > 1 else nan
    both = 0 < axis.sum() < axis.numel()
    contrast = float(s[axis == 1].mean() - s[axis == 0].mean()) if both else nan
    effect = nan
    if both:
        design = torch.stack([torch.ones_like(d), d, d.square(), axis], dim=1)
        if torch.linalg.matrix_rank(design) == design.shape[1]:
            effect = float(torch.linalg.lstsq(design, s[:, None]).solution[3, 0])
    peak_rate = nan
    if n > 1:
        others = sim.masked_fill(~pair, -math.inf)
        best = others.argmax(dim=1)
        neighbour = (dy.abs() <= 1) & (dx.abs() <= 1) & pair
        peak_rate = float(neighbour[torch.arange(n), best].double().mean())
    return PositionEmbeddingStructure(correlation, contrast, effect, peak_rate)
