"""Top-k predictions, or pooled features, for images with a trained model: image files, folders of them, or any data
source :func:`vitlab.data.build_dataset` reads.

Each image file is decoded with :func:`vitlab.data.load_sample` (``.npy`` arrays and multi-band TIFFs too); data
sources are read by their own readers (manifests, image-folder trees, Hugging Face sources, tar shards, named sets).
Every image is transformed with the model's own preprocessing (the record a saved model carries) and run in batches,
decoded by DataLoader workers (``num_workers``), on ``device`` in ``precision``. An image that cannot be read gets
its own error entry while the others are still predicted. A model trained with the sigmoid loss (``model.loss``,
recorded in the checkpoint) answers independent per-label sigmoid probabilities, others softmax probabilities.
``features=True`` gives the pooled pre-logits features instead (what the classifier head reads,
``model.forward_head(model.forward_features(x), pre_logits=True)``), or the joint-space unit embeddings of an
image-text model (the images through :func:`vitlab.zeroshot.image_embedder`, texts through
:func:`iter_text_embeddings`). :mod:`vitlab.train.predict_files` writes the results to CSV / JSONL / parquet, or the
features to safetensors / npz / parquet.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import SPLIT_FOLDERS
from ..data.folder import BadSample
from ..data.images import SAMPLE_EXTENSIONS, ImageLoadError, load_sample
from ..data.manifest import looks_like_manifest, unlabelled_manifest_files
from ..devices import autocast
from ..errors import InvalidValueError, VitlabError
from ..evaluate.data import eval_dataset
from ..evaluate.features import output_function
from ..models import metadata_of
from ..models.image_text import embed_texts
from ..preprocessing import Preprocessing

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Prediction:
    """The result for one input: ``top`` is a list of (class index, class name, probability), best first;
    ``error`` says why the image could not be used (then ``top`` is empty and ``features`` None). With
    ``features=True`` ``top`` is empty and ``features`` the image's pooled features (D,) float32."""

    source: str
    top: list[tuple[int, str, float]] = field(default_factory=list)
    error: str | None = None
    features: torch.Tensor | None = None


def probabilities(logits: torch.Tensor, loss: str | None = None) -> torch.Tensor:
    """The model's probabilities from its logits (B, K): per-label sigmoid for a model trained with the sigmoid loss
    (each in [0, 1], not summing to 1), else the softmax over the classes."""
    return logits.float().sigmoid() if loss == "sigmoid" else logits.float().softmax(dim=1)


def image_files(paths: Sequence[str | Path]) -> list[str]:
    """``paths`` with each folder replaced by the image files under it (any depth; the extensions image folders read,
    ``vitlab.data.images.SAMPLE_EXTENSIONS``), sorted by path; files are kept as given, in order. A folder without
    images is refused (:class:`VitlabError`)."""
    files: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            files.append(str(given))
            continue
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SAMPLE_EXTENSIONS and p.is_file())
        if not found:
            raise VitlabError(f"{path}: no image files in this folder or below "
                              f"({', '.join(SAMPLE_EXTENSIONS)})")
        files.extend(str(p) for p in found)
    return files


class _Files(Dataset):
    """Image files -> (tensor, file) prepared with ``transform``, or (BadSample, file) when the file is unusable."""

    def __init__(self, files: Sequence[str | Path], transform, channels: int):
        self.files, self.transform, self.channels = [str(f) for f in files], transform, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        src = self.files[index]
        try:
            return self.transform(load_sample(src, channels=self.channels)), src
        except (ImageLoadError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            return BadSample(str(exc) if isinstance(exc, ImageLoadError) else f"{src}: {exc.strerror or exc}"), src


class _Samples(Dataset):
    """A map-style data set's samples -> (image or BadSample, source): the file of image folders and manifests,
    the row's name of Hugging Face sources, ``"<data> <split>: row N"`` for in-memory sets."""

    def __init__(self, dataset: Dataset, label: str):
        self.dataset, self.label = dataset, label

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if len(item) == 3:  # a reader that names its samples (with_names)
            return item[0], item[2]
        samples = getattr(self.dataset, "samples", None)
        return item[0], (samples[index][0] if samples is not None else f"{self.label}: row {index}")


class _Stream(IterableDataset):
    """A stream's samples (tar shards, a streamed Hugging Face source; the reader names them) -> (image, source)."""

    def __init__(self, dataset: IterableDataset):
        self.dataset = dataset

    def __iter__(self):
        for item in self.dataset:
            yield item[0], item[2]


def data_inputs(data: str, split: str, preprocessing: Preprocessing, data_dir: str | None = None,
                download: bool = False) -> Dataset:
    """The images of ``split`` of a data source (a manifest, an image-folder tree, a Hugging Face source, tar
    shards, a named set) as ``(tensor or BadSample, source)`` pairs prepared with ``preprocessing``. Labels are not
    used: tar shards and Hugging Face rows without a usable label are still predicted."""
    if looks_like_manifest(data):  # a list of images to predict needs no labels
        files = unlabelled_manifest_files(data, SPLIT_FOLDERS.get(split, (split,)))
        if files is not None:
            return file_inputs(files, preprocessing)
    dataset = eval_dataset(data, split, preprocessing, data_dir=data_dir, download=download, on_error="skip")
    if hasattr(type(dataset), "with_names"):  # the view's own attribute: the reader's other users are unchanged
        dataset.with_names = True
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "shuffle_buffer"):
            dataset.shuffle_buffer = 0  # in stored order
        return _Stream(dataset)
    return _Samples(dataset, f"{data} {split}")


