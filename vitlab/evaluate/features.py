"""Run a ViT over a dataset and collect its logits or frozen representations, exactly once per sample.

Representations (what few-shot, kNN and linear probes read):

- ``pre_logits``: what the classifier head sees, ``forward_head(tokens, pre_logits=True)``: the pooled token after
  ``fc_norm`` and, for models that have one, the pre-logits layer (Dense + tanh). The paper's few-shot choice.
- ``cls_token``: the class token after the final LayerNorm, ``forward_features(x)[:, 0]``.
- ``gap``: the mean of the patch tokens after the final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ..devices import autocast
from ..errors import VitlabError
from ..models import has_tokens
from .distributed import IndexedDataset, ShardSampler, gather_by_index, world

OUTPUTS = ("logits", "pre_logits", "cls_token", "gap")
REPRESENTATIONS = OUTPUTS[1:]


def output_function(model: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function images (B, C, H, W) -> outputs (B, ...) for one of :data:`OUTPUTS`."""
    if kind == "logits":
        return model
    if kind in REPRESENTATIONS and not hasattr(model, "forward_features"):  # ONNX Runtime / AOTInductor: logits only
        raise VitlabError(f"representation {kind!r} needs the PyTorch model; an exported (.onnx / .pt2) model gives "
                          "logits only: use the checkpoint it was exported from")
    if kind == "pre_logits":
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    if kind == "cls_token":
        # the class token, not just any first prefix token (a model may have registers and no class token)
        if not getattr(getattr(model, "cfg", None), "class_token", getattr(model, "num_prefix_tokens", 0) >= 1):
            raise VitlabError("representation 'cls_token' needs a model with a class token; use pre_logits or gap")
        return lambda x: model.forward_features(x)[:, 0]
    if kind == "gap":
        cfg = getattr(model, "cfg", None)
        if cfg is not None and not has_tokens(cfg):  # forward_features is a (B, C, h, w) map, not tokens
            raise VitlabError("representation 'gap' (the mean of the patch tokens) needs a model with tokens; a "
                              "convolutional model's pre_logits is its global average pool")
        return lambda x: model.forward_features(x)[:, getattr(model, "num_prefix_tokens", 0):].mean(dim=1)
    raise VitlabError(f"unknown output {kind!r}; choose one of {', '.join(OUTPUTS)}")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class ModelOutputs(NamedTuple):
    """Outputs (N, ...) float32, labels (N,) int64 (or (N, K) float32 multi-hot targets) and dataset indices (N,)
    int64, sorted by index."""

    outputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


class _NumberedStream(IterableDataset):
    """An iterable dataset's samples numbered ``position * world + rank``: unique over processes (each process
    reads its own part of the stream), so the exact gather keeps every sample once."""

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __iter__(self):
        for position, item in enumerate(self.dataset):
            yield item[0], item[1], position * self.world_size + self.rank


def _collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[str]]:
    """Stack the decodable samples; samples whose image is not a tensor (a data set's stand-in for a file that
    could not be read) are dropped and their reasons returned."""
    good = [item for item in batch if isinstance(item[0], torch.Tensor)]
    bad = [str(getattr(item[0], "reason", item[0])) for item in batch if not isinstance(item[0], torch.Tensor)]
    images = torch.stack([x for x, _, _ in good]) if good else None
    if batch and isinstance(batch[0][1], torch.Tensor) and batch[0][1].ndim == 1:  # multi-hot targets (K,)
        labels = (torch.stack([y for _, y, _ in good]) if good
                  else torch.zeros(0, batch[0][1].shape[0]))
    else:
        labels = torch.tensor([int(y) for _, y, _ in good], dtype=torch.long)
    indices = torch.tensor([int(i) for _, _, i in good], dtype=torch.long)
    return images, labels, indices, bad


def _numbered_batches(batches: Iterable, rank: int, world_size: int):
    """Already prepared batches (:class:`vitlab.data.loaders.Batch`: this process's share of the samples ``rank,
    rank + W, ...``, as the training loaders give them) in the form the DataLoader path yields: (images or None,
    labels, sample indices, skipped reasons). The i-th sample this process sees is numbered ``i * W + rank``."""
    seen = 0
    for batch in batches:
        n = batch.labels.shape[0]
        indices = torch.arange(seen, seen + n) * world_size + rank
        seen += n
        yield (batch.images if n else None), batch.labels, indices, list(batch.skipped)


