"""Resampling position embeddings to a new patch grid (paper section 3.2) and patch-embedding kernels to a new patch
size (FlexiViT, Beyer et al. 2023).

Position embeddings: the class-token slot (and any other prefix rows) is kept as it is; only the grid part is
interpolated in 2D, in float32, with an explicit output ``size`` (never a scale factor, which rounds differently).
Checkpoint conversion and a ``dynamic_img_size`` model at run time use the same functions, so a model run at a new
size gives the logits of a model built at that size from a resampled checkpoint.

Methods (each the rule of a library users compare with):

- ``bilinear_aligned``: bilinear with aligned corners, the rule of vit_jax (``scipy.ndimage.zoom(order=1)`` on the
  grid equals ``F.interpolate(mode="bilinear", align_corners=True)``). The default for ``.npz`` checkpoints.
- ``bicubic``: bicubic, ``align_corners=False``, antialiased: timm's default for its own state dicts and for
  ``dynamic_img_size=True`` (``timm.layers.resample_abs_pos_embed``). The default everywhere else.
- ``bicubic_noaa``: bicubic, ``align_corners=False``, no antialiasing: transformers' ``interpolate_pos_encoding``.
  (Antialiasing only changes the result when the grid shrinks.)
- ``bilinear``: bilinear, ``align_corners=False``, no antialiasing: what timm's ``.npz`` loader does.
- ``nearest``: nearest neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError

RESAMPLE_METHODS = ("bilinear_aligned", "bicubic", "bicubic_noaa", "bilinear", "nearest")
# method -> (F.interpolate mode, align_corners, default antialias)
_MODES = {
    "bilinear_aligned": ("bilinear", True, False),
    "bicubic": ("bicubic", False, True),
    "bicubic_noaa": ("bicubic", False, False),
    "bilinear": ("bilinear", False, False),
    "nearest": ("nearest", None, False),
}


def check_method(method: str) -> str:
    """Validate a resampling method name (see the module docstring)."""
    if method not in _MODES:
        raise InvalidValueError(f"unknown resampling method {method!r}; choose one of {', '.join(RESAMPLE_METHODS)}")
    return method


def _interpolate(x: torch.Tensor, size, method: str, antialias: bool | None) -> torch.Tensor:
    """F.interpolate of (B, C, h, w) with a method's settings."""
    mode, align, default_aa = _MODES[check_method(method)]
    antialias = default_aa if antialias is None else antialias
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=align, antialias=antialias)


def resample_grid(grid: torch.Tensor, new_size: tuple[int, int], method: str = "bicubic",
                  antialias: bool | None = None) -> torch.Tensor:
    """Interpolate a grid of embeddings (gh, gw, D) to (new_h, new_w, D), computed in float32, returned in the input
    dtype. ``antialias=None`` uses the method's default. Differentiable, and traceable with symbolic sizes."""
    check_method(method)
    x = grid.permute(2, 0, 1).unsqueeze(0).float()  # (1, D, gh, gw)
    out = _interpolate(x, (new_size[0], new_size[1]), method, antialias)
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
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    if old_grid[0] * old_grid[1] != n:
        raise InvalidValueError(f"old grid {old_grid[0]}x{old_grid[1]} does not match the {n} grid rows of the "
                                "embedding")
    if old_grid == tuple(new_grid):
        return pos_embed.clone()
    grid = grid_rows.reshape(old_grid[0], old_grid[1], -1)
    new = resample_grid(grid, new_grid, method, antialias).reshape(1, new_grid[0] * new_grid[1], -1)
    return torch.cat([prefix, new], dim=1)


def resample_1d(table: torch.Tensor, new_len: int, method: str = "bicubic",
                antialias: bool | None = None) -> torch.Tensor:
    """Resample a table of 1D embeddings (n, D) to (new_len, D): the per-axis halves of the paper's 2D position
    embedding ablation. Same methods as :func:`resample_pos_embed`."""
    if table.shape[0] == new_len:
        return table.clone()
    grid = table.unsqueeze(1)  # (n, 1, D)
    return resample_grid(grid, (new_len, 1), method, antialias)[:, 0]


# ------------------------------------------------------------------------------------------------- patch size
def patch_resize_matrix(old_size: tuple[int, int], new_size: tuple[int, int], method: str = "bicubic",
                        antialias: bool | None = None) -> torch.Tensor:
    """The linear map ``resize`` from an old_h x old_w patch to a new_h x new_w one as a matrix B, (new_h * new_w,
    old_h * old_w), row-major: column j is the resized j-th basis patch. float64."""
    old_h, old_w = old_size
    basis = torch.eye(old_h * old_w, dtype=torch.float64).reshape(-1, 1, old_h, old_w)
    resized = _interpolate(basis.float(), tuple(new_size), method, antialias).double()  # (old_n, 1, new_h, new_w)
    return resized.reshape(old_h * old_w, -1).t()


def resample_patch_embed(weight: torch.Tensor, new_size: tuple[int, int], method: str = "bicubic",
                         antialias: bool | None = None) -> torch.Tensor:
    """Resample a patch-embedding kernel (D, C, ph, pw) to (D, C, new_h, new_w) as FlexiViT does.

    With B the resize of patches (:func:`patch_resize_matrix`), the new kernel is ``w' = pinv(B^T) w``: the kernel
    whose response to a resized patch, <B x, w'>, equals the old kernel's response <x, w> (exactly when the patch
    grows, in the least-squares sense when it shrinks). timm's ``resample_patch_embed`` (bicubic, antialiased)
    computes the same map. Computed in float64, returned in the input dtype."""
    if weight.ndim != 4:
        raise ValueError(f"expected a patch-embedding kernel (D, C, ph, pw), got shape {tuple(weight.shape)}")
    old_size = tuple(weight.shape[-2:])
    new_size = (int(new_size[0]), int(new_size[1]))
    if old_size == new_size:
        return weight.clone()
    B = patch_resize_matrix(old_size, new_size, method, antialias).to(weight.device)  # (new_n, old_n)
    pinv = torch.linalg.pinv(B.t())  # (new_n, old_n): w' = pinv(B^T) w
    D, C = weight.shape[:2]
    flat = weight.reshape(D * C, -1).double()  # (D*C, old_n)
    return (flat @ pinv.t()).reshape(D, C, *new_size).to(weight.dtype)
