"""Evaluation data: any source :func:`vitlab.data.build_dataset` reads, with a model's evaluation preprocessing.

Named in-memory sets (Fashion-MNIST, MNIST, digits, CIFAR) hold uint8 tensors; the preprocessing record's
torchvision transform works on those tensors as on PIL images, so every source gets the same resize policy,
interpolation, channel conversion and normalisation.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Subset

from ..data import build_dataset
from ..errors import VitlabError
from ..preprocessing import Preprocessing


def eval_dataset(spec: str, split: str, preprocessing: Preprocessing, data_dir: str | None = None,
                 download: bool = False, on_error: str = "skip", classes=None) -> Dataset:
    """The ``split`` of ``spec`` (a named set, an image folder, tar shards) yielding ``(tensor, label)`` prepared
    with ``preprocessing``. Image files are decoded with the preprocessing's channel count; files that cannot be
    decoded come out as ``vitlab.data.BadSample`` (skipped and counted by the evaluators) or, with
    ``on_error='fail'``, stop the run. ``classes`` is a manifest's class list (:func:`vitlab.data.build_dataset`)."""
    extra = {} if classes is None else {"classes": classes}
    dataset = build_dataset(spec, split, data_dir=data_dir, download=download, channels=preprocessing.channels,
                            on_error=on_error, **extra)
    return with_transform(dataset, preprocessing)


class _Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return (self.transform(image) if isinstance(image, torch.Tensor | Image.Image) else image), label


def with_transform(dataset: Dataset, preprocessing: Preprocessing) -> Dataset:
    """A view of a raw data set (images as uint8 tensors or PIL images) that yields ``(tensor, label)`` prepared
    with ``preprocessing``. The raw data set is not changed (data sets with a ``transform`` field are copied)."""
    transform = preprocessing.transform()
    if dataclasses.is_dataclass(dataset) and hasattr(dataset, "transform"):  # in-memory sets: shares the tensors
        return dataclasses.replace(dataset, transform=transform)
    if hasattr(dataset, "transform"):  # image folders, tar shards: a shallow copy with its own transform
        view = copy.copy(dataset)
        view.transform = transform
        return view
    return _Transformed(dataset, transform)


def class_names_of(dataset: Dataset) -> list[str] | None:
    """The class names a data set carries (``class_names`` or ``classes``), looking through subsets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    return list(names) if names else None


def limit_dataset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of ``limit`` samples (kept in dataset order), or the data set itself when ``limit``
    is None or not smaller than its length."""
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if limit < 1:
        raise VitlabError(f"the sample limit must be positive, got {limit}")
    if isinstance(dataset, IterableDataset):
        raise VitlabError("tar shards cannot be subsampled; drop the sample limit")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])  # type: ignore[arg-type]
    return Subset(dataset, chosen.tolist())
