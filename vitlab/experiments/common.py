"""What every experiment shares: a base training config, running a series of training runs with the normal loop,
and writing the results table (JSON, Markdown) and a plot.

An experiment is a list of :class:`Run` (a label, a :class:`~vitlab.train.TrainConfig` and the columns that
describe the run). :func:`run_series` trains them one after another with :func:`vitlab.train.train`, appending one
row per run to ``results.json`` as soon as it finishes, and skips labels already there, so an interrupted
experiment continues where it stopped. Rows hold the test accuracy, the model size, the images seen, the training
compute (6 x forward MACs x images, paper section 4.4) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import check_folder, make_folder, write_atomic, write_text_atomic
from ..errors import VitlabError
from ..train import TrainConfig, evaluate, train

# Fashion-MNIST recipe of the training package, for the ViT of the experiments below
BASE = dict(data="fashion-mnist", augment="flip", flip=True, optimizer="adamw", lr=2e-3, weight_decay=0.05,
            schedule="cosine", warmup_steps=50, batch_size=128, grad_clip=1.0, label_smoothing=0.1,
            eval_every_epochs=0, eval_batch_size=128, precision="fp32", progress=False, save_every_steps=0)
# The experiments' ViT: vit_fmnist's 4x4 patches of 28x28 grey images with the paper's class token and learned 1D
# position embedding, width 64, depth 6, 2 heads, MLP 128 (the hybrid runs put it on r_vit_fmnist's ResNet stem)
SMALL_VIT = {"embed_dim": 64, "depth": 6, "num_heads": 2, "mlp_dim": 128, "pool": "token", "class_token": True,
             "pos_embed": "learned"}
# The paper's three kinds of model (Figure 5: ViT, BiT ResNet, hybrid) as the experiments label them, and the label of
# each vitlab model family
MODEL_KINDS = ("ViT", "BiT ResNet", "Hybrid")
MODEL_KIND_OF_FAMILY = {"vit": "ViT", "resnetv2": "BiT ResNet", "hybrid": "Hybrid"}


@dataclass
class Run:
    """One training run of an experiment: ``label`` names its row, ``columns`` describe it in the table,
    ``objective`` (optional) is passed to :func:`vitlab.train.train`."""

    label: str
    config: object  # vitlab.train.TrainConfig
    columns: dict = field(default_factory=dict)
    objective: object = None  # another training objective (masked patch prediction), or None: classification


def base_config(args: argparse.Namespace, **changes):
    """The experiments' training config: the Fashion-MNIST recipe's optimiser (AdamW lr 2e-3, wd 0.05, cosine,
    label smoothing 0.1, flips, batch 128) for a fixed number of steps, with the command line's data, threads and
    seed, and ``changes`` on top."""
    values = dict(BASE, data=args.data, steps=args.steps, epochs=None, threads=args.threads, seed=args.seed,
                  out_dir=str(Path(args.out) / "runs"))
    values.update(changes)
    return TrainConfig.from_dict(values)


def add_common_arguments(parser: argparse.ArgumentParser, steps: int, out: str) -> None:
    """--out, --steps, --data, --threads, --seed and --plot-only, shared by every experiment script. ``steps`` is
    the default that keeps the experiment's CPU time bounded (docs/experiments.md lists the times measured)."""
    parser.add_argument("--out", default=out, help=f"results folder (default {out})")
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"optimiser steps of batch 128 per training run (default {steps})")
    parser.add_argument("--data", default="fashion-mnist", help="named data set, image folder or shards")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", action="store_true", help="redraw table and plot from results.json")


def execute(experiment, args: argparse.Namespace) -> list[dict]:
    """Run one experiment with parsed options: train the runs not yet in ``args.out/results.json`` (none with
    ``--plot-only``), then write ``results.md`` and the plot from every row. Returns the rows.

    ``experiment`` is an experiment module: ``build_runs(args)`` lists its runs (or ``train_runs(args)`` trains
    them, for experiments whose later runs depend on earlier ones, or ``measure(args)`` writes rows without training),
    ``report(rows, out)`` writes.
    """
    if getattr(args, "steps", 1) < 1:  # experiments that train nothing (families) have no --steps
        raise VitlabError(f"--steps must be at least 1, got {args.steps}")
    if not args.plot_only:
        check_folder(args.out)  # a file in the way: one line now, not a traceback after the first run
        if hasattr(experiment, "measure"):  # measures given checkpoints instead of training runs
            experiment.measure(args)
        elif hasattr(experiment, "train_runs"):
            experiment.train_runs(args)
        else:
            run_series(experiment.build_runs(args), args.out)
    rows = load_rows(args.out)
    if not rows:
        raise VitlabError(f"{Path(args.out) / 'results.json'}: no results yet (run without --plot-only first)")
    experiment.report(rows, str(args.out))
    return rows


