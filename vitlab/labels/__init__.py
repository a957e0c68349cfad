"""Class names of the label sets pre-trained checkpoints use, shipped with the package.

- ``imagenet-1k``: the 1,000 ILSVRC-2012 classes in the usual order (sorted WordNet ids), with torchvision's short
  names (``tench``, ``goldfish``, ...), the order every ImageNet-1k head uses.
- ``imagenet-21k``: the 21,843 classes of the ImageNet-21k (fall 2011) release in Google's order, the order of the
  heads of the paper's and AugReg's ImageNet-21k checkpoints, named by their WordNet lemmas.

Each file has one ``wordnet_id<TAB>name`` line per class index.
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources

from ..errors import UnknownNameError

_FILES = {"imagenet-1k": "imagenet1k.tsv", "imagenet-21k": "imagenet21k.tsv.gz"}
LABEL_SETS = tuple(_FILES)


@cache
def _rows(label_set: str) -> tuple[tuple[str, str], ...]:
    if label_set not in _FILES:
        raise UnknownNameError(f"unknown label set {label_set!r}; expected one of {', '.join(_FILES)}")
    data = resources.files(__name__).joinpath(_FILES[label_set]).read_bytes()
    if _FILES[label_set].endswith(".gz"):
        data = gzip.decompress(data)
    return tuple(tuple(line.split("\t", 1)) for line in data.decode("utf-8").splitlines() if line)


def class_names(label_set: str) -> list[str]:
    """The class names of ``label_set`` (``imagenet-1k`` or ``imagenet-21k``), indexed as the heads are."""
    return [name for _, name in _rows(label_set)]


def wordnet_ids(label_set: str) -> list[str]:
    """The WordNet ids (``n01440764``, ...) of ``label_set``, indexed as the heads are."""
    return [wnid for wnid, _ in _rows(label_set)]


def same_classes(names: list[str] | tuple[str, ...], other: list[str] | tuple[str, ...]) -> bool:
    """Whether two class lists name the same classes in the same order: equal, or one a shipped label set's names
    and the other its WordNet ids (an ImageNet folder of ``n01440764/``... against a checkpoint's ``tench``...)."""
    names, other = list(names), list(other)
    if names == other:
        return True
    for label_set in LABEL_SETS:
        if len(names) != len(_rows(label_set)):
            continue
        pair = (class_names(label_set), wordnet_ids(label_set))
        if (names, other) in (pair, pair[::-1]):
            return True
    return False
