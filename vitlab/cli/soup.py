"""``vitlab soup A B C ... --out soup.safetensors``: average fine-tuned models into one (uniform, weighted or greedy
model soup), optionally scored on held-out data."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InvalidValueError
from .train import EVAL_DATA_FLAGS, add_hf_data_arguments, flags_in_errors, hf_data

# soup_checkpoints' arguments that library errors name -> this command's flags
FLAGS = {**EVAL_DATA_FLAGS, "out": "--out", "weights": "--weights", "greedy": "--greedy", "data": "--data",
         "holdout": "--holdout", "max_samples": "--max-samples", "score": "--data", "prefer_ema": "--ema"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("soup",
                              help="average fine-tuned models into one (uniform, weighted or greedy model soup)",
                              description="Average the weights of two or more checkpoints of the same model (fine-"
                                          "tunes from one start, or one run's checkpoints) into one vitlab "
                                          ".safetensors file: the uniform soup, a weighted average (--weights), or "
                                          "the greedy soup (--greedy: sorted by held-out top-1, each kept only if "
                                          "the soup's held-out top-1 does not drop). Models that differ in "
                                          "architecture, shapes or classes are refused.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="two or more checkpoints vitlab.load reads (files, run folders, checkpoints/last.pt, "
                        "catalog names, hf-hub: repos)")
    p.add_argument("--out", required=True, help="the soup's .safetensors file (must not exist)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one non-negative weight per checkpoint (default: all equal)")
    p.add_argument("--greedy", action="store_true",
                   help="the greedy soup, chosen on held-out data (--data, --split, --holdout)")
    p.add_argument("--data", help="held-out data to score each checkpoint and the soup on (top-1): a named set, "
                                  "image folder, manifest, tar shards or Hugging Face source; never the test set "
                                  "you report")
    add_hf_data_arguments(p)
    p.add_argument("--split", default="train", help="split of --data (default train, with --holdout)")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="score on the N training images that runs trained with --set holdout=N held out (named "
                        "sets; the same --seed)")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed, which chose the held-out images (default 0)")
    p.add_argument("--data-dir", help="folder holding a named set's files")
    p.add_argument("--max-samples", type=int, help="score on a seeded random subset of this many images")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of training checkpoints (.pt)")
    p.add_argument("--model", help="registered model name, for checkpoint layouts that do not store the architecture")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for folders and shards")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..soups import check_soup_out
    from ..tasks.soup import soup_checkpoints

    for option, value in (("--batch-size", args.batch_size), ("--max-samples", args.max_samples or 1)):
        if value < 1:
            raise InvalidValueError(f"{option} must be positive")
    if args.holdout < 0:
        raise InvalidValueError(f"--holdout must be 0 or more, got {args.holdout}")
    with flags_in_errors(FLAGS, config_flags=False):
        check_soup_out(args.out)  # before any checkpoint is read
        result = soup_checkpoints(
            args.checkpoints, args.out, weights=args.weights, greedy=args.greedy, data=hf_data(args.data, args),
            split=args.split, holdout=args.holdout, seed=args.seed, data_dir=args.data_dir,
            max_samples=args.max_samples, prefer_ema=args.ema, model_name=args.model, batch_size=args.batch_size,
            device=args.device, num_workers=args.workers,
            log=None if args.json else lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    for note in result.notes:
        print(f"note: {note}")
    if result.method == "greedy":
        print(f"greedy soup of {len(result.kept)} of {len(result.ingredients)} checkpoints, held-out top-1 "
              f"{100 * result.score:.2f}%:")
    else:
        print(f"{result.method} soup of {len(result.ingredients)} checkpoints"
              + (f", held-out top-1 {100 * result.score:.2f}%:" if result.score is not None else ":"))
    for item in result.ingredients:
        score = f"  top-1 {100 * item.score:.2f}%" if item.score is not None else ""
        weight = f"  weight {item.weight:g}" if result.method == "weighted" else ""
        kept = "" if result.method != "greedy" else ("  kept" if item.kept else "  left out")
        print(f"  {item.checkpoint}{weight}{score}{kept}")
    print(f"wrote {result.path}")
    return 0
