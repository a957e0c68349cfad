"""Do a checkpoint's classes and a data set's classes agree? And if they only share some, evaluate on those.

:func:`check_classes` refuses a data set whose class count differs from the checkpoint's, or whose class names differ
from the names the checkpoint carries (an accuracy measured against the wrong labels means nothing).
:func:`match_classes_by_name` pairs the data's classes with the checkpoint's by name; :func:`restrict_to_matched`
keeps the images of the matched classes, numbered in the data's order, and :class:`SelectLogits` gives the model's
logits for those classes in that order, so every metric is computed over the shared classes only.

Names match when they are equal after lower-casing and treating ``_``, ``-`` and runs of spaces as one space, or when
the data's name is one of the checkpoint name's comma-separated synonyms (ImageNet's ``"tench, Tinca tinca"`` matches
a folder ``tench``). A checkpoint named with a shipped ImageNet label set also matches folders named by WordNet id
(``n01440764``), the layout of the ImageNet release. A data class that fits several checkpoint classes is left out
as ambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, Subset

from ..errors import VitlabError
from ..labels import LABEL_SETS, class_names, wordnet_ids


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def _shown(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(repr(x) for x in names[:n]) + (", ..." if len(names) > n else "")


def wordnet_ids_of(model_names: Sequence[str] | None) -> list[str] | None:
    """The WordNet ids of a checkpoint's classes when its names are one of the shipped ImageNet label sets (so an
    ImageNet folder laid out by WordNet id, ``n01440764/...``, is recognised as the same classes), else None."""
    if not model_names:
        return None

    sizes = {"imagenet-1k": 1000, "imagenet-21k": 21843}
    for label_set in LABEL_SETS:
        if sizes.get(label_set) == len(model_names) and class_names(label_set) == list(model_names):
            return wordnet_ids(label_set)
    return None


def check_classes(model_classes: int, model_names: Sequence[str] | None, data_names: Sequence[str] | None,
                  checkpoint: str, data: str) -> None:
    """Raise :class:`VitlabError` (one line) when the data's classes cannot be the checkpoint's: a different number
    of classes, or class names that differ from those the checkpoint carries. Unnamed data pass (their labels are
    checked against the number of outputs when evaluated)."""
    # vitlab.tasks.eval_checkpoint's argument (vitlab eval spells it as its flag)
    hint = "; map_classes_by_name=True evaluates on the classes both name" if model_names and data_names else ""
    if data_names is None:
        return
    if len(data_names) != model_classes:
        raise VitlabError(f"{checkpoint} predicts {model_classes} classes but {data} has {len(data_names)} "
                          f"({_shown(data_names)}): the accuracy would be meaningless{hint}",
                          options=("map_classes_by_name",))
    if model_names and list(model_names) != list(data_names) and wordnet_ids_of(model_names) != list(data_names):
        differ = [i for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b]
        i = differ[0]
        raise VitlabError(f"{checkpoint} and {data} name their classes differently ({len(differ)} of "
                          f"{model_classes} differ; class {i} is {model_names[i]!r} in the checkpoint, "
                          f"{data_names[i]!r} in the data){hint}", options=("map_classes_by_name",))


@dataclass
class ClassMatch:
    """The data classes found among the checkpoint's, in the data's order."""

    names: list[str]                 # the matched data classes' names
    data_labels: list[int]           # their labels in the data set
    model_indices: list[int]         # the checkpoint output that predicts each
    data_classes: int                # classes in the data set
    model_classes: int               # outputs of the checkpoint
    unmatched: list[str] = field(default_factory=list)   # data classes the checkpoint does not name
    ambiguous: list[str] = field(default_factory=list)   # data classes that fit several checkpoint classes
    images_left_out: int | None = None                   # images of unmatched classes (None: not counted)

    def summary(self) -> dict:
        return {"matched": len(self.names), "data_classes": self.data_classes, "model_classes": self.model_classes,
                "unmatched": self.unmatched, "ambiguous": self.ambiguous, "images_left_out": self.images_left_out}


def match_classes_by_name(model_names: Sequence[str] | None, data_names: Sequence[str] | None, checkpoint: str,
                          data: str) -> ClassMatch:
    """Pair every data class with the checkpoint class of the same name (see the module docstring). Raises
    :class:`VitlabError` when either side has no names or no class matches."""
    if not model_names:
        raise VitlabError(f"{checkpoint}: carries no class names, so its classes cannot be matched by name")
    if not data_names:
        raise VitlabError(f"{data}: the data do not name their classes, so they cannot be matched by name")
    full: dict[str, list[int]] = {}
    synonyms: dict[str, list[int]] = {}
    for index, wnid in enumerate(wordnet_ids_of(model_names) or []):
        full.setdefault(_norm(wnid), []).append(index)
    for index, name in enumerate(model_names):
        full.setdefault(_norm(name), []).append(index)
        for part in str(name).split(","):
            if part.strip():
                synonyms.setdefault(_norm(part), []).append(index)
    match = ClassMatch([], [], [], len(data_names), len(model_names))
    for label, name in enumerate(data_names):
        key = _norm(name)
        found = full.get(key) or sorted(set(synonyms.get(key, [])))
        if len(found) == 1:
            match.names.append(str(name))
            match.data_labels.append(label)
            match.model_indices.append(found[0])
        elif found:
            match.ambiguous.append(str(name))
        else:
            match.unmatched.append(str(name))
    if not match.names:
        raise VitlabError(f"no class of {data} ({_shown(list(data_names))}) is named by {checkpoint} "
                          f"({_shown(list(model_names))})")
    return match


class _Relabelled(Dataset):
    """A map-style data set with labels renumbered (``mapping[old] = new``)."""

    def __init__(self, dataset: Dataset, mapping: dict[int, int]):
        self.dataset, self.mapping = dataset, mapping
        self.class_names = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return image, self.mapping[int(label)]


class _FilteredStream(IterableDataset):
    """A stream of samples keeping the matched classes, renumbered."""

    def __init__(self, dataset: IterableDataset, mapping: dict[int, int], names: list[str]):
        self.dataset, self.mapping, self.class_names = dataset, mapping, names

    def __iter__(self):
        for item in self.dataset:
            label = int(item[1])
            if label in self.mapping:
                yield item[0], self.mapping[label]


def _labels_of(dataset: Dataset) -> list[int] | None:
    """Every sample's label without decoding images (in-memory sets, image folders), or None."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels.tolist()
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        return [int(s[1]) for s in samples]
    return None


def restrict_to_matched(dataset: Dataset, match: ClassMatch) -> tuple[Dataset, int | None]:
    """The samples of the matched classes with labels 0..K-1 in the data's order, and how many samples were left
    out (None for a stream, where it is not known in advance)."""
    mapping = {old: new for new, old in enumerate(match.data_labels)}
    if isinstance(dataset, IterableDataset):
        return _FilteredStream(dataset, mapping, list(match.names)), None
    labels = _labels_of(dataset)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    keep = [i for i, y in enumerate(labels) if y in mapping]
    relabelled = _Relabelled(dataset, mapping)
    relabelled.class_names = list(match.names)
    view = Subset(relabelled, keep)
    view.class_names = list(match.names)  # type: ignore[attr-defined]
    return view, len(labels) - len(keep)


class SelectLogits(nn.Module):
    """A classifier whose outputs are ``model``'s logits at ``indices`` (B, len(indices)), in that order."""

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices.to(x.device))
