"""Data requirements (paper section 4.3, Figures 3 and 4): ViT, BiT ResNet and hybrid trained on growing subsets.

The paper pre-trains on ImageNet, ImageNet-21k and JFT-300M (and random 9M / 30M / 90M subsets of JFT) and finds
that ResNets win on the smaller sets, where their convolutional inductive bias helps, and ViTs overtake them on the
larger ones. In small: the same three families, sized alike (about 0.2 M parameters), on class-balanced random
subsets of Fashion-MNIST (1k, 6k, 60k images; each smaller subset is part of the larger ones), every run with the
same optimiser and the same number of steps (so the same compute per model), evaluated on the full test set.

    python -m vitlab.experiments.data_requirements --out results/data_requirements
    python -m vitlab.experiments.data_requirements --sizes 5000 50000 --data cifar10 \\
        --vit vit_cifar --bit bit_r50x1 --hybrid r26_vit_s32 --steps 5000     # scaled up
"""

from __future__ import annotations

import argparse
import sys

from .common import (
    MODEL_KINDS,
    SMALL_VIT,
    Run,
    add_common_arguments,
    base_config,
    line_plot,
    markdown_table,
    script_main,
    write_report,
)


def build_runs(args: argparse.Namespace) -> list[Run]:
    models = {"ViT": (args.vit, SMALL_VIT if args.vit == "vit_fmnist" else {}),
              "BiT ResNet": (args.bit, {}),
              "Hybrid": (args.hybrid, SMALL_VIT if args.hybrid == "r_vit_fmnist" else {})}
    runs = []
    for size in args.sizes:
        for family in MODEL_KINDS:
            model, model_args = models[family]
            config = base_config(args, model=model, model_args=model_args, train_subset=size,
                                 run_name=f"data-{size}-{model}")
            runs.append(Run(f"{family} / {size}", config, {"family": family, "model": model, "train_images": size}))
    return runs


def report(rows: list[dict], out: str) -> None:
    columns = [("family", "family"), ("model", "model"), ("train_images", "train images"), ("params", "params"),
               ("epochs", "epochs"), ("train_tflops", "train TFLOPs"), ("top1", "test top-1 %"),
               ("wall_seconds", "wall s")]
    winners = []
    for size in sorted({r["train_images"] for r in rows}):
        at = [r for r in rows if r["train_images"] == size and r.get("top1") is not None]
        if at:
            best = max(at, key=lambda r: r["top1"])
            winners.append(f"{size:,} images: best {best['family']} ({100 * best['top1']:.2f}%)")
    total = sum(r["wall_seconds"] for r in rows)
    write_report(out, "Data requirements: ViT vs BiT ResNet vs hybrid on growing subsets",
                 markdown_table(rows, columns),
                 ["Best per size: " + "; ".join(winners) + ".", f"Total wall time: {total / 60:.1f} min."])
    series = {f: [(r["train_images"], 100 * r["top1"]) for r in rows if r["family"] == f and r["top1"] is not None]
              for f in MODEL_KINDS}
    line_plot(out, "data_requirements.png", series, xlabel="training images", ylabel="test top-1 (%)",
              title="Accuracy vs training-set size (equal steps per run)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (with the shared ones of :func:`~vitlab.experiments.common.add_common_arguments`)."""
    add_common_arguments(parser, steps=300, out="results/data_requirements")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 6000, 60000], help="training-set sizes")
    parser.add_argument("--vit", default="vit_fmnist", help="the ViT (default vit_fmnist, width 64)")
    parser.add_argument("--bit", default="bit_fmnist", help="the BiT ResNet (default bit_fmnist)")
    parser.add_argument("--hybrid", default="r_vit_fmnist", help="the hybrid (default r_vit_fmnist)")


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
