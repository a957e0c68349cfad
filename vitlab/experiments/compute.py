"""Accuracy vs training compute (paper section 4.4, Figure 5): ViTs, BiT ResNets and hybrids of several sizes.

The paper trains every model with the same schedule and plots transfer accuracy against total pre-training compute:
ViTs reach a given accuracy with 2-4x less compute than ResNets; hybrids beat ViTs at small budgets and the gap
closes as models grow. In small: three sizes of ViT, two BiT ResNets and two hybrids, every run the same recipe and
steps on Fashion-MNIST, compute counted as 6 x forward MACs x images seen (section 4.4; MACs from
:func:`vitlab.compute.flops.forward_macs`, every convolution of the CNNs included).

    python -m vitlab.experiments.compute --out results/compute
    python -m vitlab.experiments.compute --data ~/images --models vit_s32 vit_b32 bit_r50x1 r26_vit_s32 --steps 5000
"""

from __future__ import annotations

import argparse
import sys

from ..models import family_of, get_config
from .common import (
    MODEL_KIND_OF_FAMILY,
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

TINY_VIT = dict(SMALL_VIT, embed_dim=32, mlp_dim=64, depth=4)
WIDE_VIT = dict(SMALL_VIT, embed_dim=128, num_heads=4, mlp_dim=256)  # r_vit_fmnist's transformer
# family, label, registered model, overrides (sizes for 28x28 grey images; see vitlab models)
MODELS = [
    ("ViT", "ViT w32 d4", "vit_fmnist", TINY_VIT),
    ("ViT", "ViT w64 d6", "vit_fmnist", SMALL_VIT),
    ("ViT", "ViT w128 d6", "vit_fmnist", WIDE_VIT),
    ("BiT ResNet", "BiT 1-1-1", "bit_fmnist", {"layers": [1, 1, 1]}),
    ("BiT ResNet", "BiT 2-2-2", "bit_fmnist", {}),
    ("Hybrid", "Hybrid w32 d4", "r_vit_fmnist", TINY_VIT),
    ("Hybrid", "Hybrid w64 d6", "r_vit_fmnist", SMALL_VIT),
]


def registered_models(names: list[str]) -> list[tuple[str, str, str, dict]]:
    """``MODELS``-style entries for registered model names (each its own label; the family from its config)."""
    return [(MODEL_KIND_OF_FAMILY[family_of(get_config(name)).name], name, name, {}) for name in names]


def build_runs(args: argparse.Namespace) -> list[Run]:
    runs = []
    for family, label, model, model_args in registered_models(args.models) if args.models else MODELS:
        if args.only and label not in args.only:
            continue
        config = base_config(args, model=model, model_args=model_args, run_name=f"compute-{label.replace(' ', '')}")
        runs.append(Run(label, config, {"family": family, "model": model}))
    return runs


def report(rows: list[dict], out: str) -> None:
    columns = [("label", "model"), ("family", "family"), ("params", "params"), ("steps", "steps"),
               ("train_tflops", "train TFLOPs"), ("top1", "test top-1 %"), ("train_seconds", "train s"),
               ("wall_seconds", "wall s")]
    ordered = sorted(rows, key=lambda r: r["train_tflops"])
    notes = []
    for family in MODEL_KINDS:
        pts = [r for r in ordered if r["family"] == family]
        if pts:
            best = max(pts, key=lambda r: r["top1"])
            notes.append(f"{family}: best {100 * best['top1']:.2f}% ({best['label']}, {best['train_tflops']:.2f} "
                         "TFLOPs)")
    notes = ["; ".join(notes) + ".", f"Total wall time: {sum(r['wall_seconds'] for r in rows) / 60:.1f} min."]
    write_report(out, "Accuracy vs training compute", markdown_table(ordered, columns), notes)
    series = {f: [(r["train_tflops"], 100 * r["top1"], r["label"].split(" ", 1)[-1]) for r in ordered
                  if r["family"] == f] for f in MODEL_KINDS}
    line_plot(out, "compute.png", series, xlabel="training compute (TFLOPs = 6 x forward MACs x images / 1e12)",
              ylabel="test top-1 (%)", title="Accuracy vs training compute (same recipe and steps)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (with the shared ones of :func:`~vitlab.experiments.common.add_common_arguments`)."""
    add_common_arguments(parser, steps=300, out="results/compute")
    parser.add_argument("--only", nargs="+", metavar="LABEL", choices=[m[1] for m in MODELS],
                        help="train only these of the models (default all: " + ", ".join(m[1] for m in MODELS) + ")")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="registered models to compare instead (e.g. vit_s16 vit_b16 bit_r50x1 r26_vit_s32 for "
                             "larger images); the family is read from each model's config")


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
