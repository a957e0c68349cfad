"""``vitlab models``: the registered variants with parameter count and analytic forward compute."""

from __future__ import annotations

import argparse
import json

import torch

from ..compute.flops import forward_macs
from ..models import create_model, get_config, list_models


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the model variants with their size and compute",
                              description="List registered models: parameters and forward GMACs / GFLOPs per image.")
    p.add_argument("pattern", nargs="?", help="only names containing this text (or matching this glob)")
    p.add_argument("--img-size", type=int, help="resolution to report compute at (default: each model's own)")
    p.add_argument("--num-classes", type=int, help="head size used for counting (default: each model's own)")
    p.add_argument("--aliases", action="store_true", help="list timm-style aliases too")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v is not None}
    names = list_models(args.pattern, aliases=args.aliases)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}")
    rows = model_rows(names, **overrides)
    skipped = len(names) - len(rows)
    if not rows:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the patch size of any matching model")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<24} {'res':>9} {'patch':>5} {'tokens':>6} {'params':>13} {'GMACs':>9} {'GFLOPs':>9}")
    for r in rows:
        res = "x".join(map(str, r["img_size"]))
        if r["patch_size"] is None:
            patch, tokens = "-", "-"
        else:
            ph, pw = r["patch_size"]
            patch, tokens = (ph if ph == pw else f"{ph}x{pw}"), r["tokens"]
        print(f"{r['name']:<24} {res:>9} {patch:>5} {tokens:>6} {r['params']:>13,} {r['gmacs']:>9.2f} "
              f"{r['gflops']:>9.2f}")
    if skipped:
        print(f"({skipped} models skipped: --img-size {args.img_size} is not a multiple of their patch size)")
    return 0
