"""Class frequencies of a training set, and the weights that even them out.

Data as people keep it is rarely balanced: a defect class with 2% of the images, a rare disease, the tail of a
species list. Two remedies, both computed here from the training labels alone (no image is read):

- **loss weights** (:func:`loss_weights`): each image's softmax loss is weighted by its class's ``w_c``
  (:func:`vitlab.train.objectives.weighted_cross_entropy`); ``balanced`` gives
  ``w_c = N / (K n_c)`` (scikit-learn's ``class_weight="balanced"``: every class weighs as much in total),
  ``sqrt`` the square root of that, both scaled so that the average image weighs 1 (``sum_c n_c w_c = N``), which
  keeps the learning rate's meaning. For multi-label data (the sigmoid loss) the weight is each label's
  ``pos_weight``: ``balanced`` is ``(N - n_c) / n_c`` (positives count as much as negatives), ``sqrt`` its root.
- **balanced sampling** (:func:`sampling_weights`): an epoch draws its ``N`` images with replacement, image ``i``
  with probability proportional to ``1 / n_{y_i}`` (``balanced``: every class equally often) or
  ``1 / sqrt(n_{y_i})`` (``sqrt``: class ``c`` in proportion to ``sqrt(n_c)``). Single-label data only.

A class without training images gets loss weight 0 and is never drawn. Sources read in order (tar shards, streams)
have no labels to count before the run and are refused.
"""

from __future__ import annotations

import torch

from ..errors import VitlabError
from .arrays import ArrayDataset
from .folder import ImageFolderDataset
from .hf_dataset import HFImageDataset

MODES = ("balanced", "sqrt")


def _stored_targets(dataset, option: str) -> list:
    """Each sample's label as stored: a class index, a tuple of class indices (multi-label), or None (no label)."""
    if isinstance(dataset, ArrayDataset):
        return dataset.labels.tolist()
    if isinstance(dataset, ImageFolderDataset):  # folders and manifests: the labels are in the sample list
        return [label for _, label in dataset.samples]
    if isinstance(dataset, HFImageDataset):
        return dataset.stored_labels()
    raise VitlabError(f"{option} needs the training labels before the run, which tar shards and streamed sources "
                      "do not give (they are read in order); use an image folder, a manifest or a random-access "
                      "Hugging Face source", options=(option,))


def class_counts(dataset, option: str = "class_weights") -> tuple[torch.Tensor, int]:
    """(images per class (K,) int64, images with a label) of a training set: for multi-label data the number of
    images that carry each label. ``option`` names the setting that asked, for the error on shards and streams."""
    num_classes = len(dataset.class_names)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    if isinstance(dataset, ArrayDataset):
        labels = dataset.labels
        return torch.bincount(labels, minlength=num_classes)[:num_classes], int(labels.numel())
    labelled = 0
    for label in _stored_targets(dataset, option):
        if label is None:
            continue
        labelled += 1
        if isinstance(label, (tuple, list)):
            counts[list(label)] += 1
        else:
            counts[label] += 1
    return counts, labelled


def sample_classes(dataset, option: str = "sampling") -> torch.Tensor:
    """Each training sample's class index, int64 (N,), -1 for a sample without a usable label (single-label data)."""
    if getattr(dataset, "multi_label", False):
        raise VitlabError(f"{option} draws images by their one class; multi-label data have several per image "
                          "(weight the loss with class_weights instead)", options=(option,))
    if isinstance(dataset, ArrayDataset):
        return dataset.labels.long()
    return torch.tensor([-1 if label is None else label for label in _stored_targets(dataset, option)],
                        dtype=torch.int64)


def _check_mode(mode: str, option: str) -> None:
    if mode not in MODES:
        raise VitlabError(f"{option} must be one of none, {', '.join(MODES)}; got {mode!r}", options=(option,))


def loss_weights(counts: torch.Tensor, total: int, mode: str, multi_label: bool = False) -> torch.Tensor:
    """The label loss's per-class weights (float32 (K,)) for class counts ``counts`` of ``total`` labelled images:
    the softmax loss's class weights, or for ``multi_label`` the sigmoid loss's ``pos_weight`` (see the module doc)."""
    _check_mode(mode, "class_weights")
    n = counts.double()
    present = n > 0
    if multi_label:
        weights = torch.where(present, (total - n) / n.clamp(min=1), torch.ones_like(n))
        return (weights.sqrt() if mode == "sqrt" else weights).float()
    weights = torch.where(present, total / (int(present.sum()) * n.clamp(min=1)), torch.zeros_like(n))
    if mode == "sqrt":
        weights = weights.sqrt()
    return (weights * total / (n * weights).sum()).float()


def sampling_weights(classes: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """Each sample's drawing weight (float64 (N,)) for balanced sampling of samples of class ``classes`` (-1: never
    drawn): ``1 / n_c`` (``balanced``) or ``1 / sqrt(n_c)`` (``sqrt``)."""
    _check_mode(mode, "sampling")
    labelled = classes >= 0
    counts = torch.bincount(classes[labelled], minlength=num_classes).double()
    per_class = 1.0 / counts.clamp(min=1)
    if mode == "sqrt":
        per_class = per_class.sqrt()
    weights = torch.zeros(classes.shape, dtype=torch.float64)
    weights[labelled] = per_class[classes[labelled]]
    return weights


def describe_counts(counts: torch.Tensor, class_names: list[str]) -> str:
    """One line: the rarest and the commonest class and the ratio between them."""
    present = counts > 0
    if not bool(present.any()):
        return "no labelled training images"
    lo = int(torch.where(present, counts, counts.max() + 1).argmin())
    hi = int(counts.argmax())
    absent = int((~present).sum())
    line = (f"rarest class {class_names[lo]!r} {int(counts[lo]):,} images, commonest {class_names[hi]!r} "
            f"{int(counts[hi]):,} (ratio {int(counts[hi]) / int(counts[lo]):.1f})")
    return line + (f"; {absent} class(es) without training images" if absent else "")