def script_main(experiment, argv: list[str] | None = None) -> int:
    """``python -m vitlab.experiments.<name>``: parse, :func:`execute`, print ``results.md``. Exit status 0 when
    every run has a finite test accuracy, 1 when one has not, 2 (one line on stderr) on bad options or files."""
    spec = getattr(experiment, "__spec__", None)  # run as a script the module is __main__; its spec keeps the name
    name = (spec.name if spec is not None else experiment.__name__).rsplit(".", 1)[-1]
    parser = argparse.ArgumentParser(prog=f"python -m vitlab.experiments.{name}", description=experiment.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        rows = execute(experiment, args)
    except VitlabError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0 if rows_ok(experiment, rows) else 1


def rows_ok(experiment, rows: Sequence[dict]) -> bool:
    """The exit-status check of an experiment's rows: its own ``rows_ok`` when it has one, else
    :func:`all_finite`."""
    return experiment.rows_ok(rows) if hasattr(experiment, "rows_ok") else all_finite(rows)


def all_finite(rows: Sequence[dict]) -> bool:
    """Whether every row has a finite test accuracy (a diverged run has NaN)."""
    return all(isinstance(r.get("top1"), float) and math.isfinite(r["top1"]) for r in rows)


def load_rows(out: str | Path) -> list[dict]:
    """The rows an experiment has written so far (none if it has not started)."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["rows"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise VitlabError(f"{path}: not an experiment results file ({exc})") from None


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def _say(message: str) -> None:
    print(message, flush=True)


def run_series(runs: Sequence[Run], out: str | Path, log: Callable[[str], None] = _say) -> list[dict]:
    """Train every run not yet in ``out/results.json`` with the normal training loop and return all rows."""
    out = make_folder(out)
    rows = load_rows(out)
    done = {r["label"] for r in rows}
    for i, run in enumerate(runs, start=1):
        if run.label in done:
            log(f"[{i}/{len(runs)}] {run.label}: already in {out / 'results.json'}")
            continue
        log(f"[{i}/{len(runs)}] {run.label}: training ...")
        t0 = time.perf_counter()
        result = train(run.config, objective=run.objective)
        row = {"label": run.label, **run.columns, **result_columns(result)}
        if getattr(run.config, "holdout", 0):  # the run's own metric is on held-out training images
            row["val_top1"] = row.pop("top1")
            row["top1"] = test_accuracy(result.model, run.config)
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        _write_json_atomic(out / "results.json", {"rows": rows})
        score = (f"top-1 {row['top1']:.4f}" if row["top1"] is not None  # a reconstruction objective has none
                 else f"held-out loss {result.metrics.get('loss', float('nan')):.4f}")
        log(f"[{i}/{len(runs)}] {run.label}: {score} in {row['wall_seconds']:.0f} s")
    return rows


def test_accuracy(model, config) -> float:
    """Top-1 of a trained model on the test split of the run's data (for runs evaluated on a holdout)."""
    return evaluate(model, config.data, "test", data_dir=config.data_dir, batch_size=config.eval_batch_size,
                    device=config.device, precision=config.precision)["top1"]


def result_columns(result) -> dict:
    """The table columns of a :class:`~vitlab.train.TrainResult`."""
    model = result.model
    return {
        "top1": result.metrics.get("top1"),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": result.steps,
        "epochs": round(result.epochs, 3),
        "train_tflops": round(result.train_flops / 1e12, 3),
        "train_seconds": round(result.train_seconds, 1),
        "run_dir": str(result.run_dir),
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` = [(key, heading)]; floats in [0, 1] as percentages for keys
    named ``top1``/``*_top1``."""
    def cell(key, value):
        if value is None:
            return "-"
        if key.endswith("top1") and isinstance(value, float):
            return f"{100 * value:.2f}"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: str | Path, title: str, table: str, notes: Sequence[str] = ()) -> Path:
    """``out/results.md``: the title, the table and notes (measured facts, settings)."""
    path = Path(out) / "results.md"
    text = f"# {title}\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes)
    write_text_atomic(path, text)
    return path


def new_figure(width: float = 6.0, height: float = 4.0, ncols: int = 1, nrows: int = 1):
    """A matplotlib figure and its axes (one, or a grid of ``nrows`` x ``ncols``) on the non-interactive Agg
    backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=nrows == 1)


def line_plot(out: str | Path, name: str, series: dict[str, list[tuple]], *, xlabel: str, ylabel: str, title: str,
              log_x: bool = True) -> Path:
    """Write ``out/name``: one line with markers per entry of ``series`` ({legend label: [(x, y) or (x, y, point
    label), ...]}), sorted by x; points with a third element are annotated with it."""
    fig, ax = new_figure()
    for (label, points), marker in zip(series.items(), "osD^v<>"):
        points = sorted(points, key=lambda p: p[0])
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        for p in points:
            if len(p) > 2:
                ax.annotate(p[2], (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, out, name)


def top1_bars(ax, tuned: Sequence[dict]) -> None:
    """On ``ax``: one horizontal bar per trained run (its ``method`` and test ``top1``), titled with the runs' label
    count and steps (the fine-tuning comparisons' panel)."""
    ax.barh(range(len(tuned)), [100 * r["top1"] for r in tuned])
    ax.set_yticks(range(len(tuned)), [r["method"] for r in tuned])
    ax.invert_yaxis()
    ax.set_xlim(max(0, min((100 * r["top1"] for r in tuned), default=0) - 5), 100)
    ax.set_xlabel("test top-1 (%)")
    ax.set_title(f"{tuned[0]['labels']:,} labels, {tuned[0]['steps']} steps each" if tuned else "")
    ax.grid(True, axis="x", alpha=0.3)


def save_figure(fig, out: str | Path, name: str, tight: bool = True) -> Path:
    """Write ``fig`` to ``out/name`` as a PNG (atomically) and close it; ``tight``: lay it out tightly first (not
    for figures with a colour bar placed across axes)."""
    path = Path(out) / name
    if tight:
        fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
