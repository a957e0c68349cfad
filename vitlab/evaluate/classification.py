"""Classification accuracy of a model on a labelled dataset: ``vitlab eval`` as a function returning plain data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ..errors import VitlabError
from .distributed import sum_over_processes
from .features import model_outputs
from .metrics import classification_metrics, multilabel_metrics


def load_label_sets(path: str | Path, file_names: Sequence[str] | None = None) -> list[list[int]]:
    """Read a ReaL-style multi-label file and return one list of acceptable class indices per sample, in the data
    set's order.

    The file is JSON: either an object mapping image file names (matched on the base name) to label lists, or a list
    of label lists. For a list and a data set of files (``file_names`` given, in data set order), entry i belongs to
    the i-th file in sorted base-name order: ImageNet ReaL's ``real.json`` convention (entry i is
    ``ILSVRC2012_val_{i+1:08d}.JPEG``), whatever class folders the files sit in. Without ``file_names`` a list is
    taken in data set order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitlabError(f"labels file {path}: cannot read it as JSON ({exc})") from exc
    if isinstance(data, dict):
        if file_names is None:
            raise VitlabError(f"labels file {path} maps file names to labels, but this data set has no file names")
        by_name = {Path(k).name: v for k, v in data.items()}
        missing = [n for n in file_names if Path(n).name not in by_name]
        if missing:
            raise VitlabError(f"labels file {path} has no entry for {len(missing)} images, e.g. {missing[0]}")
        data = [by_name[Path(n).name] for n in file_names]
    elif isinstance(data, list) and file_names is not None:
        if len(data) != len(file_names):
            raise VitlabError(f"labels file {path} has {len(data)} entries but the data set has {len(file_names)} "
                              "images")
        names = [Path(n).name for n in file_names]
        rank = {name: i for i, name in enumerate(sorted(names))}
        if len(rank) != len(names):
            raise VitlabError(f"labels file {path} is a list, but file names repeat across folders; use an object "
                              "mapping file names to labels")
        data = [data[rank[name]] for name in names]
    if not isinstance(data, list) or not all(isinstance(s, list) for s in data):
        raise VitlabError(f"labels file {path} must hold a list of label lists or an object of them")
    try:
        return [[int(v) for v in labels] for labels in data]
    except (TypeError, ValueError) as exc:
        raise VitlabError(f"labels file {path}: labels must be integers ({exc})") from exc


SUMMARY_KEYS = ("samples", "skipped", "loss", "top1", "top5",  # what training logs of each evaluation
                "mean_class_accuracy",                      # (balanced accuracy: the mean of per-class recalls)
                "map_macro", "map_micro", "f1_micro")      # (the last three: multi-label data)


def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset | Iterable,
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5),
    label_sets: Sequence[Sequence[int]] | None = None,
    num_bins: int = 15,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    **kwargs,
) -> dict:
    """Top-k, per-class accuracy, confusion matrix, calibration (and ReaL accuracy with ``label_sets``) of a model.

    The one classification evaluator: ``vitlab eval``, evaluation during training (:mod:`vitlab.train`) and the
    experiments all measure with it. ``dataset`` yields ``(image tensor, int label)`` already preprocessed for the
    model, or is an iterable of prepared batches (:class:`vitlab.data.loaders.Batch`, this process's share; training
    evaluates so). Exact when run on several processes (every sample counted once). Other keyword arguments go to
    :func:`features.model_outputs` (device, num_workers, progress, on_skipped, precision). Returns the dict of
    :func:`metrics.classification_metrics` plus ``class_names`` and ``skipped`` (samples whose image could not be
    read, left out of every score); ``{k: out[k] for k in SUMMARY_KEYS if k in out}`` is what training logs.

    Multi-label data (targets are float multi-hot rows (K,)) get :func:`metrics.multilabel_metrics` instead: mean
    average precision (macro and micro), F1 at ``threshold`` and ReaL-style top-1."""
    skipped = []
    if not isinstance(dataset, Dataset):  # batches: count the skipped files as they pass
        report = kwargs.pop("on_skipped", None)

        def on_skipped(reasons: list[str]) -> None:
            skipped.extend(reasons)
            if report is not None:
                report(reasons)

        kwargs["on_skipped"] = on_skipped
    if label_sets is not None and isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) \
            and len(label_sets) != len(dataset):  # type: ignore[arg-type]  # before a pass that may take an hour
        raise VitlabError(f"the labels file has {len(label_sets)} entries but the data set has "
                          f"{len(dataset)} samples")  # type: ignore[arg-type]
    logits, labels, indices = model_outputs(model, dataset, "logits", batch_size, **kwargs)
    if labels.ndim == 2:  # multi-hot targets
        if label_sets is not None:
            raise VitlabError("a ReaL-style labels file is for single-label data; these data are multi-label already")
        if labels.shape[1] != logits.shape[1]:
            raise VitlabError(f"the data have {labels.shape[1]} labels but the model predicts {logits.shape[1]}")
        out = multilabel_metrics(logits, labels, threshold)
        return _named(out, class_names, logits.shape[1], dataset, skipped)
    if label_sets is not None:
        if not isinstance(dataset, Dataset) or isinstance(dataset, IterableDataset):
            raise VitlabError("a multi-label file needs an indexable data set (an image folder or a named set), "
                              "not tar shards")
        if len(label_sets) != len(dataset):  # type: ignore[arg-type]
            raise VitlabError(f"the labels file has {len(label_sets)} entries but the data set has "
                              f"{len(dataset)} samples")  # type: ignore[arg-type]
        label_sets = [label_sets[i] for i in indices.tolist()]  # unreadable images are left out of both scores
    if labels.numel() and labels.max() >= logits.shape[1]:
        raise VitlabError(f"the dataset has label {int(labels.max())} but the model predicts {logits.shape[1]} classes")
    out = classification_metrics(logits, labels, ks=ks, num_bins=num_bins, label_sets=label_sets)
    return _named(out, class_names, logits.shape[1], dataset, skipped)


def _named(out: dict, class_names: Sequence[str] | None, num_classes: int, dataset, skipped: list) -> dict:
    """``out`` with ``class_names`` and ``skipped`` added."""
    if class_names is not None and len(class_names) != num_classes:
        raise VitlabError(f"{len(class_names)} class names for a model with {num_classes} classes")
    out["class_names"] = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if not isinstance(dataset, Dataset):
        out["skipped"] = int(sum_over_processes([float(len(skipped))])[0])
    elif not isinstance(dataset, IterableDataset):
        out["skipped"] = len(dataset) - out["samples"]  # type: ignore[arg-type]
    return out
