"""Per-channel pixel statistics of a data set, for normalising images whose channels are not photographs' (satellite
bands, microscopy, 16-bit sensors): ``channel_statistics(dataset) -> (mean, std)``.

Pixels are taken as the data loaders see them before normalisation: uint8 / 8-bit images scaled to [0, 1], array
images (``.npy``, multi-band TIFF) as :func:`~vitlab.data.images.load_array_image` scales them. Every pixel of the
chosen images counts once (larger images weigh more). The images are a fixed, evenly spaced choice, so every process
of a run and a resumed run measure the same numbers.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

from ..errors import VitlabError
from .arrays import ArrayDataset
from .folder import ImageFolderDataset
from .images import ImageLoadError

DEFAULT_MAX_IMAGES = 1000


def _as_float(image) -> torch.Tensor:
    """A PIL image or an array tensor (C, H, W) as float64 pixels in the loaders' scale."""
    if isinstance(image, torch.Tensor):
        return image.double() / 255.0 if image.dtype == torch.uint8 else image.double()
    return TF.to_image(image).double() / 255.0


def _images(dataset, max_images: int):
    """Up to ``max_images`` decoded images of ``dataset``, evenly spaced (an iterable set: its first ones); files
    that cannot be read are passed over."""
    if isinstance(dataset, ArrayDataset):
        n = len(dataset)
        picks = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique()
        for i in picks.tolist():
            yield dataset.images[i]
        return
    if isinstance(dataset, ImageFolderDataset):
        n = len(dataset)
        picks = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique()
        for i in picks.tolist():
            try:
                yield dataset._load(dataset.samples[i][0])
            except ImageLoadError:
                continue
        return
    transform, dataset.transform = getattr(dataset, "transform", None), None
    try:
        taken = 0
        for image, _ in dataset:
            if taken >= max_images:
                break
            if isinstance(image, torch.Tensor) or hasattr(image, "mode"):
                taken += 1
                yield image
    finally:
        dataset.transform = transform


def channel_statistics(dataset, max_images: int = DEFAULT_MAX_IMAGES) -> tuple[tuple[float, ...], tuple[float, ...],
                                                                                  int]:
    """(per-channel mean, per-channel std, images measured) over up to ``max_images`` images of ``dataset`` (an
    in-memory set, an image folder or manifest, or tar shards). A channel with no spread gets std 1 (it cannot be
    scaled to unit variance; it is only centred)."""
    total = squares = None
    count, images = 0, 0
    for image in _images(dataset, max_images):
        x = _as_float(image)
        flat = x.reshape(x.shape[0], -1)
        if total is None:
            total, squares = flat.sum(1), (flat * flat).sum(1)
        elif flat.shape[0] != total.shape[0]:
            raise VitlabError(f"images with {total.shape[0]} and {flat.shape[0]} channels in one data set")
        else:
            total, squares = total + flat.sum(1), squares + (flat * flat).sum(1)
        count += flat.shape[1]
        images += 1
    if not images:
        raise VitlabError("no readable image to measure the per-channel mean and std on")
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0)
    std = [math.sqrt(v) if v > 1e-12 else 1.0 for v in var.tolist()]
    return tuple(mean.tolist()), tuple(std), images
