"""``vitlab predict CKPT IMAGES...``: top-k classes for image files; a bad image gets its own error line."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InvalidValueError
from ._merging import ALIASES, add_merge_tokens_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="top-k classes for image files",
                              description="Predict the top-k classes of image files with a checkpoint's own "
                                          "preprocessing and class names. Unreadable files get an error line; the "
                                          "others are still predicted (exit status 1 if any failed).")
    p.add_argument("checkpoint", help="any checkpoint vitlab.load reads, or an .onnx / .pt2 file from `vitlab export`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, help="classes listed per image (default 5, or all of a model with fewer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON (one object per image)")
    add_merge_tokens_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..compute.pt2 import is_exported_file, load_exported
    from ..compute.tome import merge_tokens
    from ..train import predict
    from .train import flags_in_errors

    if args.topk is not None and args.topk < 1:
        raise InvalidValueError(f"--topk must be at least 1, got {args.topk}")
    model = load_exported(args.checkpoint) if is_exported_file(args.checkpoint) else load(args.checkpoint)
    if args.merge_tokens:
        with flags_in_errors(ALIASES, config_flags=False):
            merge_tokens(model, args.merge_tokens)
    results = predict(model, args.images, topk=args.topk or 5, device=args.device)
    listed = max((len(r.top) for r in results if not r.error), default=args.topk)
    if args.topk is not None and listed < args.topk:  # asked for, not the default: say why fewer are listed
        print(f"vitlab predict: --topk {args.topk} is more than the model's {listed} classes: all {listed} are listed",
              file=sys.stderr)
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            if not args.json:
                print(f"vitlab predict: error: {r.error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"name": r.source, "error": r.error,  # "name", as the server's answers call it
                              "top": [{"index": i, "class": name, "probability": p} for i, name, p in r.top]}))
        elif not r.error:
            ranked = ", ".join(f"{name} {100 * p:.1f}%" for _, name, p in r.top)
            print(f"{r.source}: {ranked}")
    return 1 if failed else 0
