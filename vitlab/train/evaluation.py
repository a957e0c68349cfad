"""Top-1 / top-5 accuracy over a whole evaluation set, exact under data parallelism.

Each process evaluates its own disjoint share of the samples (no padding with duplicates), then the correct counts,
sample counts and loss sums are added over the processes, so the result is the same as on one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loaders import Batch
from .distributed import all_reduce_sum, unwrap


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for ``precision='bf16'``, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[Batch], device: torch.device, topk: tuple[int, ...] = (1, 5),
                     precision: str = "fp32", on_skipped=None) -> dict:
    """Accuracy of ``model`` on ``batches`` (this process's share), summed over all processes.

    Returns ``{"top1": ..., "top5": ..., "loss": mean cross-entropy, "samples": n, "skipped": k}``; top-k entries
    for k larger than the number of classes are left out. ``on_skipped(reasons)`` is called for skipped files."""
    was_training = model.training
    model.eval()
    correct = {k: 0.0 for k in topk}
    total = loss_sum = skipped = 0.0
    num_classes = None
    try:
        for batch in batches:
            if batch.skipped:
                skipped += len(batch.skipped)
                if on_skipped is not None:
                    on_skipped(batch.skipped)
            if batch.labels.numel() == 0:
                continue
            with autocast_context(device, precision):
                logits = model(batch.images.to(device))
            logits = logits.float()
            labels = batch.labels.to(device)
            num_classes = logits.shape[1]
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            ranked = logits.topk(min(max(topk), num_classes), dim=1).indices
            hits = ranked == labels[:, None]
            for k in topk:
                correct[k] += hits[:, :k].any(dim=1).sum().item()
            total += labels.numel()
    finally:
        model.train(was_training)
    sums = all_reduce_sum([total, loss_sum, skipped, *correct.values()], device)
    total, loss_sum, skipped, counts = sums[0], sums[1], sums[2], sums[3:]
    result = {"samples": int(total), "skipped": int(skipped), "loss": loss_sum / total if total else float("nan")}
    classes = unwrap(model).cfg.num_classes if hasattr(unwrap(model), "cfg") else num_classes
    for k, count in zip(topk, counts):
        if classes is None or k == 1 or k <= classes:
            result[f"top{k}"] = count / total if total else float("nan")
    return result
