"""One optimiser step: ``train_step(run, micro_batches, step) -> StepOutput``.

Forward, loss and backward over ``accum_steps`` micro-batches (DDP synchronises the gradients on the last one only),
then the global gradient norm (clipped), the optimiser step (skipped when the norm is not finite), the schedule and
EMA. In fp16 the loss is multiplied by the gradient scaler's scale before the backward pass and the gradients are
divided by it again before the norm; the scaler lowers the scale after a step whose gradients overflowed and raises it
after a run of good ones. Nothing here waits for the device: the loss and the skip decision stay on it (a fused
optimiser takes the decision as a tensor, see :func:`vitlab.train.run.device_side_step`) and the loop reads them
back only when it logs.
"""

from __future__ import annotations

import re
import time
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
    (a tensor), whether the optimiser stepped (a bool tensor on the device: false for a non-finite step), the
    learning rate it used, the images it saw on this process, the files skipped while loading them and the seconds
    it waited for its batches (the loader's ``next``)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    stepped: torch.Tensor
    lr: float
    images: int
    skipped: list[str] = field(default_factory=list)
    data_seconds: float = 0.0


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
    cfg, objective, scaler = run.config, run.objective, run.scaler
    accum = cfg.accum_steps
    ddp = isinstance(run.trainable, nn.parallel.DistributedDataParallel)
    loss = torch.zeros((), dtype=torch.float64, device=run.device)
    images, skipped, data_seconds = 0, [], 0.0
    for micro_step in range(accum):
        t0 = time.perf_counter()
        batch = next(micro_batches)
        data_seconds += time.perf_counter() - t0
        # dropout, drop-path and mixup draw from the global generator: seeded from (seed, step, the micro-batch's
        # place in the global batch), not the rank, after the batch is fetched (a DataLoader draws its base seed
        # from it when an epoch starts); the same micro-batch size on any number of processes draws the same
        torch.manual_seed(mix_seed(cfg.seed, step, micro_step * run.info.world_size + run.info.rank, 4))
        if micro_step == 0:
            run.optimizer.zero_grad(set_to_none=True)
        skipped += batch.skipped
        if batch.images.shape[0] == 0:
            continue
        with autocast(run.device, run.precision):  # a distillation teacher runs here, at the run's precision
            x, targets = objective.transform(batch.images, batch.labels)
        # patch dropout draws each image's tokens from its key (whichever process holds it); after
        # patch_dropout_steps the wrapper passes all tokens
        keyed = {}
        if cfg.patch_dropout > 0:
            if step >= run.patch_dropout_steps:
                keyed = {"all_tokens": True}
            elif batch.keys is not None:
                keyed = {"sample_keys": batch.keys}
        last = micro_step == accum - 1
        with run.trainable.no_sync() if ddp and not last else nullcontext():  # all-reduce on the last one only
            with autocast(run.device, run.precision):
                output = run.forward(x, **keyed)
            micro_loss = objective.loss(output, targets)
            part = micro_loss / accum
            (scaler.scale(part) if scaler is not None else part).backward()
        loss += micro_loss.detach().double() / accum
        images += batch.images.shape[0]
    if scaler is not None and images:
        scaler.unscale_(run.optimizer)  # the gradients at their true size for the norm and the clip
    for bias, keys in run.key_biases:  # exactly zero (softmax ignores a shift shared by all keys): drop the noise
        if bias.grad is not None:
            bias.grad[keys] = 0.0
    norm = grad_norm(run.params, cfg.grad_clip)
    stepped = torch.isfinite(norm)
    _optimizer_step(run, stepped, bool(images))
    lr = run.scheduler.get_last_lr()[0]
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model, step)
    return StepOutput(loss, norm, stepped, lr, images, skipped, data_seconds)


def _optimizer_step(run: Run, finite: torch.Tensor, has_grads: bool) -> None:
    """The optimiser step, skipped where ``finite`` (a bool tensor) is false. fp16: the scaler steps (skipping where
    the unscaled gradients overflowed) and updates its scale. A fused optimiser gets the decision as its
    ``found_inf`` tensor and skips on the device; an unfused one (the CPU's float32 and bf16) is asked on the host."""
    optimizer = run.optimizer
    if run.scaler is not None:
        if has_grads:  # every micro-batch empty (all its files unreadable): nothing to step, the scale stays
            run.scaler.step(optimizer)
            run.scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()  # the attribute a fused optimiser's step reads
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
