"""Resampling for checkpoints: position embeddings to a new grid, patch-embedding kernels to a new patch size.

The functions live in :mod:`vitlab.models.resample` because a ``dynamic_img_size`` model resamples its own position
embedding at run time with the same rules; this module is where the checkpoint code (and users) import them from.
"""

from ..models.resample import (
    RESAMPLE_METHODS,
    check_method,
    resample_1d,
    resample_grid,
    resample_patch_embed,
    resample_pos_embed,
)

__all__ = ["RESAMPLE_METHODS", "check_method", "resample_1d", "resample_grid", "resample_patch_embed",
           "resample_pos_embed"]
