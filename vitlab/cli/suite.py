"""``vitlab suite``: a VTAB-1k-style protocol over a list of tasks (few-shot or fine-tuning), resumable, with
per-task, group and mean scores in a JSON / Markdown / PNG report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "suite", help="VTAB-1k-style evaluation over a list of tasks (few-shot or fine-tuning), resumable",
        description="Run the tasks of a suite config (TOML or JSON; see docs/evaluation.md): per task 1000 "
                    "training images (800 / 200 to pick the hyper-parameter, then all 1000), few-shot probes or "
                    "fine-tuning with the VTAB recipe (2,500 steps, lr 0.01), scored on the test split. Tasks "
                    "finished in an earlier run into the same --out folder are not run again.")
    p.add_argument("config", metavar="CONFIG", type=Path, help="suite config (.toml or .json)")
    p.add_argument("--checkpoint", help="checkpoint to evaluate (default: the config's 'checkpoint')")
    p.add_argument("--out", type=Path, required=True, help="report folder; rerun with the same folder to resume")
    p.add_argument("--model", help="registered model name, for checkpoint layouts that do not store the architecture")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.report import suite_summary
    from ..tasks.runs import suite_checkpoint

    results = suite_checkpoint(args.config, args.out, checkpoint=args.checkpoint, model_name=args.model,
                               device=args.device, progress=True)
    print(suite_summary(results))
    print(f"wrote results.json, report.md, suite.png to {args.out}")
    return 0
