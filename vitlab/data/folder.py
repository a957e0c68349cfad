"""Any folder of images: ``root/<class name>/**/<image>``, one sub-folder per class (torchvision's layout).

Images are the usual formats plus ``.npy`` arrays and, for more than three channels, multi-band TIFFs
(:func:`~vitlab.data.images.load_sample`). :class:`~vitlab.data.manifest.ManifestDataset` reuses this class for
CSV / JSONL manifests (its samples come from the file instead of the folder tree).

Files are decoded with :func:`~vitlab.data.images.load_image`; a file that cannot be used yields ``None`` plus its
path instead of raising (``on_error='skip'``), so that :func:`collate_skipping` can drop it from the batch and the
training loop can count and name it. With ``on_error='fail'`` the first bad file stops the run with its name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.datasets import DatasetFolder

from ..errors import InvalidValueError, VitlabError
from .images import SAMPLE_EXTENSIONS, ImageLoadError, load_sample

ON_ERROR = ("skip", "fail")


class BadSample:
    """Stands in for a sample whose file could not be used; carries the reason (which names the file)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"BadSample({self.reason!r})"


class ImageFolderDataset(DatasetFolder):
    """Labelled images from a class-per-folder tree.

    ``transform`` maps a PIL image (``RGB`` or ``L`` per ``channels``), or the float tensor (C, H, W) of an array
    image (``.npy``, or any file when ``channels`` is not 1 or 3), to a tensor. ``sample_seed(index)``, when
    given, seeds torch's generator before the transform so that a sample's random augmentation depends only on the
    run seed, the epoch and the index, not on which worker or process loads it (exact resumption)."""

    def __init__(self, root: str | Path, transform: Callable | None = None, channels: int = 3,
                 on_error: str = "skip", max_pixels: int | None = None):
        if on_error not in ON_ERROR:
            raise InvalidValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        root = Path(root)
        if not root.is_dir():
            raise VitlabError(f"{root}: no such folder")
        try:
            super().__init__(str(root), loader=self._load, extensions=SAMPLE_EXTENSIONS, transform=transform)
        except FileNotFoundError as exc:  # torchvision: no class folders, or a class folder without images
            raise VitlabError(f"{root}: not an image-folder tree ({exc})") from exc
        self.channels = channels
        self.on_error = on_error
        self.max_pixels = max_pixels
        self.sample_seed: Callable[[int], int] | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _load(self, path: str, name: str | None = None):
        kwargs = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
        return load_sample(path, self.channels, name=name, **kwargs)

    def _name(self, index: int, path: str) -> str | None:
        """How errors name sample ``index``'s file (None: its path; manifests add their line)."""
        return None

    def _target(self, label):
        """The sample's target from its stored label (manifests: a multi-hot tensor for multi-label data)."""
        return label

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        label = self._target(label)
        try:
            image = self._load(path, self._name(index, path))
        except ImageLoadError as exc:
            if self.on_error == "fail":
                raise
            return BadSample(str(exc)), label
        if self.transform is not None:
            if self.sample_seed is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.sample_seed(index))
                    image = self.transform(image)
            else:
                image = self.transform(image)
        return image, label


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the good samples of a batch; returns (images, labels, reasons for the skipped ones). Labels are int64
    (b,) class indices, or float32 (b, K) multi-hot rows when the samples' targets are tensors (multi-label).

    An all-bad batch gives empty tensors (0 images) and the reasons."""
    good = [(x, y) for x, y in batch if not isinstance(x, BadSample)]
    bad = [x.reason for x, _ in batch if isinstance(x, BadSample)]
    multi_hot = bool(batch) and isinstance(batch[0][1], torch.Tensor)
    if not good:
        empty = torch.empty(0, batch[0][1].shape[0]) if multi_hot else torch.empty(0, dtype=torch.long)
        return torch.empty(0), empty, bad
    images = torch.stack([x for x, _ in good])
    labels = torch.stack([y for _, y in good]) if multi_hot else torch.tensor([y for _, y in good], dtype=torch.long)
    return images, labels, bad
