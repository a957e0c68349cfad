"""Matplotlib figures for the inspection analyses. Math lives in the other modules; these only draw.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, no display needed);
:func:`figure_png` turns one into PNG bytes. Matplotlib is imported when the first figure is drawn, not with the
package (the command line imports ``vitlab.inspect`` to list its analyses).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .distance import patch_centre_distances
from .filters import FilterComponents
from .posemb import PositionEmbeddingStructure
from .rollout import upsample_map

if TYPE_CHECKING:
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

DPI = 100


def _new_figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _colormap(name: str) -> Colormap:
    import matplotlib

    return matplotlib.colormaps[name]


def figure_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _scale01(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.full_like(x, 0.5)


def _mosaic(tiles: np.ndarray, gap: int = 1) -> np.ndarray:
    """(rows, cols, h, w) tiles -> one (rows*(h+gap)-gap, cols*(w+gap)-gap) image with NaN gaps."""
    rows, cols, h, w = tiles.shape
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tiles[r, c]
    return out


def plot_embedding_filters(pca: FilterComponents) -> Figure:
    """The principal components of the patch-embedding filters as image patches (RGB for 3 channels, grey for one,
    one grey tile per channel otherwise), each scaled to its own range, titled with its explained variance."""
    components = pca.components.numpy()
    k, channels = components.shape[:2]
    cols = min(7, k)
    rows = math.ceil(k / cols)
    tile_width = 1.3 if channels in (1, 3) else 0.5 + 0.5 * channels
    fig = _new_figure(figsize=(cols * tile_width + 0.4, rows * 1.45 + 0.9))
    total = float(pca.explained_variance_ratio.sum()) * 100
    fig.suptitle(f"Patch-embedding filters: first {k} principal components ({total:.1f}% of variance)")
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= k:
            continue
        comp = _scale01(components[i])  # (C, ph, pw)
        if channels == 3:
            ax.imshow(comp.transpose(1, 2, 0), interpolation="nearest")
        elif channels == 1:
            ax.imshow(comp[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            strip = _mosaic(comp[None])  # channels side by side
            ax.imshow(np.ma.masked_invalid(strip), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{i + 1}: {100 * float(pca.explained_variance_ratio[i]):.1f}%", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.75 / (rows * 1.45 + 0.9), hspace=0.35)
    return fig


def plot_position_similarity(similarity: torch.Tensor, structure: PositionEmbeddingStructure | None = None) -> Figure:
    """A grid of small grids: tile (i, j) shows the cosine similarity of position (i, j)'s embedding with every
    position, on one colour scale from -1 to 1 shared by all tiles."""
    sim = similarity.numpy()
    gh, gw = sim.shape[:2]
    mosaic = np.ma.masked_invalid(_mosaic(sim, gap=max(1, min(gh, gw) // 6)))
    width = 7.0
    height = min(10.0, max(3.0, width * mosaic.shape[0] / mosaic.shape[1])) + 0.8
    fig = _new_figure(figsize=(width + 1.2, height))
    ax = fig.add_axes((0.1, 0.1, 0.72, 0.78))
    cmap = _colormap("viridis").with_extremes(bad="white")
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    step_y, step_x = mosaic.shape[0] / gh, mosaic.shape[1] / gw
    ax.set_xticks([(j + 0.5) * step_x - 0.5 for j in range(gw)], [str(j + 1) for j in range(gw)], fontsize=7)
    ax.set_yticks([(i + 0.5) * step_y - 0.5 for i in range(gh)], [str(i + 1) for i in range(gh)], fontsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    title = "Position embedding similarity"
    if structure is not None:
        title += (f"\ncorr. with grid distance {structure.distance_correlation:.2f}, "
                  f"row/column effect {structure.row_column_effect:+.2f}")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, cax=fig.add_axes((0.86, 0.1, 0.03, 0.78)))
    bar.set_label("cosine similarity")
    return fig


def plot_attention_distance(mean_distance: torch.Tensor, grid_size: tuple[int, int],
                            patch_size: tuple[int, int], num_images: int | None = None) -> Figure:
    """Mean attention distance (pixels) against network depth, one dot per head, with the distance that uniform
    attention over the grid would give as a dashed reference."""
    table = mean_distance.numpy()
    layers, heads = table.shape
    fig = _new_figure(figsize=(7.5, 5.0))
    ax = fig.add_axes((0.11, 0.11, 0.68, 0.78))
    colours = _colormap("tab20")
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), table[:, h], s=18, color=colours(h % 20), label=f"head {h + 1}")
    uniform = float(patch_centre_distances(grid_size, patch_size).mean())
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform attention")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xlim(0.5, layers + 0.5)
    ax.set_xticks(range(1, layers + 1))
    ax.set_ylim(0, max(float(table.max()), uniform) * 1.1)
    suffix = f" over {num_images} images" if num_images else ""
    ax.set_title(f"Mean attention distance per head{suffix}", fontsize=10)
    if heads <= 16:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def plot_rollout(images: torch.Tensor, maps: torch.Tensor, titles: Sequence[str] | None = None,
                 per_row: int | None = None) -> Figure:
    """Each input next to its rollout map (upsampled, normalised to its maximum) overlaid in colour.

    ``images``: (K, C, H, W) in [0, 1]; ``maps``: (K, gh, gw). ``per_row`` input/overlay pairs per row (default: a
    roughly 4:3 layout)."""
    k = images.shape[0]
    per_row = per_row or round(math.sqrt(k * 0.75))
    per_row = max(1, min(per_row, k))
    rows = math.ceil(k / per_row)
    height, width = images.shape[-2:]
    aspect = height / width
    fig_height = rows * (1.7 * aspect + 0.45) + 0.8  # the top 0.8 inch holds the title and the first row's labels
    fig = _new_figure(figsize=(per_row * 2 * 1.7 + 0.2, fig_height))
    fig.suptitle("Attention rollout", fontsize=11)
    heat = upsample_map(maps, (height, width)).numpy()
    jet = _colormap("jet")
    for i in range(k):
        picture = images[i].permute(1, 2, 0).numpy()
        picture = np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture[..., :3]
        overlay = 0.5 * picture + 0.5 * jet(heat[i])[..., :3]
        for j, shown in enumerate((picture, overlay)):
            ax = fig.add_subplot(rows, 2 * per_row, 2 * i + j + 1)
            ax.imshow(shown, interpolation="bilinear" if j else "nearest")
            ax.set_axis_off()
            if j == 0 and titles is not None:
                ax.set_title(titles[i], fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - 0.8 / fig_height,
                        wspace=0.05, hspace=0.3)
    return fig