def model_outputs(
    model: nn.Module,
    dataset: Dataset | Iterable,
    kind: str = "logits",
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_skipped: Callable[[list[str]], None] | None = None,
    precision: str = "fp32",
) -> ModelOutputs:
    """Outputs of ``model`` for every sample of a dataset of ``(image tensor, label)``, in dataset order.

    ``kind`` is one of :data:`OUTPUTS`. ``dataset`` may also be an iterable of prepared batches
    (:class:`vitlab.data.loaders.Batch`, this process's share), as training evaluates. When a ``torch.distributed``
    process group is initialised each process runs a disjoint shard (no padding) and every process gets the
    complete, deduplicated result, identical to a single-process run. Samples whose image is not a tensor
    (unreadable files) are left out and their reasons passed to ``on_skipped``; ``indices`` tells which samples are
    present. An iterable dataset (tar shards) is read as it splits itself over processes; its indices are stream
    positions. ``precision='bf16'`` / ``'fp16'`` runs the model under bf16 / fp16 autocast (outputs are returned as
    float32).
    The model is put in eval mode and restored."""
    fn = output_function(model, kind)
    device = torch.device(device) if device is not None else _device_of(model)
    if precision not in ("fp32", "bf16", "fp16"):
        raise VitlabError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    mixed_precision = autocast(device, precision)
    rank, world_size = world()
    if not isinstance(dataset, Dataset):
        loader = _numbered_batches(dataset, rank, world_size)
    elif isinstance(dataset, IterableDataset):
        loader = DataLoader(_NumberedStream(dataset, rank, world_size), batch_size=batch_size, collate_fn=_collate)
    else:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise VitlabError("the evaluation data set is empty")
        loader = DataLoader(IndexedDataset(dataset), batch_size=batch_size, num_workers=num_workers,
                            sampler=ShardSampler(len(dataset)), collate_fn=_collate,  # type: ignore[arg-type]
                            pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    outs, labels, indices = [], [], []
    empty_labels = torch.zeros(0, dtype=torch.long)
    try:
        batches = loader
        if progress:
            from tqdm import tqdm

            batches = tqdm(loader, desc=kind, leave=False)
        with torch.inference_mode():
            for x, y, idx, bad in batches:
                if bad and on_skipped is not None:
                    on_skipped(bad)
                empty_labels = y[:0]  # an all-bad share still gathers labels of the right row shape
                if x is None:
                    continue
                with mixed_precision:
                    outs.append(fn(x.to(device, non_blocking=True)).float().cpu())
                labels.append(y)
                indices.append(idx)
            if not outs:  # nothing on this process: the empty result must still have the right row shape
                shape = _output_shape(model, kind, device)
                outs.append(torch.zeros((0, *shape)))
    finally:
        model.train(was_training)
    # concatenated outside inference mode: the results are ordinary tensors that probes may train on
    local = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long), torch.cat(outs),
             torch.cat(labels) if labels else empty_labels)
    index, outputs, labels_all = gather_by_index(*local)
    if outputs.shape[0] == 0:
        raise VitlabError("no sample of the evaluation data could be read")
    return ModelOutputs(outputs, labels_all, index)


def _output_shape(model: nn.Module, kind: str, device: torch.device) -> tuple[int, ...]:
    cfg = model.cfg
    probe = torch.zeros(1, cfg.in_chans, *cfg.img_size, device=device)
    return tuple(output_function(model, kind)(probe).shape[1:])


def extract_features(
    model: nn.Module,
    data: Dataset | torch.Tensor,
    labels: torch.Tensor | None = None,
    representation: str = "pre_logits",
    batch_size: int = 256,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frozen representations (N, R) of a dataset, or of an image tensor (N, C, H, W) with optional labels (N,).

    ``representation`` is one of :data:`REPRESENTATIONS`; other keyword arguments go to :func:`model_outputs`.
    Returns ``(features, labels)``; labels are None when images were given without them."""
    if representation not in REPRESENTATIONS:
        raise VitlabError(f"unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}")
    if isinstance(data, torch.Tensor):
        targets = labels if labels is not None else torch.zeros(data.shape[0], dtype=torch.long)
        feats, targets, _ = model_outputs(model, TensorDataset(data, targets), representation, batch_size, **kwargs)
        return feats, (targets if labels is not None else None)
    feats, targets, _ = model_outputs(model, data, representation, batch_size, **kwargs)
    return feats, targets
