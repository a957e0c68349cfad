"""Experiments of the paper in small, runnable on a CPU (see docs/experiments.md).

Each experiment is a module here (``data_requirements``, ``posemb``, ``pooling``, ``compute``, ``mpp``,
``finetune_controls``, ``mae``) that trains a series of runs with the normal training loop and writes ``results.json``,
``results.md`` and a PNG plot to its output folder; ``families`` trains nothing: it measures the paper's Fig. 7
panels on given checkpoints side by side. Three ways to run one, all the same code:

    vitlab experiment posemb --out results/posemb --steps 300
    python -m vitlab.experiments.posemb --out results/posemb --steps 300
    vitlab.experiments.run("posemb", out="results/posemb", steps=300)   # returns the result rows
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from ..errors import VitlabError
from .common import execute

NAMES = ("data_requirements", "posemb", "pooling", "compute", "mpp", "finetune_controls", "mae", "families")
# the experiments that train runs (families measures given checkpoints: no --steps, --data)
TRAINING = NAMES[:-1]


def load(name: str) -> ModuleType:
    """The module of the experiment ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise VitlabError(f"unknown experiment {name!r}; choose from {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def options(name: str) -> argparse.Namespace:
    """The default options of experiment ``name`` (what its command line gives with no arguments)."""
    parser = argparse.ArgumentParser()
    load(name).add_arguments(parser)
    return parser.parse_args([])


def run(name: str, **changes) -> list[dict]:
    """Run experiment ``name`` with its default options changed by ``changes`` (the command line's option names
    with underscores: ``out``, ``steps``, ``data``, ``threads``, ``seed``, ``plot_only`` and the experiment's own,
    e.g. ``sizes=[1000, 6000]``). Trains what ``out/results.json`` lacks, writes the table and plot, and returns
    every row (one per training run, with ``top1`` the test accuracy in [0, 1])."""
    args = options(name)
    unknown = sorted(set(changes) - set(vars(args)))
    if unknown:
        raise VitlabError(f"experiment {name}: unknown option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(vars(args)))}")
    vars(args).update(changes)
    return execute(load(name), args)
