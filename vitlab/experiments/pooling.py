"""Class token vs global average pooling, each at its own tuned learning rate (paper appendix D.3, Figure 9).

The paper finds that a ViT with global average pooling (GAP) instead of the class token does poorly at the class
token's learning rate, and as well once the learning rate is re-tuned. In small: both heads over a grid of learning
rates; each run is evaluated on 5,000 held-out training images (the tuning split), the best learning rate of each
head is chosen there, and the test accuracy of the chosen runs is compared. GAP here is the vit_jax / big_vision
form: no class token, final LayerNorm on every token, then the mean.

    python -m vitlab.experiments.pooling --out results/pooling
"""

from __future__ import annotations

import argparse
import sys

from .common import (
    SMALL_VIT,
    Run,
    add_common_arguments,
    base_config,
    line_plot,
    markdown_table,
    script_main,
    write_report,
)

HEADS = {"class token": {"pool": "token", "class_token": True}, "GAP": {"pool": "gap", "class_token": False}}


def build_runs(args: argparse.Namespace) -> list[Run]:
    runs = []
    for head, options in HEADS.items():
        for lr in args.lrs:
            model_args = dict(SMALL_VIT if args.model == "vit_fmnist" else {}, **options)
            config = base_config(args, model=args.model, model_args=model_args, lr=lr, holdout=args.holdout,
                                 run_name=f"pool-{options['pool']}-lr{lr:g}")
            runs.append(Run(f"{head} / lr {lr:g}", config, {"head": head, "lr": lr, "model": args.model}))
    return runs


def best_per_head(rows: list[dict]) -> dict[str, dict]:
    """The run with the best held-out accuracy for each head (the tuned learning rate)."""
    best = {}
    for row in rows:
        if row["head"] not in best or row["val_top1"] > best[row["head"]]["val_top1"]:
            best[row["head"]] = row
    return best


def report(rows: list[dict], out: str) -> None:
    order = list(HEADS)
    rows = sorted(rows, key=lambda r: (order.index(r["head"]) if r["head"] in order else len(order), r["lr"]))
    columns = [("head", "head"), ("lr", "lr"), ("params", "params"), ("steps", "steps"),
               ("val_top1", "held-out top-1 %"), ("top1", "test top-1 %"), ("wall_seconds", "wall s")]
    best = best_per_head(rows)
    chosen = [f"{h}: lr {r['lr']:g}, held-out {100 * r['val_top1']:.2f}%, test {100 * r['top1']:.2f}%"
              for h, r in best.items()]
    notes = ["Tuned on the held-out split: " + "; ".join(chosen) + "."]
    if len(best) == 2:
        a, b = best["class token"], best["GAP"]
        notes.append(f"Test difference at the tuned rates (GAP - class token): {100 * (b['top1'] - a['top1']):+.2f} "
                     "points.")
    notes.append(f"Total wall time: {sum(r['wall_seconds'] for r in rows) / 60:.1f} min.")
    write_report(out, "Class token vs global average pooling, each at its tuned learning rate",
                 markdown_table(rows, columns), notes)
    series = {h: [(r["lr"], 100 * r["val_top1"]) for r in rows if r["head"] == h] for h in HEADS}
    line_plot(out, "pooling.png", series, xlabel="peak learning rate", ylabel="held-out top-1 (%)",
              title="Class token vs GAP across learning rates")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (with the shared ones of :func:`~vitlab.experiments.common.add_common_arguments`)."""
    add_common_arguments(parser, steps=200, out="results/pooling")
    parser.add_argument("--model", default="vit_fmnist", help="a registered ViT (default vit_fmnist, width 64)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
                        help="learning rates (default 5e-4 to 1.6e-2 in factors of 2)")
    parser.add_argument("--holdout", type=int, default=5000, help="held-out training images for tuning")


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