def file_inputs(files: Sequence[str | Path], preprocessing: Preprocessing) -> Dataset:
    """Image files as ``(tensor or BadSample, file)`` pairs prepared with ``preprocessing`` (see
    :func:`image_files` for folders)."""
    return _Files(files, preprocessing.transform(), preprocessing.channels)


def _collate(items: list) -> tuple[torch.Tensor | None, list[tuple[str, str | None]]]:
    """The batch's readable images stacked (None if there are none), and (source, error or None) of every item in
    order."""
    good = [x for x, _ in items if isinstance(x, torch.Tensor)]
    listed = [(src, None if isinstance(x, torch.Tensor) else str(getattr(x, "reason", x))) for x, src in items]
    return (torch.stack(good) if good else None), listed


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InvalidValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}",
                                options=("precision",))


@torch.no_grad()  # not inference_mode: the features are ordinary tensors a caller may train on
def iter_predictions(model: nn.Module, inputs: Dataset, *, topk: int = 5, features: bool = False,
                     class_names: list[str] | None = None, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device = "cpu", precision: str = "fp32",
                     representation: str = "pre_logits") -> Iterator[Prediction]:
    """One :class:`Prediction` per input of ``inputs`` (:func:`file_inputs` or :func:`data_inputs`), in their order,
    computed ``batch_size`` images at a time; ``num_workers`` DataLoader workers decode the images. ``precision``
    ``bf16`` / ``fp16`` runs the model under autocast (probabilities and features are float32).

    ``features=True``: the pooled pre-logits features (D,) of each image instead of classes (refused for an exported
    .onnx / .pt2 model, which gives logits only), or another of :data:`vitlab.evaluate.features.OUTPUTS` named by
    ``representation`` (``logits``: the model's output, e.g. the unit embedding of
    :func:`vitlab.zeroshot.image_embedder`)."""
    if batch_size < 1 or num_workers < 0 or topk < 1:
        raise InvalidValueError(f"batch_size and topk must be positive and num_workers at least 0, got batch_size="
                                f"{batch_size}, topk={topk}, num_workers={num_workers}",
                                options=("batch_size", "topk", "num_workers"))
    check_precision(precision)
    forward = output_function(model, representation if features else "logits")
    meta = metadata_of(model)
    num_classes = model.cfg.num_classes
    names = class_names or meta.class_names or [str(i) for i in range(num_classes)]
    device = torch.device(device)
    model.to(device).eval()
    k = min(topk, num_classes)
    loader = DataLoader(inputs, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    for images, listed in loader:
        rows: list = []
        if images is not None:
            with autocast(device, precision):
                out = forward(images.to(device, non_blocking=True))
            if features:
                rows = list(out.float().cpu().unbind(0))
            else:
                values, indices = probabilities(out, meta.loss).topk(k, dim=1)
                rows = [[(j, names[j] if j < len(names) else str(j), v) for j, v in zip(idxs, vals)]
                        for idxs, vals in zip(indices.tolist(), values.tolist())]
        good = iter(rows)
        for source, error in listed:
            if error is not None:
                yield Prediction(source, error=error)
            elif features:
                yield Prediction(source, features=next(good))
            else:
                yield Prediction(source, top=next(good))


@torch.no_grad()
def iter_text_embeddings(model: nn.Module, texts: Sequence[str], *, batch_size: int = 64,
                         precision: str = "fp32") -> Iterator[Prediction]:
    """One :class:`Prediction` per text (its ``source`` the text, its ``features`` the (P,) float32 unit embedding by
    the text tower of the image-text ``model``, on the tower's device), ``batch_size`` texts at a time."""
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be positive, got {batch_size}", options=("batch_size",))
    check_precision(precision)
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        for text, row in zip(chunk, embed_texts(model, chunk, batch_size, precision).unbind(0)):
            yield Prediction(text, features=row)


def predict(model: nn.Module, images: Sequence[str | Path] | None = None, *, data: str | None = None,
            split: str = "test", data_dir: str | None = None, topk: int = 5,
            preprocessing: Preprocessing | None = None, class_names: list[str] | None = None, batch_size: int = 64,
            device: str | torch.device = "cpu", num_workers: int = 0, precision: str = "fp32",
            features: bool = False) -> list[Prediction]:
    """Top-``topk`` classes and their probabilities for each image file (or each image of ``split`` of the data
    source ``data``: :func:`data_inputs`), in input order: softmax, or per-label sigmoid for a model trained with the
    sigmoid loss (``model.loss == "sigmoid"``, multi-label models); with ``features=True`` each image's pooled
    pre-logits features instead. Folders: :func:`image_files`. For results too many to hold, iterate
    :func:`iter_predictions` (and write them with :mod:`vitlab.train.predict_files`).

    ``preprocessing`` and ``class_names`` default to the model's ``preprocessing`` / ``class_names`` attributes
    (set by ``vitlab.load``), then to the paper's preprocessing for the model's input and the class indices."""
    if (images is None) == (data is None):
        raise InvalidValueError("give images (image files) or data (a data source), one of the two",
                                options=("images", "data"))
    pre = preprocessing or metadata_of(model).preprocessing
    inputs = file_inputs(images, pre) if images is not None else data_inputs(data, split, pre, data_dir=data_dir)
    return list(iter_predictions(model, inputs, topk=topk, features=features, class_names=class_names,
                                 batch_size=batch_size, num_workers=num_workers, device=device, precision=precision))
