"""Position-embedding ablation (paper appendix D.4, Table 8): none, learned 1D, learned 2D, fixed 2D sin-cos.

The paper (ViT-B/16, ImageNet 5-shot linear) finds that having any position embedding matters (none: 61.4%,
1-D: 64.2%) and that how it is encoded hardly does (2-D 64.0%, relative 64.0%). In small: the same ViT on
Fashion-MNIST with each kind, same recipe and steps, evaluated by test accuracy.

    python -m vitlab.experiments.posemb --out results/posemb
"""

from __future__ import annotations

import argparse
import sys

from .common import (
    SMALL_VIT,
    Run,
    add_common_arguments,
    base_config,
    markdown_table,
    new_figure,
    save_figure,
    script_main,
    write_report,
)

KINDS = [("none", "none"), ("learned", "1D learned"), ("learned_2d", "2D learned"), ("sincos", "2D sin-cos")]


def build_runs(args: argparse.Namespace) -> list[Run]:
    runs = []
    for kind, title in KINDS:
        model_args = dict(SMALL_VIT if args.model == "vit_fmnist" else {}, pos_embed=kind)
        config = base_config(args, model=args.model, model_args=model_args, run_name=f"posemb-{kind}")
        runs.append(Run(title, config, {"pos_embed": kind, "model": args.model}))
    return runs


def report(rows: list[dict], out: str) -> None:
    columns = [("label", "position embedding"), ("model", "model"), ("params", "params"), ("steps", "steps"),
               ("top1", "test top-1 %"), ("wall_seconds", "wall s")]
    base = next((r["top1"] for r in rows if r["pos_embed"] == "none"), None)
    notes = []
    if base is not None:
        gains = [f"{r['label']} {100 * (r['top1'] - base):+.2f}" for r in rows if r["pos_embed"] != "none"]
        notes.append("Points over no position embedding: " + ", ".join(gains) + ".")
    notes.append(f"Total wall time: {sum(r['wall_seconds'] for r in rows) / 60:.1f} min.")
    write_report(out, "Position-embedding ablation", markdown_table(rows, columns), notes)
    fig, ax = new_figure(5.5, 3.5)
    ax.bar([r["label"] for r in rows], [100 * r["top1"] for r in rows], color="tab:blue")
    low = min(100 * r["top1"] for r in rows)
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(100 * r["top1"] for r in rows) + 2))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Position embeddings")
    save_figure(fig, out, "posemb.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (with the shared ones of :func:`~vitlab.experiments.common.add_common_arguments`)."""
    add_common_arguments(parser, steps=300, out="results/posemb")
    parser.add_argument("--model", default="vit_fmnist", help="a registered ViT (default vit_fmnist, width 64)")


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
