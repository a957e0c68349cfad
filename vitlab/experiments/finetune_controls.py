"""Fine-tuning controls compared: linear probe, full fine-tuning, layer-wise learning-rate decay, frozen blocks and
LoRA.

BEiT and MAE fine-tune self-supervised ViTs with layer-wise learning-rate decay and report linear probes next to
full fine-tuning; LoRA (Hu et al. 2021) trains low-rank adapters on a frozen model. In small: the experiments' ViT
(width 64, depth 6) pre-trained by masked patch prediction on all Fashion-MNIST training images (labels unused; the
same pre-training run as the ``mpp`` experiment), then trained on 1,000 labelled images for the same number of steps
with the experiments' recipe in each way (``vitlab finetune``'s ``--linear-probe``, ``--layer-decay``,
``--freeze-blocks``, ``--lora-rank`` with the new head trained too), against the same ViT trained from scratch.

    python -m vitlab.experiments.finetune_controls --out results/finetune_controls
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
    top1_bars,
    write_report,
)
from .mpp import PRETRAIN, pretrain_then_finetune

# label -> (TrainConfig changes, learning-rate multiplier)
METHODS = {
    "scratch": ({}, 1.0),
    "full fine-tune": ({}, 1.0),
    "full fine-tune, lr x2": ({}, 2.0),
    "layer decay 0.75": ({"layer_decay": 0.75}, 1.0),
    "layer decay 0.75, lr x2": ({"layer_decay": 0.75}, 2.0),
    "layer decay 0.5": ({"layer_decay": 0.5}, 1.0),
    "first 3 blocks frozen": ({"freeze_blocks": 3}, 1.0),
    "linear probe": ({"linear_probe": True}, 1.0),
    "linear probe, lr x5": ({"linear_probe": True}, 5.0),
    "LoRA r4": ({"lora_rank": 4}, 1.0),
    "LoRA r16": ({"lora_rank": 16}, 1.0),
    "LoRA r16, lr x5": ({"lora_rank": 16}, 5.0),
}


def finetune_runs(args: argparse.Namespace, checkpoint: str) -> list[Run]:
    runs = []
    model_args = SMALL_VIT if args.model == "vit_fmnist" else {}
    for label, (changes, lr_factor) in METHODS.items():
        start = {} if label == "scratch" else {"init_from": checkpoint}
        trainable = "all" if not changes else next(f"{k}={v}" for k, v in changes.items())
        slug = label.replace(" ", "-").replace(",", "").replace(".", "")
        config = base_config(args, model=args.model, model_args=model_args, train_subset=args.labels,
                             lr=args.lr * lr_factor, run_name=f"ftc-{slug}", **start, **changes)
        runs.append(Run(label, config, {"method": label, "setting": trainable, "lr": config.lr,
                                        "labels": args.labels}))
    return runs


def report(rows: list[dict], out: str) -> None:
    order = list(METHODS)
    tuned = sorted((r for r in rows if r["label"] != PRETRAIN),
                   key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    columns = [("method", "method"), ("setting", "setting"), ("lr", "peak lr"), ("trainable", "trainable params"),
               ("steps", "steps"), ("top1", "test top-1 %"), ("wall_seconds", "wall s")]
    by = {r["method"]: r for r in tuned}
    notes = []
    if "full fine-tune" in by:
        full = by["full fine-tune"]["top1"]
        for r in tuned:
            if r["method"] != "full fine-tune":
                notes.append(f"{r['method']}: {100 * r['top1']:.2f}% ({100 * (r['top1'] - full):+.2f} points against "
                             "full fine-tuning).")
    notes.append(f"Total wall time: {sum(r['wall_seconds'] for r in rows) / 60:.1f} min (pre-training included).")
    write_report(out, "Fine-tuning controls: linear probe, full fine-tuning, layer decay, frozen blocks, LoRA",
                 markdown_table(tuned, columns), notes)
    fig, ax = new_figure(7, 4.4)
    top1_bars(ax, tuned)
    save_figure(fig, out, "finetune_controls.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (with the shared ones of :func:`~vitlab.experiments.common.add_common_arguments`)."""
    add_common_arguments(parser, steps=300, out="results/finetune_controls")
    parser.add_argument("--model", default="vit_fmnist", help="a registered ViT (default vit_fmnist, width 64)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="masked patch prediction steps")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--labels", type=int, default=1000, help="labelled training images for the fine-tuning runs")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the fine-tuning runs")


def train_runs(args: argparse.Namespace) -> None:
    """Train the runs of this experiment not yet in ``args.out/results.json``."""
    pretrain_then_finetune(args, finetune_runs)


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
