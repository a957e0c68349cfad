"""Run the chosen analyses on a model and write PNG figures, the raw values (npz + JSON) and one self-contained HTML
page that shows every figure (images embedded as base64)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import make_folder, write_bytes_atomic
from ..errors import InvalidValueError
from ..models import has_tokens, metadata_of
from ..preprocessing import Preprocessing
from .attention import attention_statistics
from .distance import patch_centre_distances
from .figures import (
    figure_png,
    plot_attention_distance,
    plot_embedding_filters,
    plot_position_similarity,
    plot_rollout,
)
from .filters import embedding_filters_pca
from .images import display_images
from .posemb import position_embedding_similarity, position_embedding_structure
from .rollout import HeadFusion

ANALYSES = ("filters", "posemb", "distance", "rollout")
NEEDS_IMAGES = ("distance", "rollout")
HEADINGS = {
    "filters": "Patch-embedding filters (paper Fig. 7 left)",
    "posemb": "Position-embedding similarity (paper Fig. 7 centre, Fig. 10)",
    "distance": "Mean attention distance (paper Fig. 7 right, Fig. 11)",
    "rollout": "Attention rollout (paper Fig. 6, Fig. 14)",
}


@dataclass(frozen=True)
class PageLayout:
    """Fixed geometry of the HTML page, in CSS pixels, so that each figure's place is known (the screenshot test
    checks every figure's box). Figures fill a grid of ``columns`` cards below the header, left to right."""

    header_height: int = 80
    padding: int = 16
    card_width: int = 640
    heading_height: int = 36
    image_height: int = 480
    caption_height: int = 44
    columns: int = 2

    @property
    def card_height(self) -> int:
        return self.heading_height + self.image_height + self.caption_height

    @property
    def page_width(self) -> int:
        return self.padding + self.columns * (self.card_width + self.padding)

    def image_box(self, index: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the ``index``-th figure's image area."""
        row, col = divmod(index, self.columns)
        left = self.padding + col * (self.card_width + self.padding)
        top = self.header_height + self.padding + row * (self.card_height + self.padding) + self.heading_height
        return left, top, self.card_width, self.image_height

    def grid_height(self, num_figures: int) -> int:
        rows = math.ceil(num_figures / self.columns)
        return self.header_height + self.padding + rows * (self.card_height + self.padding)


LAYOUT = PageLayout()


def applicable_analyses(model: nn.Module, have_images: bool) -> list[str]:
    """The analyses that make sense for this model (and for whether images were given)."""
    cfg = model.cfg
    names = []
    if cfg.patch_size[0] * cfg.patch_size[1] > 1:  # 1x1 "patches" (hybrid models) have no spatial filter to draw
        names.append("filters")
    if cfg.pos_embed not in ("none", "rope"):  # rope: no embedding table (positions rotate q and k)
        names.append("posemb")
    if have_images:
        names += list(NEEDS_IMAGES)
    return names


def resolve_analyses(model: nn.Module, what: Sequence[str] | None, have_images: bool) -> list[str]:
    """Check a requested list of analyses (None: every applicable one) and return it in the standard order."""
    if not has_tokens(model.cfg):  # a BiT ResNet-v2 baseline: nothing here applies
        raise InvalidValueError(f"{type(model).__name__} is a convolutional model: it has no patch embedding, "
                                "position embedding or attention to inspect (ViTs and hybrids only)")
    possible = applicable_analyses(model, have_images)
    if what is None:
        return possible
    wanted = [w.strip() for w in what if w.strip()]
    unknown = [w for w in wanted if w not in ANALYSES]
    if unknown:
        raise InvalidValueError(f"--what: unknown analysis {', '.join(unknown)}; choose from {','.join(ANALYSES)}")
    if not wanted:
        raise InvalidValueError(f"--what: no analysis given; choose from {','.join(ANALYSES)}")
    for name in wanted:
        if name in NEEDS_IMAGES and not have_images:
            raise InvalidValueError(f"--what {name} needs images (--images PATH)")
        if name not in possible:
            reason = ("the patches are 1x1 pixels" if name != "posemb" else "its rotary position embedding has no "
                      "table to compare" if model.cfg.pos_embed == "rope" else "the model has no position embedding")
            raise InvalidValueError(f"--what {name}: not available for this model ({reason})")
    return [name for name in ANALYSES if name in wanted]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def inspect_model(
    model: nn.Module,
    out_dir: str | Path,
    images: torch.Tensor | None = None,
    image_names: Sequence[str] | None = None,
    what: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    num_components: int = 28,
    rollout_images: int = 8,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    title: str = "",
    dynamic_img_size: bool | None = None,
) -> dict:
    """Run ``what`` (default: every applicable analysis) and write ``out_dir``: one PNG per analysis
    (``filters.png``, ``posemb.png``, ``distance.png``, ``rollout.png``), ``inspection.npz`` (every array),
    ``inspection.json`` (config, numbers, tables) and ``index.html`` (all figures on one self-contained page).

    ``images`` (N, C, H, W) are preprocessed model inputs; the mean attention distance uses all of them, the rollout
    the first ``rollout_images``. ``preprocessing`` undoes the normalisation for display (default: the model's own, or
    the paper's [-1, 1]). Returns the JSON summary (with a ``files`` entry listing what was written).
    ``dynamic_img_size=True`` takes ``images`` of another size than the model's (distance and rollout follow their
    grid).
    """
    cfg = model.cfg
    names = resolve_analyses(model, what, images is not None and len(images) > 0)
    if head_fusion not in ("mean", "max", "min"):
        raise InvalidValueError(f"head_fusion must be mean, max or min, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise InvalidValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if images is not None and image_names is not None and len(image_names) != len(images):
        raise InvalidValueError(f"{len(image_names)} image names for {len(images)} images")
    preprocessing = preprocessing or metadata_of(model).preprocessing
    summary: dict = {"title": title, "model": cfg.to_dict(), "analyses": names}
    arrays: dict[str, np.ndarray] = {}
    figures: dict[str, tuple[bytes, str]] = {}  # name -> (png, caption)

    if "filters" in names:
        pca = embedding_filters_pca(model, num_components)
        arrays.update(filters_components=pca.components.numpy(), filters_mean=pca.mean.numpy(),
                      filters_explained_variance_ratio=pca.explained_variance_ratio.numpy())
        ratio = pca.explained_variance_ratio.tolist()
        summary["filters"] = {"num_filters": cfg.embed_dim, "explained_variance_ratio": ratio}
        figures["filters"] = (figure_png(plot_embedding_filters(pca)),
                              f"First {len(ratio)} principal components of the {cfg.embed_dim} filters; together "
                              f"{100 * sum(ratio):.1f}% of their variance.")
    if "posemb" in names:
        similarity = position_embedding_similarity(model)
        structure = position_embedding_structure(similarity)
        arrays["posemb_similarity"] = similarity.numpy()
        summary["posemb"] = {"kind": cfg.pos_embed, "grid_size": list(cfg.grid_size),
                             **{k: _finite(v) for k, v in structure._asdict().items()}}
        figures["posemb"] = (figure_png(plot_position_similarity(similarity, structure)),
                             f"Cosine similarity between position embeddings ({cfg.pos_embed}); correlation with "
                             f"grid distance {structure.distance_correlation:.3f}, row/column effect "
                             f"{structure.row_column_effect:+.3f}.")
    if "distance" in names or "rollout" in names:
        stats = attention_statistics(model, images, rollout_images if "rollout" in names else 0, head_fusion,
                                     discard_ratio, batch_size, device, dynamic_img_size)
        grid, pixels_per_token = stats.grid_size, getattr(cfg, "reduction", cfg.patch_size)
        if "distance" in names:
            table = stats.mean_distance
            uniform = float(patch_centre_distances(grid, pixels_per_token).mean())
            arrays["attention_distance"] = table.numpy()
            summary["distance"] = {"num_images": len(images), "units": "pixels", "uniform_attention": uniform,
                                   "grid_size": list(grid), "per_layer_mean": table.mean(dim=1).tolist(),
                                   "table": table.tolist()}
            figures["distance"] = (figure_png(plot_attention_distance(table, grid, pixels_per_token,
                                                                      len(images))),
                                   f"Layer by layer, one dot per head, averaged over {len(images)} images; dashed: "
                                   f"uniform attention ({uniform:.1f} px).")
        if "rollout" in names:
            k = stats.rollout.shape[0]
            labels = _predicted_labels(model, stats.logits)
            shown_names = [Path(n).name for n in image_names[:k]] if image_names is not None else [
                f"image {i + 1}" for i in range(k)]
            titles = [f"{n[:18]}\n{label}" if label else n[:18] for n, label in zip(shown_names, labels)]
            arrays["rollout"] = stats.rollout.numpy()
            if stats.logits.numel():
                arrays["rollout_logits"] = stats.logits.numpy()
            source = "class token" if cfg.pool == "token" else "mean of the patch tokens"
            summary["rollout"] = {"images": list(shown_names), "predictions": labels, "head_fusion": head_fusion,
                                  "discard_ratio": discard_ratio, "source": source}
            figures["rollout"] = (figure_png(plot_rollout(display_images(images[:k], preprocessing), stats.rollout,
                                                          titles)),
                                  f"Rollout from the {source}, heads fused by {head_fusion}"
                                  + (f", lowest {100 * discard_ratio:.0f}% discarded" if discard_ratio else "") + ".")

    out = make_folder(out_dir)
    files = {}
    for name, (png, _) in figures.items():
        files[name] = out / f"{name}.png"
        write_bytes_atomic(files[name], png)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files["npz"] = out / "inspection.npz"
    write_bytes_atomic(files["npz"], buffer.getvalue())
    summary["files"] = {k: v.name for k, v in files.items()} | {"json": "inspection.json", "html": "index.html"}
    write_bytes_atomic(out / "inspection.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_bytes_atomic(out / "index.html", render_html(title, summary, figures).encode())
    return summary


def _predicted_labels(model: nn.Module, logits: torch.Tensor) -> list[str]:
    if logits.numel() == 0:
        return [""] * logits.shape[0]
    probs = logits.softmax(dim=-1)
    conf, index = probs.max(dim=-1)
    names = metadata_of(model).class_names
    labels = []
    for c, i in zip(conf.tolist(), index.tolist()):
        label = names[i] if names and i < len(names) else f"class {i}"
        labels.append(f"{label} ({c:.2f})")
    return labels


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, summary: dict, figures: dict[str, tuple[bytes, str]], layout: PageLayout = LAYOUT) -> str:
    """One self-contained page: the figures (base64 PNG) in a fixed grid, then the numbers behind them."""
    cfg = summary["model"]
    L = layout
    cards = []
    for name, (png, caption) in figures.items():
        data = base64.b64encode(png).decode("ascii")
        cards.append(f'<figure class="card" id="{name}"><h2>{html.escape(HEADINGS[name])}</h2>'
                     f'<img alt="{name}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    sections = []
    if "filters" in summary:
        ratio = summary["filters"]["explained_variance_ratio"]
        sections.append("<h3>Filter principal components: explained variance</h3>" + _table(
            [[str(i + 1), f"{100 * r:.2f}%", f"{100 * sum(ratio[: i + 1]):.2f}%"] for i, r in enumerate(ratio)],
            ["component", "variance", "cumulative"]))
    if "posemb" in summary:
        p = summary["posemb"]

        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        sections.append("<h3>Position-embedding structure</h3>" + _table(
            [["correlation of similarity with grid distance", fmt(p["distance_correlation"])],
             ["row/column contrast (same row or column minus others)", fmt(p["row_column_contrast"])],
             ["row/column effect (distance taken out)", fmt(p["row_column_effect"])],
             ["share of positions most similar to a neighbour", fmt(p["neighbour_peak_rate"])]],
            ["measure", "value"]))
    if "distance" in summary:
        table = summary["distance"]["table"]
        heads = len(table[0]) if table else 0
        sections.append("<h3>Mean attention distance (pixels), layer x head</h3>" + _table(
            [[str(i + 1)] + [f"{v:.2f}" for v in row] for i, row in enumerate(table)],
            ["layer"] + [f"head {h + 1}" for h in range(heads)]))
    if "rollout" in summary:
        r = summary["rollout"]
        sections.append("<h3>Rollout images</h3>" + _table(
            [[name, pred] for name, pred in zip(r["images"], r["predictions"])], ["image", "prediction"]))
    subtitle = (f"image {cfg['img_size'][0]}x{cfg['img_size'][1]} px, patch {cfg['patch_size'][0]}x"
                f"{cfg['patch_size'][1]}, D={cfg['embed_dim']}, depth {cfg['depth']}, {cfg['num_heads']} heads, "
                f"pos_embed {cfg['pos_embed']}, pool {cfg['pool']}")
    css = f"""
*{{box-sizing:border-box;margin:0;padding:0}}
body{{font-family:sans-serif;background:#fff;color:#222;width:{L.page_width}px}}
header{{height:{L.header_height}px;padding:12px {L.padding}px;overflow:hidden}}
header h1{{font-size:20px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}}
header p{{font-size:13px;color:#555;margin-top:6px}}
.grid{{display:grid;grid-template-columns:repeat({L.columns},{L.card_width}px);gap:{L.padding}px;padding:{L.padding}px}}
.card{{width:{L.card_width}px;height:{L.card_height}px;overflow:hidden}}
.card h2{{height:{L.heading_height}px;line-height:{L.heading_height}px;font-size:15px;
  white-space:nowrap;overflow:hidden}}
.card img{{display:block;width:{L.card_width}px;height:{L.image_height}px;object-fit:contain}}
.card figcaption{{height:{L.caption_height}px;font-size:12px;color:#444;overflow:hidden;padding-top:4px}}
.numbers{{padding:0 {L.padding}px {L.padding}px}}
.numbers h3{{font-size:15px;margin:14px 0 6px}}
table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
"""
    page_title = f"vitlab inspect: {title}" if title else "vitlab inspect"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(page_title)}</title>"
            f"<style>{css}</style></head><body><header><h1>{html.escape(page_title)}</h1>"
            f"<p>{html.escape(subtitle)}</p></header><main><div class=\"grid\">{''.join(cards)}</div>"
            f"<div class=\"numbers\">{''.join(sections)}</div></main></body></html>\n")
