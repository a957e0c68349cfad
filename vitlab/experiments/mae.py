"""Masked autoencoder pre-training, then fine-tuning and a linear probe, vs training from scratch (He et al. 2022).

MAE pre-trains a ViT by reconstructing the pixels of 75% of the patches, dropped, from the other 25%, and reports
strong fine-tuning accuracy with weak linear probes. In small, as the ``mpp`` experiment: the experiments' ViT
pre-trained as a masked autoencoder on all Fashion-MNIST training images (labels unused), then trained on a labelled
subset with the common recipe (full fine-tuning, and a linear probe at 5x the rate), against the same ViT trained
from scratch with the same recipe and the same number of steps.

    python -m vitlab.experiments.mae --out results/mae
"""

from __future__ import annotations

import argparse
import sys

from ..selfsup.pretrain import MaskedAutoencoderObjective
from ..train.runfolder import RunFolder
from ..train.runlog import read_metrics
from .common import (
    SMALL_VIT,
    Run,
    add_common_arguments,
    base_config,
    markdown_table,
    new_figure,
    run_series,
    save_figure,
    script_main,
    top1_bars,
    write_report,
)

PRETRAIN = "MAE pre-training"
# label -> (start from the MAE encoder, TrainConfig changes, learning-rate multiplier)
METHODS = {
    "scratch": (False, {}, 1.0),
    "MAE, full fine-tune": (True, {}, 1.0),
    "MAE, linear probe, lr x5": (True, {"linear_probe": True}, 5.0),
}


def pretrain_run(args: argparse.Namespace) -> Run:
    """The paper's optimiser (AdamW betas 0.9 / 0.95, wd 0.05, cosine), no label smoothing (no labels); flips."""
    model_args = SMALL_VIT if args.model == "vit_fmnist" else {}
    config = base_config(args, model=args.model, model_args=model_args, steps=args.pretrain_steps,
                         lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.05, label_smoothing=0.0,
                         log_every_steps=10, run_name="mae-pretrain")
    objective = MaskedAutoencoderObjective(args.mask_ratio, args.decoder_width, args.decoder_depth)
    return Run(PRETRAIN, config, {"method": "-", "labels": 0, "stage": "pre-training"}, objective)


def finetune_runs(args: argparse.Namespace, checkpoint: str) -> list[Run]:
    runs = []
    model_args = SMALL_VIT if args.model == "vit_fmnist" else {}
    for label, (pretrained, changes, lr_factor) in METHODS.items():
        start = {"init_from": checkpoint} if pretrained else {}
        slug = label.lower().replace(",", "").replace(" ", "-")
        config = base_config(args, model=args.model, model_args=model_args, train_subset=args.labels,
                             lr=args.lr * lr_factor, run_name=f"mae-{slug}", **start, **changes)
        runs.append(Run(label, config, {"method": label, "lr": config.lr, "labels": args.labels,
                                        "stage": "fine-tuning"}))
    return runs


def _logged(run_dir: str, kind: str) -> list[dict]:
    return [row for row in read_metrics(RunFolder(run_dir).metrics) if row.get("kind") == kind]


def report(rows: list[dict], out: str) -> None:
    pre = next((r for r in rows if r["label"] == PRETRAIN), None)
    tuned = [r for r in rows if r["label"] != PRETRAIN]
    columns = [("method", "method"), ("labels", "labelled images"), ("lr", "peak lr"),
               ("trainable", "trainable params"), ("steps", "steps"), ("top1", "test top-1 %"),
               ("wall_seconds", "wall s")]
    notes = []
    curve = []
    if pre is not None:
        curve = [(row["step"], row["loss"]) for row in _logged(pre["run_dir"], "step")]
        evals = _logged(pre["run_dir"], "eval")
        first = f"{curve[0][1]:.3f} at step {curve[0][0]}" if curve else "-"
        last = f"{curve[-1][1]:.3f} at step {curve[-1][0]}" if curve else "-"
        held_out = f"{evals[-1]['loss']:.4f}" if evals else "-"
        notes.append(f"Pre-training ({pre['steps']} steps, {pre['wall_seconds']:.0f} s): training loss {first} -> "
                     f"{last} (mean squared error per masked patch on per-patch normalised pixels; predicting "
                     f"every patch's own mean, zero after the normalisation, scores at most 15/16, 0 on a flat "
                     f"patch); held-out loss {held_out} on a fixed masking of the test images.")
    by = {r["method"]: r for r in tuned}
    if "scratch" in by:
        for r in tuned:
            if r["method"] != "scratch":
                notes.append(f"{r['method']}: {100 * r['top1']:.2f}% ({100 * (r['top1'] - by['scratch']['top1']):+.2f}"
                             " points against scratch).")
    notes.append(f"Total wall time: {sum(r['wall_seconds'] for r in rows) / 60:.1f} min (pre-training included).")
    write_report(out, "Masked autoencoder: fine-tuning and linear probe vs training from scratch",
                 markdown_table(tuned, columns), notes)
    fig, (left, right) = new_figure(10, 3.8, ncols=2)
    left.plot([c[0] for c in curve], [c[1] for c in curve])
    left.set_xlabel("pre-training step")
    left.set_ylabel("masked-patch MSE (normalised pixels)")
    left.set_title("MAE pre-training loss")
    left.grid(True, alpha=0.3)
    top1_bars(right, tuned)
    save_figure(fig, out, "mae.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (with the shared ones of :func:`~vitlab.experiments.common.add_common_arguments`)."""
    add_common_arguments(parser, steps=300, out="results/mae")
    parser.add_argument("--model", default="vit_fmnist", help="a registered ViT (default vit_fmnist, width 64)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="masked autoencoder steps")
    parser.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--decoder-width", type=int, default=None, help="default: the encoder's width")
    parser.add_argument("--decoder-depth", type=int, default=None, help="default: 2 blocks")
    parser.add_argument("--labels", type=int, default=1000, help="labelled training images for the trained runs")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the trained runs")


def train_runs(args: argparse.Namespace) -> None:
    """Train the runs of this experiment not yet in ``args.out/results.json``: pre-training first."""
    rows = run_series([pretrain_run(args)], args.out)
    pre = next(r for r in rows if r["label"] == PRETRAIN)
    run_series(finetune_runs(args, str(RunFolder(pre["run_dir"]).model)), args.out)


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
