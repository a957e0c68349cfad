"""``vitlab models``: the registered variants with parameter count and analytic forward compute."""

from __future__ import annotations

import argparse
import json

import torch

from ..compute.flops import (
    ACCELERATOR_PEAK_FLOPS,
    DATASET_IMAGES,
    accelerator_days,
    forward_macs,
    pretraining_exaflops,
    table6_reproduction,
)
from ..errors import InvalidValueError
from ..models import create_model, get_config, list_models


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the model variants with their size and compute",
                              description="List registered models: parameters and forward GMACs / GFLOPs per image.")
    p.add_argument("pattern", nargs="?", help="only names containing this text (or matching this glob)")
    p.add_argument("--img-size", type=int, help="resolution to report compute at (default: each model's own)")
    p.add_argument("--num-classes", type=int, help="head size used for counting (default: each model's own)")
    p.add_argument("--aliases", action="store_true", help="list timm-style aliases too")
    p.add_argument("--pretrained", action="store_true",
                   help="list the catalog of pre-trained checkpoints instead (resolution, classes, reported ImageNet "
                        "top-1, sources); PATTERN filters their names")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--epochs", type=float, help="add pre-training exaFLOPs for this many epochs")
    p.add_argument("--images", default="jft300m",
                   help=f"images per epoch for --epochs: a number or one of {', '.join(DATASET_IMAGES)} "
                        "(default jft300m = 303M)")
    p.add_argument("--accelerator", default="tpuv3-core", choices=sorted(ACCELERATOR_PEAK_FLOPS),
                   help="with --epochs: also accelerator-days on this unit (default tpuv3-core, as the paper)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation assumed for accelerator-days (default 0.4)")
    p.add_argument("--paper-table6", action="store_true",
                   help="print the paper's Table 6 exaFLOPs next to ours and exit")
    p.set_defaults(func=run)


def parse_images(text: str) -> float:
    """``--images``: a data-set name from DATASET_IMAGES or a positive number (``303e6`` works)."""
    if text in DATASET_IMAGES:
        return DATASET_IMAGES[text]
    try:
        value = float(text)
    except ValueError:
        raise InvalidValueError(f"--images must be a number or one of {', '.join(DATASET_IMAGES)}, "
                                f"got {text!r}") from None
    if value <= 0:
        raise InvalidValueError(f"--images must be positive, got {text}")
    return value


def model_rows(names: list[str], **overrides) -> list[dict]:
    """One dict per model: name, resolution, patch, tokens, parameters, GMACs and GFLOPs."""
    rows = []
    for name in names:
        try:
            cfg = get_config(name, **overrides)
        except ValueError:  # e.g. a resolution that is not a multiple of this model's patch size
            continue
        with torch.device("meta"):  # count parameters without allocating them
            params = create_model(name, **overrides).num_params()
        macs = forward_macs(cfg)
        tokenised = hasattr(cfg, "patch_size")  # ViTs and hybrids; CNN baselines have no patches or tokens
        rows.append({
            "name": name,
            "img_size": list(cfg.img_size),
            "patch_size": list(cfg.patch_size) if tokenised else None,
            "tokens": cfg.num_patches + cfg.num_prefix_tokens if tokenised else None,
            "params": params,
            "gmacs": macs / 1e9,
            "gflops": 2 * macs / 1e9,
        })
    return rows


def print_table6(as_json: bool) -> int:
    both = zip(table6_reproduction(get_config), table6_reproduction(get_config, class_token=False))
    rows = [{**with_cls, "ours_without_class_token": no_cls["ours"], "rel_error_without_class_token":
             no_cls["rel_error"]} for with_cls, no_cls in both]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print("Paper Table 6 (JFT-300M, 303M images, 224 px): 6 x forward MACs x epochs x images, head not counted")
    print(f"{'model':<9} {'epochs':>6} {'paper':>7} {'ours':>8} {'error':>7}   {'no class token':>14} {'error':>7}")
    for r in rows:
        print(f"{r['label']:<9} {r['epochs']:>6} {r['paper']:>7.0f} {r['ours']:>8.1f} {100 * r['rel_error']:>+6.2f}%"
              f"   {r['ours_without_class_token']:>14.1f} {100 * r['rel_error_without_class_token']:>+6.2f}%")
    return 0


