"""What a training step costs per image, for variants of a recipe, measured against each other in one process.

    PYTHONPATH=. python benchmarks/step_cost.py --variant adamw= --variant muon=optimizer=muon \\
        --variant muon-256=optimizer=muon,batch_size=256 [--recipe fashion-mnist] [--processes 2] [--rounds 9]

Each ``--variant NAME=KEY=VALUE,KEY=VALUE`` is the recipe with those ``--set`` changes (none after a bare ``NAME=``),
built as ``vitlab train`` builds it (``vitlab.train.run.build_run``: data, model, patch dropout, optimiser,
schedule) on one thread. ``--processes N`` times the step one of N data-parallel processes takes: a micro-batch of
batch / N images with the whole optimiser step (the all-reduce between processes is not included). The variants
take turns within every round, in reversed order every other round (``vitlab.compute.bench.interleaved_times``), on
batches fetched beforehand; printed: milliseconds a step and the cost per image relative to the first variant
(median over rounds of the per-round ratio), which is what the main job's comparisons count in.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from itertools import cycle

import torch

from vitlab.compute.bench import interleaved_times
from vitlab.train import distributed as D
from vitlab.train.config import apply_overrides
from vitlab.train.recipes import get_recipe
from vitlab.train.run import build_run
from vitlab.train.runlog import RunLog
from vitlab.train.step import train_step


def build_variant(recipe: str, changes: list[str], processes: int, out: str):
    """The run of ``recipe`` with ``changes``, its batch divided by ``processes``, and a step function on
    pre-fetched batches; returns (step function, images a step)."""
    config = apply_overrides(get_recipe(recipe).config(out_dir=out, run_name="bench", threads=1, progress=False),
                             changes)
    config = config.replace(batch_size=config.batch_size // processes)
    run = build_run(config, D.setup("cpu"), None, RunLog(None, enabled=False))
    batches = []
    for batch in run.loader.epoch(0, 0):
        batches.append(batch)
        if len(batches) == 4:
            break
    feed = cycle(batches)
    counter = iter(range(10**9))
    run.trainable.train()
    return (lambda: train_step(run, feed, next(counter))), config.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=CHANGES")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=8, help="steps per variant and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, images = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for spec in args.variant:
            name, _, changes = spec.partition("=")
            steps[name], images[name] = build_variant(args.recipe, [c for c in changes.split(",") if c],
                                                      args.processes, out)
        times = interleaved_times(steps, rounds=args.rounds, iters=args.iters, device=torch.device("cpu"))
    reference = next(iter(steps))
    print(f"recipe {args.recipe}, one of {args.processes} processes, one thread, {args.rounds} rounds of "
          f"{args.iters} steps; torch {torch.__version__}")
    for name in steps:
        per_image = [(t / images[name]) / (r / images[reference]) for t, r in zip(times[name], times[reference])]
        print(f"{name:>16}: {1e3 * statistics.median(times[name]):7.1f} ms a step of {images[name]} images, "
              f"{statistics.median(per_image):.3f} x {reference}'s cost per image "
              f"(rounds {min(per_image):.2f}-{max(per_image):.2f})")


if __name__ == "__main__":
    main()
