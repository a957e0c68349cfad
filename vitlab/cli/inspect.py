"""``vitlab inspect``: the paper's inspection figures (filters, position embeddings, attention distance, rollout) for a
checkpoint, written as PNGs, raw values and one HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InvalidValueError, VitlabError
from ..inspect import ANALYSES, find_images, inspect_model, load_images
from ..inspect.report import NEEDS_IMAGES
from ..models import metadata_of
from .convert import _size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="filters, position-embedding similarity, attention distance and rollout figures",
        description="Draw the paper's inspection figures (Fig. 6, 7, 10, 11) for a checkpoint: PNG files, the raw "
                    "values (inspection.npz, inspection.json) and index.html showing them all.")
    p.add_argument("checkpoint", metavar="CKPT", help="any checkpoint vitlab.load reads")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--images", type=Path,
                   help="an image file or a folder of images (searched recursively, sorted); needed for distance and "
                        "rollout")
    p.add_argument("--what", help=f"comma-separated analyses (default: all that apply): {','.join(ANALYSES)}")
    p.add_argument("--model", help="registered model name, for checkpoint layouts that do not store the architecture")
    p.add_argument("--num-images", type=int, default=128,
                   help="images averaged for the mean attention distance (default: 128, as in the paper)")
    p.add_argument("--rollout-images", type=int, default=8, help="images drawn with their rollout (default: 8)")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean",
                   help="how the rollout combines heads (default: mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="share of the lowest attentions each rollout row drops, in [0, 1) (default: 0)")
    p.add_argument("--components", type=int, default=28, help="principal components of the filters (default: 28)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--device", default="cpu", help="torch device for the forward passes (default: cpu)")
    p.add_argument("--img-size", type=_size,
                   help="run distance and rollout at this input size, N or HxW (a multiple of the patch; the position "
                        "embedding is resampled for the grid; default: the model's size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import load

    for option, value, low in (("--num-images", args.num_images, 1), ("--rollout-images", args.rollout_images, 1),
                               ("--components", args.components, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise InvalidValueError(f"{option} must be at least {low}, got {value}")
    what = args.what.split(",") if args.what is not None else None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitlabError(f"--device {args.device}: CUDA is not available")
    model = load(args.checkpoint, model_name=args.model)
    preprocessing = metadata_of(model).preprocessing
    if args.img_size is not None:
        preprocessing = preprocessing.replace(img_size=args.img_size)
    images = names = None
    wants_images = what is None or any(w.strip() in NEEDS_IMAGES for w in what)
    if args.images is not None and wants_images:
        paths = find_images(args.images, limit=args.num_images)
        images = load_images(paths, preprocessing)
        names = [str(p) for p in paths]
    model.to(device)
    summary = inspect_model(model, args.out, images=images, image_names=names, what=what,
                            preprocessing=preprocessing, num_components=args.components,
                            rollout_images=args.rollout_images, head_fusion=args.head_fusion,
                            discard_ratio=args.discard_ratio, batch_size=args.batch_size, device=device,
                            title=Path(args.checkpoint).name,
                            dynamic_img_size=True if args.img_size is not None else None)
    print(f"wrote {', '.join(summary['files'].values())} to {args.out}")
    if "filters" in summary:
        ratio = summary["filters"]["explained_variance_ratio"]
        print(f"filters: {len(ratio)} components explain {100 * sum(ratio):.1f}% of the variance "
              f"(first: {100 * ratio[0]:.1f}%)")
    if "posemb" in summary:
        p = summary["posemb"]

        def fmt(v):
            return "n/a" if v is None else f"{v:.3f}"

        print(f"posemb: corr(similarity, grid distance) {fmt(p['distance_correlation'])}, row/column contrast "
              f"{fmt(p['row_column_contrast'])}, row/column effect {fmt(p['row_column_effect'])}, most similar to a "
              f"neighbour {fmt(p['neighbour_peak_rate'])}")
    if "distance" in summary:
        d = summary["distance"]
        layers = " ".join(f"{v:.1f}" for v in d["per_layer_mean"])
        print(f"mean attention distance over {d['num_images']} images at grid {'x'.join(map(str, d['grid_size']))} "
              f"(px, per layer, mean of heads): {layers}; "
              f"uniform attention: {d['uniform_attention']:.1f}")
    if "rollout" in summary:
        print(f"rollout: {len(summary['rollout']['images'])} images in rollout.png")
    print(f"open {Path(args.out) / 'index.html'}")
    return 0