def pretrained_rows(pattern: str | None) -> list[dict]:
    """One dict per catalog entry matching ``pattern``: name, model, resolution, classes, top-1, sources."""
    from ..models.pretrained import DEFAULT_TAGS, list_pretrained

    rows = []
    for e in list_pretrained(pattern):
        rows.append({"name": e.name, "model": e.model, "img_size": e.img_size, "num_classes": e.num_classes,
                     "labels": e.labels, "params": e.params, "top1": e.top1, "top1_source": e.top1_source,
                     "top1_paper": e.top1_paper,
                     "top1_timm": e.top1_timm, "default": DEFAULT_TAGS.get(e.model) == e.tag, "license": e.license,
                     "sources": [{"kind": s.kind, "spec": s.spec, "size": s.size, "sha256": s.sha256, "note": s.note}
                                 for s in e.sources]})
    return rows


def print_pretrained(pattern: str | None, as_json: bool) -> int:
    rows = pretrained_rows(pattern)
    if not rows:
        raise InvalidValueError(f"no pre-trained checkpoint matches {pattern!r}")
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'checkpoint':<38} {'res':>4} {'classes':>7} {'params':>8} {'top-1':>6} {'by':<5}  source (more: --json)")
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        mark = "*" if r["default"] else " "
        print(f"{r['name']:<37}{mark} {r['img_size']:>4} {r['num_classes']:>7} {r['params'] / 1e6:>7.1f}M {top1:>6} "
              f"{r['top1_source'] or '':<5}  {r['sources'][0]['spec']}")
    print("* = the default tag of its model (create_model(model, pretrained=True)); top-1: ImageNet val; by: who "
          "reported it (timm: measured by timm on these weights; paper: the ViT paper's table)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.paper_table6:
        return print_table6(args.json)
    if args.pretrained:
        return print_pretrained(args.pattern, args.json)
    if args.epochs is not None and args.epochs <= 0:
        raise InvalidValueError(f"--epochs must be positive, got {args.epochs}")
    if not 0 < args.mfu <= 1:
        raise InvalidValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    images = parse_images(args.images)
    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v is not None}
    names = list_models(args.pattern, aliases=args.aliases)
    if not names:
        raise InvalidValueError(f"no model matches {args.pattern!r}")
    rows = model_rows(names, **overrides)
    if args.epochs is not None:
        for r in rows:
            cfg = get_config(r["name"], **overrides)
            r["exaflops"] = pretraining_exaflops(cfg, args.epochs, images)
            r["accelerator_days"] = accelerator_days(r["exaflops"], args.accelerator, args.mfu)
    skipped = len(names) - len(rows)
    if not rows:
        raise InvalidValueError(f"--img-size {args.img_size} is not a multiple of the patch size of any matching model")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    extra_head = extra_title = ""
    if args.epochs is not None:
        extra_head = f" {'exaFLOPs':>10} {'days':>9}"
        extra_title = (f"pre-training: {args.epochs:g} epochs x {images:.4g} images; days = {args.accelerator}-days "
                       f"at {100 * args.mfu:g}% MFU")
    print(f"{'model':<24} {'res':>9} {'patch':>5} {'tokens':>6} {'params':>13} {'GMACs':>9} {'GFLOPs':>9}{extra_head}")
    for r in rows:
        res = "x".join(map(str, r["img_size"]))
        if r["patch_size"] is None:  # a CNN: no patches, no tokens
            patch, tokens = "-", "-"
        else:
            ph, pw = r["patch_size"]
            patch, tokens = (ph if ph == pw else f"{ph}x{pw}"), r["tokens"]
        extra = f" {r['exaflops']:>10.1f} {r['accelerator_days']:>9.0f}" if args.epochs is not None else ""
        print(f"{r['name']:<24} {res:>9} {patch:>5} {tokens:>6} {r['params']:>13,} {r['gmacs']:>9.2f} "
              f"{r['gflops']:>9.2f}{extra}")
    if extra_title:
        print(extra_title)
    if skipped:
        print(f"({skipped} models skipped: --img-size {args.img_size} is not a multiple of their patch size)")
    return 0
