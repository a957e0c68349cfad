"""Resampling learned position embeddings to a new patch grid (fine-tuning at a new resolution, paper section 3.2).

The class-token slot (and any other prefix rows) is kept as it is; only the grid part is interpolated in 2D, in
float32, with an explicit output ``size`` (never a scale factor, which rounds differently).

Methods:

- ``bilinear_aligned``: bilinear with aligned corners, the rule of vit_jax (``scipy.ndimage.zoom(order=1)`` on the
  grid equals ``F.interpolate(mode="bilinear", align_corners=True)``). The default for ``.npz`` checkpoints.
- ``bicubic``: bicubic, ``align_corners=False``, antialiased: timm's default for its own state dicts
  (``timm.layers.resample_abs_pos_embed``). The default for every other format.
- ``bilinear``: bilinear, ``align_corners=False``, no antialiasing: what timm's ``.npz`` loader does.
- ``nearest``: nearest neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError

RESAMPLE_METHODS = ("bilinear_aligned", "bicubic", "bilinear", "nearest")
# method -> (F.interpolate mode, align_corners, default antialias)
_MODES = {
    "bilinear_aligned": ("bilinear", True, False),
    "bicubic": ("bicubic", False, True),
    "bilinear": ("bilinear", False, False),
    "nearest": ("nearest", None, False),
}


def check_method(method: str) -> str:
    """Validate a resampling method name (see the module docstring)."""
    if method not in _MODES:
        raise InvalidValueError(f"unknown resampling method {method!r}; choose one of {', '.join(RESAMPLE_METHODS)}")
    return method


def resample_grid(grid: torch.Tensor, new_size: tuple[int, int], method: str = "bicubic",
                  antialias: bool | None = None) -> torch.Tensor:
    """Interpolate a grid of embeddings (gh, gw, D) to (new_h, new_w, D), computed in float32, returned in the input
    dtype. ``antialias=None`` uses the method's default."""
    mode, align, default_aa = _MODES[check_method(method)]
    antialias = default_aa if antialias is None else antialias
    if tuple(grid.shape[:2]) == tuple(new_size):
        return grid.clone()
    x = grid.permute(2, 0, 1).unsqueeze(0).float()  # (1, D, gh, gw)
    if mode == "nearest":
        out = F.interpolate(x, size=tuple(new_size), mode="nearest")
    else:
        out = F.interpolate(x, size=tuple(new_size), mode=mode, align_corners=align, antialias=antialias)
    return out[0].permute(1, 2, 0).to(grid.dtype)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1, method: str = "bicubic",
                       antialias: bool | None = None) -> torch.Tensor:
    """Resample a learned position embedding (1, prefix + gh*gw, D) to (1, prefix + new_h*new_w, D).

    ``old_grid`` defaults to a square grid (an error if the row count is not a square); ``num_prefix_tokens`` rows at
    the start (the class slot) are copied unchanged. Rows are in row-major grid order, as every ViT layout stores
    them."""
    if pos_embed.ndim == 2:
        pos_embed = pos_embed.unsqueeze(0)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected a position embedding of shape (1, tokens, D), got {tuple(pos_embed.shape)}")
    prefix, grid_rows = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    n = grid_rows.shape[0]
    if old_grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise InvalidValueError(f"position embedding has {n} grid rows, not a square grid; "
                                    "give old_grid=(rows, cols)")
        old_grid = (side, side)
    old_grid = tuple(int(s) for s in old_grid)
    new_grid = tuple(int(s) for s in new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise InvalidValueError(f"old grid {old_grid[0]}x{old_grid[1]} does not match the {n} grid rows of the "
                                "embedding")
    grid = grid_rows.reshape(old_grid[0], old_grid[1], -1)
    new = resample_grid(grid, new_grid, method, antialias).reshape(1, new_grid[0] * new_grid[1], -1)
    return torch.cat([prefix, new], dim=1)


def resample_1d(table: torch.Tensor, new_len: int, method: str = "bicubic",
                antialias: bool | None = None) -> torch.Tensor:
    """Resample a table of 1D embeddings (n, D) to (new_len, D): the per-axis halves of the paper's 2D position
    embedding ablation. Same methods as :func:`resample_pos_embed`."""
    grid = table.unsqueeze(1)  # (n, 1, D)
    return resample_grid(grid, (new_len, 1), method, antialias)[:, 0]
