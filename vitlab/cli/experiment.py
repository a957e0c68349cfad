"""``vitlab experiment NAME``: one of the paper's comparisons in small (see docs/experiments.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..experiments import NAMES, load

    p = subparsers.add_parser(
        "experiment", help="run one of the paper's experiments in small (table + plot)",
        description="Train the runs of one experiment with the normal training loop and write results.json, "
                    "results.md and a PNG plot to --out. An interrupted experiment continues where it stopped. "
                    "Defaults keep each one to minutes on a CPU; scale up with --steps, --data and the model "
                    "options.")
    which = p.add_subparsers(dest="experiment", metavar="NAME", required=True)
    for name in NAMES:
        module = load(name)
        sub = which.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments import load
    from ..experiments.common import execute, rows_ok

    experiment = load(args.experiment)
    rows = execute(experiment, args)
    print((Path(args.out) / "results.md").read_text())
    return 0 if rows_ok(experiment, rows) else 1
