"""Run a ViT over a dataset and collect its logits or frozen representations, exactly once per sample.

Representations (what few-shot, kNN and linear probes read):

- ``pre_logits``: what the classifier head sees, ``forward_head(tokens, pre_logits=True)``: the pooled token after
  ``fc_norm`` and, for models that have one, the pre-logits layer (Dense + tanh). The paper's few-shot choice.
- ``cls_token``: the class token after the final LayerNorm, ``forward_features(x)[:, 0]``.
- ``gap``: the mean of the patch tokens after the final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import VitlabError
from .distributed import IndexedDataset, ShardSampler, gather_by_index

OUTPUTS = ("logits", "pre_logits", "cls_token", "gap")
REPRESENTATIONS = OUTPUTS[1:]


def output_function(model: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function images (B, C, H, W) -> outputs (B, ...) for one of :data:`OUTPUTS`."""
    if kind == "logits":
        return model
    if kind == "pre_logits":
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    if kind == "cls_token":
        if getattr(model, "num_prefix_tokens", 0) < 1:
            raise VitlabError("representation 'cls_token' needs a model with a class token; use pre_logits or gap")
        return lambda x: model.forward_features(x)[:, 0]
    if kind == "gap":
        return lambda x: model.forward_features(x)[:, getattr(model, "num_prefix_tokens", 0):].mean(dim=1)
    raise VitlabError(f"unknown output {kind!r}; choose one of {', '.join(OUTPUTS)}")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_outputs(
    model: nn.Module,
    dataset: Dataset,
    kind: str = "logits",
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``model`` for every sample of a dataset of ``(image, label)``, in dataset order.

    ``kind`` is one of :data:`OUTPUTS`. When a ``torch.distributed`` process group is initialised each process runs a
    disjoint shard (no padding) and every process gets the complete, deduplicated result, identical to a
    single-process run. Returns ``(outputs (N, ...) float32 on the CPU, labels (N,) int64)``. The model is put in
    eval mode and restored afterwards."""
    fn = output_function(model, kind)
    device = torch.device(device) if device is not None else _device_of(model)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise VitlabError("the evaluation data set is empty")
    loader = DataLoader(IndexedDataset(dataset), batch_size=batch_size, num_workers=num_workers,
                        sampler=ShardSampler(len(dataset)), pin_memory=device.type == "cuda")  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    outs, labels, indices = [], [], []
    try:
        batches = loader
        if progress:
            from tqdm import tqdm

            batches = tqdm(loader, desc=kind, leave=False)
        with torch.inference_mode():
            for x, y, idx in batches:
                outs.append(fn(x.to(device, non_blocking=True)).float().cpu())
                labels.append(torch.as_tensor(y).long().reshape(-1))
                indices.append(idx)
            if not outs:  # an empty shard: shapes must still match the other processes' outputs
                outs.append(fn(dataset[0][0].unsqueeze(0).to(device)).float().cpu()[:0])  # type: ignore[index]
    finally:
        model.train(was_training)
    # concatenated outside inference mode: the results are ordinary tensors that probes may train on
    local = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long), torch.cat(outs),
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    _, outputs, labels_all = gather_by_index(*local)
    return outputs, labels_all


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
        feats, targets = model_outputs(model, TensorDataset(data, targets), representation, batch_size, **kwargs)
        return feats, (targets if labels is not None else None)
    return model_outputs(model, data, representation, batch_size, **kwargs)
