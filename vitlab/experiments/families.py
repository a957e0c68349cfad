"""The paper's Fig. 7 panels for several checkpoints side by side: mean attention distance and position embeddings.

Section 4.5 of the paper inspects one ViT: how far each head attends, layer by layer (Fig. 7 right, Fig. 11), and how
the learned position embeddings resemble each other (Fig. 7 centre, Fig. 10). This experiment trains nothing: it
loads each checkpoint given (a path, a catalog name such as ``vit_l16.augreg_in21k``, or a registered model name,
which takes its default tag: ``dinov2_l14`` is ``dinov2_l14.lvd142m``), runs the same images through each with its
own preprocessing, and writes one figure with a column per model (attention distance above, position-embedding
similarity below), ``results.json`` / ``results.md`` with the numbers and ``families.npz`` with the arrays.

Prefix tokens (class, distillation, registers) have no position: they are left out of the distances and of the
similarity grid, whatever their number (``cfg.num_prefix_tokens``) and whether they own position-embedding rows
(``cfg.num_pos_prefix``). Attention-pooling models (SigLIP) have their encoder's layers measured; the pooling probe
has no position of its own. Images: ``--images`` takes a folder or file, a named data set (its test split) or
``sample-photos`` (default: scikit-learn's two sample photographs, cut into square crops; offline).

    vitlab experiment families --models vit_l16.augreg_in21k dinov2_l14 siglip_l16 clip_l14_quickgelu \\
        --img-size 224 --num-images 128 --out results/families
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..atomic import make_folder, write_bytes_atomic
from ..data import load_arrays
from ..data.arrays import canonical_name
from ..errors import InvalidValueError, VitlabError
from ..factory import load
from ..hub import DEFAULT_TAGS, is_checkpoint_name
from ..inspect import (
    attention_statistics,
    find_images,
    patch_centre_distances,
    position_embedding_similarity,
    position_embedding_structure,
)
from ..models import metadata_of
from ..models import resolve as resolve_model
from ..preprocessing import Preprocessing
from .common import markdown_table, new_figure, save_figure, script_main, write_report

SAMPLE_PHOTOS = "sample-photos"
# attention maps of one batch kept at once (float32, every layer): DINOv2-L at 518 px needs 2.9 GB for one image
ATTENTION_BUDGET_BYTES = 2 << 30
NPZ = "families.npz"


def checkpoint_spec(spec: str) -> str:
    """What to load for ``spec``: an existing path or catalog name as it is; a registered model name without a tag
    (``dinov2_l14``, ``vit_large_patch16_224``) becomes its catalog default (``dinov2_l14.lvd142m``)."""
    if Path(spec).exists() or is_checkpoint_name(spec):
        return spec
    try:
        entry = resolve_model(spec)[0]
    except KeyError:
        return spec  # the loader names the missing file
    tag = DEFAULT_TAGS.get(entry.name)
    if tag is None:
        raise VitlabError(f"--models {spec}: the model has no pre-trained weights in the catalog (vitlab models "
                          "--pretrained); give a checkpoint path")
    return f"{entry.name}.{tag}"


def sample_photos(count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` square crops of scikit-learn's two sample photographs (a temple and a flower, 427x640): alternately
    from each, at random positions, 60-100% of the short side, reproducible from ``seed``."""
    try:  # optional dependency (the `data` extra): only this default image source needs it
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise VitlabError("--images sample-photos needs scikit-learn (pip install scikit-learn); or give --images "
                          "FOLDER or a named data set") from None
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        side = int(round(min(height, width) * rng.uniform(0.6, 1.0)))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crops.append(Image.fromarray(photo[top : top + side, left : left + side]))
    return crops


def dataset_images(name: str, count: int) -> list[Image.Image]:
    """The first ``count`` test images of a named in-memory data set, as PIL images (grey or RGB)."""
    images = load_arrays(name, "test").images[:count]
    out = []
    for image in images:
        array = image.permute(1, 2, 0).numpy()
        out.append(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))
    return out


def folder_images(path: str, count: int) -> list[Image.Image]:
    """The first ``count`` image files of a folder (or one file), decoded with their EXIF orientation applied."""
    out = []
    for file in find_images(path, limit=count):
        try:
            with Image.open(file) as image:
                image = ImageOps.exif_transpose(image)
                image.load()
                out.append(image)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise VitlabError(f"{file}: not a readable image ({exc})") from exc
    return out


