"""Does the main job wait for data? Time the training loader alone against whole training steps.

    PYTHONPATH=. nice -n 10 python benchmarks/data_vs_step.py [--recipe fashion-mnist] [--steps 30]

Builds the recipe's run exactly as ``vitlab train`` does (``vitlab.train.run.build_run``: data set, loader, model), then
times (1) fetching ``--steps`` batches from the loader with nothing else running (data time) and (2) the same number
of training steps (forward, backward, AdamW) on batches already fetched (step time without data). Data time should
be a small fraction of step time; the loader feeds the loop in the same thread, so the two add up.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from vitlab.train import distributed as D
from vitlab.train.recipes import get_recipe
from vitlab.train.run import build_run
from vitlab.train.runlog import RunLog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = get_recipe(args.recipe).config(out_dir=out, run_name="bench")
        run = build_run(config, D.setup(config.device), None, RunLog(None, enabled=False))
        batches = []
        start = time.perf_counter()
        for batch in run.loader.epoch(0, 0):
            batches.append(batch)
            if len(batches) == args.steps:
                break
        data_s = (time.perf_counter() - start) / len(batches)
        model = run.model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for batch in batches:
            x, y = batch.images, batch.labels
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
    share = 100 * data_s / (data_s + step_s)
    print(f"recipe {args.recipe}: batch {len(batches[0].images)}, data {1e3 * data_s:.2f} ms per batch, "
          f"training step {1e3 * step_s:.1f} ms (median of {len(times)}): data is {share:.1f}% of the time")


if __name__ == "__main__":
    main()
