"""The functions of :mod:`vitlab.train` that compose its modules and the layers below: :func:`finetune` (training
from a checkpoint) and :func:`evaluate` (accuracy of a model on a data set). ``vitlab.train`` re-exports them."""

from __future__ import annotations

from pathlib import Path

from ..data import ArrayDataset, build_dataset
from ..data.loaders import folder_eval_batches, in_memory_eval_batches
from ..errors import VitlabError
from ..evaluate.classification import SUMMARY_KEYS, evaluate_classifier
from ..evaluate.classmap import check_classes
from ..evaluate.data import class_names_of
from ..models import metadata_of
from . import distributed as D
from .config import TrainConfig
from .loop import TrainResult, train


def finetune(checkpoint: str | Path, config: TrainConfig) -> TrainResult:
    """Fine-tune the model in ``checkpoint`` (any format ``vitlab.load`` reads) as ``config`` says."""
    return train(config.replace(init_from=str(checkpoint)))


def evaluate(model, data: str, split: str = "test", *, data_dir: str | None = None, batch_size: int = 256,
             num_workers: int = 0, device: str = "auto", precision: str = "fp32", topk: tuple[int, ...] = (1, 5),
             on_bad_image: str = "skip") -> dict:
    """Top-k accuracy of ``model`` on a named set, image folder or tar shards, with the model's preprocessing
    (``model.preprocessing``, else the paper's for its input size). Exact under ``torchrun`` (each process
    evaluates a disjoint share). Data whose classes cannot be the model's (another number of classes, or other
    names than those the model carries) are refused, as in ``vitlab eval``. Returns ``{"top1", "top5", "loss",
    "mean_class_accuracy", "samples", "skipped"}`` (mean average precision and F1 for multi-label data), measured
    by :func:`vitlab.evaluate.evaluate_classifier` (the evaluator of ``vitlab eval``) on the training loaders'
    batches."""
    info = D.setup(device)
    cfg = model.cfg
    meta = metadata_of(model)
    pre = meta.preprocessing
    dataset = build_dataset(data, split, data_dir=data_dir, channels=pre.channels, on_error=on_bad_image)
    check_classes(cfg.num_classes, meta.class_names, class_names_of(dataset), "the model", data)
    if isinstance(dataset, ArrayDataset):
        if dataset.channels != cfg.in_chans:
            raise VitlabError(f"{data}: {dataset.channels}-channel images, the model takes {cfg.in_chans}")
        batches = in_memory_eval_batches(dataset, pre, batch_size, info.rank, info.world_size, info.device)
    else:
        batches = folder_eval_batches(dataset, pre, batch_size, info.rank, info.world_size, num_workers, info.device)
    model = model.to(info.device)
    results = evaluate_classifier(model, batches, ks=topk, device=info.device, precision=precision)
    return {k: results[k] for k in (*SUMMARY_KEYS, *(f"top{k}" for k in topk)) if k in results}