def gather_images(source: str, count: int, seed: int = 0) -> list[Image.Image]:
    """The images of ``--images``: ``sample-photos``, a named data set (``fashion-mnist``, ``cifar10``, ...) or a
    folder / file."""
    if count < 1:
        raise InvalidValueError(f"--num-images must be at least 1, got {count}")
    if source == SAMPLE_PHOTOS:
        return sample_photos(count, seed)
    if canonical_name(source) is not None and not Path(source).exists():
        return dataset_images(source, count)
    return folder_images(source, count)


def model_inputs(model, images: list[Image.Image], img_size) -> tuple[torch.Tensor, Preprocessing]:
    """``images`` preprocessed as ``model`` expects (its own preprocessing, or the paper's), at ``img_size`` when
    given."""
    preprocessing = metadata_of(model).preprocessing
    if img_size is not None:
        preprocessing = preprocessing.replace(img_size=img_size)
    transform = preprocessing.transform()
    return torch.stack([transform(image) for image in images]), preprocessing


def attention_batch_size(model, grid: tuple[int, int], most: int) -> int:
    """The largest batch up to ``most`` whose attention maps (every layer, float32) fit ATTENTION_BUDGET_BYTES."""
    cfg = model.cfg
    tokens = cfg.num_prefix_tokens + grid[0] * grid[1]
    per_image = cfg.depth * cfg.num_heads * tokens * tokens * 4
    return max(1, min(most, ATTENTION_BUDGET_BYTES // per_image))


def measure_model(model, images: torch.Tensor, *, dynamic_img_size: bool | None = None, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> tuple[dict, dict[str, np.ndarray]]:
    """Both Fig. 7 panels of one model on preprocessed ``images``: the result row (config facts, per-layer and
    per-head mean attention distance in pixels, position-embedding structure) and its arrays
    (``attention_distance`` (layers, heads), ``posemb_similarity`` (gh, gw, gh, gw) when the model has a position
    embedding)."""
    cfg = model.cfg
    grid = model.input_grid(images[:1], dynamic_img_size)
    pixels_per_token = getattr(cfg, "reduction", cfg.patch_size)
    model.to(device)
    stats = attention_statistics(model, images, rollout_images=0, batch_size=attention_batch_size(
        model, grid, batch_size), device=device, dynamic_img_size=dynamic_img_size)
    table = stats.mean_distance
    row = {
        "img_size": list(images.shape[-2:]), "grid_size": list(stats.grid_size), "patch_size": list(cfg.patch_size),
        "depth": cfg.depth, "num_heads": cfg.num_heads, "embed_dim": cfg.embed_dim, "pool": cfg.pool,
        "num_prefix_tokens": cfg.num_prefix_tokens, "prefix_tokens": list(cfg.prefix_token_names),
        "num_pos_prefix": cfg.num_pos_prefix, "pos_embed": cfg.pos_embed, "options": cfg.family_options(),
        "params": sum(p.numel() for p in model.parameters()), "num_images": int(images.shape[0]),
        "uniform_attention": float(patch_centre_distances(stats.grid_size, pixels_per_token).mean()),
        "distance_per_layer": [round(v, 4) for v in table.mean(dim=1).tolist()],
        "distance_table": [[round(v, 4) for v in layer] for layer in table.tolist()],
    }
    arrays = {"attention_distance": table.numpy()}
    if cfg.pos_embed not in ("none", "rope"):  # rope: no embedding table (positions rotate q and k)
        similarity = position_embedding_similarity(model)  # the model's own grid, prefix rows left out
        structure = position_embedding_structure(similarity)
        arrays["posemb_similarity"] = similarity.numpy()
        row["posemb_grid"] = list(similarity.shape[:2])
        row.update({f"posemb_{k}": (round(v, 4) if math.isfinite(v) else None)
                    for k, v in structure._asdict().items()})
    return row, arrays


def measure(args: argparse.Namespace) -> None:
    """Load every checkpoint of ``args.models``, measure it on the images, and write results.json and the npz."""
    if not args.models:
        raise VitlabError("--models: give at least one checkpoint (a path, a catalog name or a model name)")
    labels = args.labels or [Path(m).name if Path(m).exists() else m for m in args.models]
    if not args.labels and len(set(labels)) != len(labels):  # e.g. runs/a/model.safetensors, runs/b/model.safetensors
        labels = list(args.models)
    if len(labels) != len(args.models) or len(set(labels)) != len(labels):
        raise InvalidValueError(f"--labels: need {len(args.models)} distinct labels, one per --models entry, got "
                                f"{len(labels)} ({', '.join(labels)})")
    if args.batch_size < 1:
        raise InvalidValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitlabError(f"--device {args.device}: CUDA is not available")
    images = gather_images(args.images, args.num_images, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, arrays = [], {}
    for index, (label, spec) in enumerate(zip(labels, args.models)):
        print(f"[{index + 1}/{len(labels)}] {label}: loading {checkpoint_spec(spec)} ...", flush=True)
        model = load(checkpoint_spec(spec))
        if not hasattr(model, "forward_with_attention"):
            raise VitlabError(f"--models {spec}: a {type(model).__name__} has no attention layers to measure")
        inputs, preprocessing = model_inputs(model, images, args.img_size)
        row, found = measure_model(model, inputs, dynamic_img_size=True if args.img_size else None,
                                   batch_size=args.batch_size, device=device)
        rows.append({"label": label, "checkpoint": spec, "images": args.images,
                     "preprocessing": preprocessing.to_dict(), **row})
        arrays.update({f"{index}/{key}": value for key, value in found.items()})
        print(f"[{index + 1}/{len(labels)}] {label}: mean distance per layer "
              + " ".join(f"{v:.0f}" for v in row["distance_per_layer"]) + f" px (uniform "
              f"{row['uniform_attention']:.0f})", flush=True)
        del model
    out = make_folder(args.out)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(out / NPZ, buffer.getvalue())
    write_bytes_atomic(out / "results.json", json.dumps({"rows": rows}, indent=1).encode())


def load_arrays_of(out: str | Path, rows: list[dict]) -> list[dict[str, np.ndarray]]:
    """The arrays of each row from ``out/families.npz`` (written with the rows)."""
    path = Path(out) / NPZ
    if not path.is_file():
        raise VitlabError(f"{path}: missing (run without --plot-only first)")
    with np.load(path, allow_pickle=False) as data:
        return [{key.split("/", 1)[1]: data[key] for key in data.files if key.split("/", 1)[0] == str(i)}
                for i in range(len(rows))]


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(rows: list[dict], out: str) -> None:
    """results.md (a table of the models and one of the mean distance per layer) and families.png."""
    summary = []
    for r in rows:
        table = r["distance_table"]
        summary.append({**r, "grid": "x".join(map(str, r["grid_size"])),
                        "prefix": ", ".join(r["prefix_tokens"]) or "none",
                        "first": sum(table[0]) / len(table[0]), "last": sum(table[-1]) / len(table[-1]),
                        "first_min": min(table[0]), "first_max": max(table[0]),
                        "corr": r.get("posemb_distance_correlation"), "effect": r.get("posemb_row_column_effect"),
                        "peak": r.get("posemb_neighbour_peak_rate")})
    columns = [("label", "model"), ("grid", "grid"), ("prefix", "prefix tokens"), ("num_pos_prefix", "prefix pos rows"),
               ("pool", "pool"), ("first", "layer 1 mean px"), ("first_min", "layer 1 min head px"),
               ("first_max", "layer 1 max head px"), ("last", "last layer mean px"),
               ("uniform_attention", "uniform px"), ("corr", "posemb corr. with distance"),
               ("effect", "posemb row/col effect"), ("peak", "posemb neighbour peak")]
    depth = max(len(r["distance_per_layer"]) for r in rows)
    per_layer = ["| layer | " + " | ".join(r["label"] for r in rows) + " |", "|" + "---|" * (len(rows) + 1)]
    for layer in range(depth):
        cells = [_fmt(r["distance_per_layer"][layer]) if layer < len(r["distance_per_layer"]) else "-" for r in rows]
        per_layer.append(f"| {layer + 1} | " + " | ".join(cells) + " |")
    images = {r["images"] for r in rows}
    notes = ["Mean attention distance in input pixels (attention-weighted distance between query and key patch "
             "centres, patch queries and keys only, averaged over heads, queries and images): per layer below, "
             "per head in results.json.",
             "\n".join(per_layer),
             f"Images: {', '.join(sorted(images))}, {rows[0]['num_images']} per model, each model's own "
             "preprocessing. Position-embedding numbers over the model's own grid (prefix rows left out)."]
    write_report(out, "Attention distance and position embeddings across model families",
                 markdown_table(summary, columns), notes)
    plot(rows, load_arrays_of(out, rows), out)


def _mosaic(similarity: np.ndarray) -> np.ndarray:
    """(gh, gw, gh, gw) -> one image of gh x gw tiles with a one-pixel NaN gap."""
    gh, gw = similarity.shape[:2]
    out = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
    for i in range(gh):
        for j in range(gw):
            out[i * (gh + 1) : i * (gh + 1) + gh, j * (gw + 1) : j * (gw + 1) + gw] = similarity[i, j]
    return out


def plot(rows: list[dict], arrays: list[dict[str, np.ndarray]], out: str) -> Path:
    """families.png: a column per model; top, mean attention distance per head against depth (Fig. 7 right), with
    uniform attention dashed; bottom, the position-embedding similarity mosaic (Fig. 7 centre)."""
    fig, axes = new_figure(3.2 * len(rows) + 0.8, 6.4, ncols=len(rows), nrows=2)
    fig.set_layout_engine("constrained")  # keeps the shared colour bar and the titles apart
    axes = np.asarray(axes).reshape(2, len(rows))
    top = max(max(max(layer) for layer in r["distance_table"]) for r in rows)
    top = max(top, max(r["uniform_attention"] for r in rows)) * 1.05
    image = None
    for column, (row, found) in enumerate(zip(rows, arrays)):
        ax = axes[0, column]
        table = found["attention_distance"]
        for head in range(table.shape[1]):
            ax.scatter(np.arange(1, table.shape[0] + 1), table[:, head], s=6)
        ax.axhline(row["uniform_attention"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, top)
        ax.set_title(f"{row['label']}\n{'x'.join(map(str, row['img_size']))} px, grid "
                     f"{'x'.join(map(str, row['grid_size']))}", fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
        ax.locator_params(axis="x", integer=True)
        if column == 0:
            ax.set_ylabel("mean attention distance (px)", fontsize=8)
        ax = axes[1, column]
        ax.set_xticks([])
        ax.set_yticks([])
        if "posemb_similarity" in found:
            image = ax.imshow(np.ma.masked_invalid(_mosaic(found["posemb_similarity"])), cmap="viridis", vmin=-1,
                              vmax=1, interpolation="nearest")
            ax.set_title(f"position embedding similarity\n{'x'.join(map(str, row['posemb_grid']))} patches",
                         fontsize=8)
        else:
            ax.set_title("no position embedding", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes[1]), shrink=0.8, label="cosine similarity")
    return save_figure(fig, out, "families.png", tight=False)


def rows_ok(rows: list[dict]) -> bool:
    """Whether every model's distance table is finite."""
    return all(all(math.isfinite(v) for layer in r["distance_table"] for v in layer) for r in rows)


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    try:
        size = (int(height), int(width or height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (no training: no --steps or --data)."""
    parser.add_argument("--models", nargs="+", metavar="CKPT",
                        help="checkpoints to compare: paths, catalog names (vit_l16.augreg_in21k) or model names "
                             "(their default tag: dinov2_l14 -> dinov2_l14.lvd142m); one figure column each")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="column titles (default: the --models)")
    parser.add_argument("--out", default="results/families", help="results folder (default results/families)")
    parser.add_argument("--images", default=SAMPLE_PHOTOS,
                        help="folder or image file, a named data set (its test split: fashion-mnist, cifar10, ...) "
                             "or sample-photos (default: crops of scikit-learn's two sample photographs)")
    parser.add_argument("--num-images", type=int, default=32,
                        help="images averaged for the attention distance (default 32; the paper used 128)")
    parser.add_argument("--img-size", type=_size,
                        help="run every model at this input size, N or HxW (position embeddings resampled for the "
                             "attention; the similarity panel stays on each model's own grid); default: each "
                             "model's own size")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="most images per forward pass (default 32; fewer when the attention maps of a batch "
                             "would pass 2 GiB)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample-photo crops (default 0)")
    parser.add_argument("--plot-only", action="store_true", help="redraw table and plot from results.json")


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
