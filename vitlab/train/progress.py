"""Step logging and the progress bar, in one place: ``StepLog``.

Losses are summed on the device and read back (one synchronisation) only every ``log_every_steps`` steps, when a
``step`` row goes to ``metrics.jsonl`` and the progress bar's figures are refreshed. A row's ``data_wait`` is the
share of the window's wall time this process spent waiting for its batches (a loader slower than the steps shows
there).
"""

from __future__ import annotations

import sys
import time

import torch

from ..evaluate.distributed import sum_over_processes
from .run import Run
from .step import StepOutput


class StepLog:
    """Collects the steps between two log rows; ``update`` after every step, ``close`` at the end."""

    def __init__(self, run: Run, first_step: int):
        self.run = run
        self.bar = None
        cfg = run.config
        if cfg.progress and run.info.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=run.total_steps, initial=first_step, unit="step", dynamic_ncols=True, desc="train")
        self.restart()

    def restart(self) -> None:
        """Start a new logging window (also after an evaluation, whose time is not training throughput)."""
        device = self.run.device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # finite step losses of the window
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        self.images = 0
        self.data_seconds = 0.0
        self.t0 = time.perf_counter()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def update(self, step: int, out: StepOutput) -> None:
        """Account for step ``step`` (counted from 1, after the optimiser step) and log when it is time."""
        run = self.run
        finite = torch.isfinite(out.loss)
        self.loss_sum += torch.where(finite, out.loss, 0.0)
        self.loss_count += finite
        self.images += out.images
        self.data_seconds += out.data_seconds
        if self.bar is not None:
            self.bar.update(1)
        if step % run.config.log_every_steps and step != run.total_steps:
            return
        elapsed = time.perf_counter() - self.t0
        loss_sum, count = sum_over_processes([self.loss_sum.item(), self.loss_count.item()])
        loss = loss_sum / max(count, 1)
        throughput = self.images * run.info.world_size / max(elapsed, 1e-9)
        run.log.metric({"kind": "step", "step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": loss,
                        "lr": out.lr, "grad_norm": float(out.grad_norm), "images_per_s": throughput,
                        "data_wait": round(min(1.0, self.data_seconds / max(elapsed, 1e-9)), 4)})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{throughput:.0f}", lr=f"{out.lr:.2e}")
        self.restart()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
