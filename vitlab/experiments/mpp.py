"""Masked patch prediction pre-training, then fine-tuning, vs training from scratch (paper section 4.6).

The paper pre-trains ViT-B/16 on JFT by masked patch prediction and fine-tunes on ImageNet: 79.9%, 2 points over
training from scratch (and 4 below supervised pre-training). In small: the experiments' ViT pre-trained by masked
patch prediction on all Fashion-MNIST training images (labels unused), then fine-tuned on labelled subsets with the
normal recipe; the same model trained from scratch with the same recipe and the same number of steps is the
baseline (equal fine-tuning budget). The pre-training loss curve is plotted from the run's metrics.

    python -m vitlab.experiments.mpp --out results/mpp
"""

from __future__ import annotations

import argparse
import math
import sys

from ..models import get_config
from ..selfsup.pretrain import MaskedPatchObjective
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
    write_report,
)

PRETRAIN = "MPP pre-training"


def pretrain_run(args: argparse.Namespace) -> Run:
    model_args = SMALL_VIT if args.model == "vit_fmnist" else {}
    config = base_config(args, model=args.model, model_args=model_args, steps=args.pretrain_steps,
                         lr=args.pretrain_lr, label_smoothing=0.0, log_every_steps=10, run_name="mpp-pretrain")
    colours = 8 ** get_config(args.model, **model_args).in_chans
    return Run(PRETRAIN, config, {"start": "-", "labels": 0, "stage": "pre-training", "colours": colours},
               MaskedPatchObjective())


def finetune_runs(args: argparse.Namespace, checkpoint: str) -> list[Run]:
    runs = []
    model_args = SMALL_VIT if args.model == "vit_fmnist" else {}
    for size in args.labels:
        for start in ("scratch", "MPP"):
            subset = None if size >= 60000 else size
            extra = {"init_from": checkpoint} if start == "MPP" else {}
            config = base_config(args, model=args.model, model_args=model_args, train_subset=subset,
                                 run_name=f"mpp-{start.lower()}-{size}", **extra)
            runs.append(Run(f"{start} / {size}", config, {"start": start, "labels": size, "stage": "fine-tuning"}))
    return runs


def pretrain_curve(run_dir: str) -> list[tuple[int, float]]:
    """(step, training loss) of a run's logged steps."""
    return [(row["step"], row["loss"]) for row in read_metrics(RunFolder(run_dir).metrics)
            if row.get("kind") == "step"]


def report(rows: list[dict], out: str) -> None:
    pre = next((r for r in rows if r["label"] == PRETRAIN), None)
    tuned = [r for r in rows if r["label"] != PRETRAIN]
    columns = [("start", "start"), ("labels", "labelled images"), ("steps", "steps"), ("params", "params"),
               ("top1", "test top-1 %"), ("wall_seconds", "wall s")]
    notes = []
    if pre is not None:
        curve = pretrain_curve(pre["run_dir"])
        first = f"{curve[0][1]:.3f} at step {curve[0][0]}" if curve else "-"
        last = f"{curve[-1][1]:.3f} at step {curve[-1][0]}" if curve else "-"
        k = pre.get("colours", 512)
        notes.append(f"Pre-training ({pre['steps']} steps, {pre['wall_seconds']:.0f} s): training loss {first} -> "
                     f"{last} (a uniform guess over the {k} colour classes: ln {k} = {math.log(k):.3f}); held-out "
                     f"colour accuracy on corrupted patches {100 * pre['top1']:.2f}%.")
    for size in sorted({r["labels"] for r in tuned}):
        pair = {r["start"]: r["top1"] for r in tuned if r["labels"] == size}
        if len(pair) == 2:
            notes.append(f"{size:,} labels: MPP fine-tuned {100 * pair['MPP']:.2f}% vs scratch "
                         f"{100 * pair['scratch']:.2f}% ({100 * (pair['MPP'] - pair['scratch']):+.2f} points).")
    notes.append(f"Total wall time: {sum(r['wall_seconds'] for r in rows) / 60:.1f} min.")
    write_report(out, "Masked patch prediction: fine-tuning vs training from scratch", markdown_table(tuned, columns),
                 notes)
    fig, (left, right) = new_figure(10, 3.8, ncols=2)
    if pre is not None:
        curve = pretrain_curve(pre["run_dir"])
        left.plot([c[0] for c in curve], [c[1] for c in curve])
    left.set_xlabel("pre-training step")
    left.set_ylabel("masked patch loss")
    left.set_title("MPP pre-training loss")
    left.grid(True, alpha=0.3)
    sizes = sorted({r["labels"] for r in tuned})
    for offset, start in ((-0.2, "scratch"), (0.2, "MPP")):
        vals = [next((100 * r["top1"] for r in tuned if r["labels"] == s and r["start"] == start), 0) for s in sizes]
        right.bar([i + offset for i in range(len(sizes))], vals, width=0.4, label=start)
    right.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
    right.set_xlabel("labelled training images")
    right.set_ylabel("test top-1 (%)")
    right.set_title("Fine-tuning vs scratch (equal steps)")
    low = min((100 * r["top1"] for r in tuned), default=0)
    right.set_ylim(max(0, low - 5), 100)
    right.legend()
    save_figure(fig, out, "mpp.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (with the shared ones of :func:`~vitlab.experiments.common.add_common_arguments`)."""
    add_common_arguments(parser, steps=300, out="results/mpp")
    parser.add_argument("--model", default="vit_fmnist", help="a registered ViT (default vit_fmnist, width 64)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="masked patch prediction steps")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--labels", type=int, nargs="+", default=[1000, 60000],
                        help="labelled training images for fine-tuning (60000 = all)")


def pretrain_then_finetune(args: argparse.Namespace, finetune_runs) -> None:
    """Train the MPP pre-training, then ``finetune_runs(args, pretrained_model_path)``, skipping runs already in
    ``args.out/results.json`` (shared by the experiments that fine-tune from this pre-training)."""
    rows = run_series([pretrain_run(args)], args.out)
    pre = next(r for r in rows if r["label"] == PRETRAIN)
    run_series(finetune_runs(args, str(RunFolder(pre["run_dir"]).model)), args.out)


def train_runs(args: argparse.Namespace) -> None:
    """Train the runs of this experiment not yet in ``args.out/results.json``."""
    pretrain_then_finetune(args, finetune_runs)


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
