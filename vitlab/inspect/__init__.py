"""The paper's inspection tools (section 4.5, appendix D.7, D.8) for any vitlab model, as tensors and as figures.

- :func:`embedding_filters_pca`: principal components of the patch-embedding filters (Fig. 7 left).
- :func:`position_embedding_similarity`, :func:`position_embedding_structure`: cosine similarity between position
  embeddings and numbers for its distance and row/column structure (Fig. 7 centre, Fig. 10).
- :func:`mean_attention_distance`: attention-weighted query-key pixel distance per layer and head (Fig. 7 right,
  Fig. 11).
- :func:`attention_rollout`, :func:`rollout_matrix`: attention rollout (Fig. 6, Fig. 14).
- :func:`attention_statistics`: distance and rollout for many images in batches through a model.
- :func:`inspect_model`: all of it written as PNG figures, npz/JSON values and one HTML page.
"""

from .attention import AttentionStatistics, attention_statistics
from .distance import attention_layers, mean_attention_distance, patch_centre_distances
from .filters import FilterComponents, embedding_filters_pca
from .images import display_images, find_images, load_images
from .posemb import (
    PositionEmbeddingStructure,
    patch_position_embeddings,
    position_embedding_similarity,
    position_embedding_structure,
)
from .report import ANALYSES, LAYOUT, PageLayout, inspect_model
from .rollout import attention_rollout, rollout_matrix, upsample_map

__all__ = [
    "ANALYSES",
    "LAYOUT",
    "AttentionStatistics",
    "FilterComponents",
    "PageLayout",
    "PositionEmbeddingStructure",
    "attention_layers",
    "attention_rollout",
    "attention_statistics",
    "display_images",
    "embedding_filters_pca",
    "find_images",
    "inspect_model",
    "load_images",
    "mean_attention_distance",
    "patch_centre_distances",
    "patch_position_embeddings",
    "position_embedding_similarity",
    "position_embedding_structure",
    "rollout_matrix",
    "upsample_map",
]
