"""One optimiser step: ``train_step(run, micro_batches, step) -> StepOutput``.

Forward, loss and backward over ``accum_steps`` micro-batches (DDP synchronises the gradients on the last one only),
then the global gradient norm (clipped), the optimiser step (skipped when the norm is not finite), the schedule and
EMA. The loss stays on the device: the loop reads it back only when it logs.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.loaders import Batch, mix_seed
from ..devices import autocast
from .run import Run


@dataclass
class StepOutput:
    """What one step did: the mean loss over its micro-batches (a float64 tensor on the device), the gradient norm
    (a tensor), whether the optimiser stepped, the learning rate it used, the images it saw on this process and the
    files skipped while loading them."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    stepped: bool
    lr: float
    images: int
    skipped: list[str] = field(default_factory=list)


def grad_norm(parameters: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Global gradient norm (clipping to ``clip`` when > 0). Computed on synchronised gradients, so every process
    gets the same value and makes the same skip decision."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
    else:
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def train_step(run: Run, micro_batches: Iterator[Batch], step: int) -> StepOutput:
    """Optimiser step ``step`` (counted from 0) on the next ``accum_steps`` micro-batches of ``micro_batches``."""
    cfg, objective = run.config, run.objective
    accum = cfg.accum_steps
    ddp = isinstance(run.trainable, nn.parallel.DistributedDataParallel)
    loss = torch.zeros((), dtype=torch.float64, device=run.device)
    images, skipped = 0, []
    for micro_step in range(accum):
        batch = next(micro_batches)
        # dropout, drop-path and mixup draw from the global generator: seeded from (seed, step, the micro-batch's
        # place in the global batch), not the rank, after the batch is fetched (a DataLoader draws its base seed
        # from it when an epoch starts); the same micro-batch size on any number of processes draws the same
        torch.manual_seed(mix_seed(cfg.seed, step, micro_step * run.info.world_size + run.info.rank, 4))
        if micro_step == 0:
            run.optimizer.zero_grad(set_to_none=True)
        skipped += batch.skipped
        if batch.images.shape[0] == 0:
            continue
        x, targets = objective.transform(batch.images, batch.labels)
        # patch dropout draws each image's tokens from its key (whichever process holds it)
        keyed = {"sample_keys": batch.keys} if cfg.patch_dropout > 0 and batch.keys is not None else {}
        last = micro_step == accum - 1
        with run.trainable.no_sync() if ddp and not last else nullcontext():  # all-reduce on the last one only
            with autocast(run.device, run.precision):
                output = run.forward(x, **keyed)
            micro_loss = objective.loss(output, targets)
            (micro_loss / accum).backward()
        loss += micro_loss.detach().double() / accum
        images += batch.images.shape[0]
    norm = grad_norm(run.params, cfg.grad_clip)
    stepped = bool(torch.isfinite(norm))
    if stepped:
        run.optimizer.step()
    else:
        run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model, step)
    return StepOutput(loss, norm, stepped, lr, images, skipped)
