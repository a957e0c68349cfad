"""Step logging and the progress bar, in one place: ``StepLog``.

Losses are summed on the device and read back (one synchronisation) only every ``log_every_steps`` steps, when a
``step`` row goes to ``metrics.jsonl`` and the progress bar's figures are refreshed. Which steps were skipped
(non-finite loss or gradients, or fp16 gradients that overflowed the loss scale) is read back at the same time: each
is logged then, counted in the row's ``skipped_steps``, and ``max_bad_steps`` skipped in a row stop the run (raised
at that logging step, on every process alike). A row's ``data_wait`` is the share of the window's wall time this
process spent waiting for its batches (a loader slower than the steps shows there).
"""

from __future__ import annotations

import math
import sys
import time

import torch

from ..errors import VitlabError
from ..evaluate.distributed import sum_over_processes
from .run import Run
from .step import StepOutput


class StepLog:
    """Collects the steps between two log rows; ``update`` after every step, ``close`` at the end."""

    def __init__(self, run: Run, first_step: int):
        self.run = run
        self.bar = None
        self.bad_streak = 0  # skipped steps in a row up to the last logging step
        cfg = run.config
        # per step of a window (at most log_every_steps): whether it stepped and its loss, kept on the device
        self.window_stepped = torch.ones(cfg.log_every_steps, dtype=torch.bool, device=run.device)
        self.window_losses = torch.zeros(cfg.log_every_steps, dtype=torch.float64, device=run.device)
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
        self.steps = 0
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
        self.window_stepped[self.steps] = out.stepped
        self.window_losses[self.steps] = out.loss
        self.steps += 1
        self.images += out.images
        self.data_seconds += out.data_seconds
        if self.bar is not None:
            self.bar.update(1)
        if step % run.config.log_every_steps and step != run.total_steps:
            return
        elapsed = time.perf_counter() - self.t0
        skipped = self._skipped_steps(step, out.lr)
        loss_sum, count = sum_over_processes([self.loss_sum.item(), self.loss_count.item()])
        loss = loss_sum / max(count, 1)
        throughput = self.images * run.info.world_size / max(elapsed, 1e-9)
        row = {"kind": "step", "step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": loss,
               "lr": out.lr, "grad_norm": float(out.grad_norm), "images_per_s": throughput, "skipped_steps": skipped,
               "data_wait": round(min(1.0, self.data_seconds / max(elapsed, 1e-9)), 4)}
        if run.scaler is not None:
            row["loss_scale"] = run.scaler.get_scale()
        run.log.metric(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{throughput:.0f}", lr=f"{out.lr:.2e}")
        self.restart()

    def _skipped_steps(self, step: int, lr: float) -> int:
        """Log the window's skipped steps (it ends at ``step``, counted from 1) and return how many there were;
        raise when ``max_bad_steps`` came in a row."""
        run = self.run
        stepped = self.window_stepped[:self.steps].tolist()
        if all(stepped):
            self.bad_streak = 0
            return 0
        losses = self.window_losses[:self.steps].tolist()
        first = step - len(stepped)  # the window's first step, counted from 0 as the messages count
        overflowed = []
        for index, (ok, loss) in enumerate(zip(stepped, losses), start=first):
            if ok:
                self.bad_streak = 0
                continue
            self.bad_streak += 1
            if run.scaler is not None and math.isfinite(loss):  # the gradients overflowed fp16, not the loss
                overflowed.append(index)
            else:
                run.log.warning(f"step {index}: non-finite loss or gradients ({loss:.4g}); step skipped")
            if self.bad_streak >= run.config.max_bad_steps:
                raise VitlabError(
                    f"training diverged: {self.bad_streak} non-finite steps in a row at step {index} (learning rate "
                    f"{lr:.3g}); lower lr, raise warmup_epochs, clip gradients (grad_clip=1) or use precision=fp32, "
                    "then resume from the last checkpoint",
                    options=("lr", "warmup_epochs", "grad_clip", "precision", "resume"))
        if overflowed:  # the scale finding its level (at the start) or a rare large gradient: expected, not a fault
            shown = ", ".join(map(str, overflowed))
            run.log.info(f"step{'s' if len(overflowed) > 1 else ''} {shown}: fp16 gradients overflowed the loss "
                         f"scale; skipped, scale now {run.scaler.get_scale():g}")
        return len(stepped) - sum(stepped)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
