"""Reading the CIFAR-10 / CIFAR-100 "python version" batches without running pickled code.

The batches are Python pickles: a dict with a uint8 ``data`` array (N, 3072), the labels and some strings. Plain
``pickle.load`` (which torchvision's ``CIFAR10`` class uses) would execute whatever a tampered file asks for. Here a
restricted unpickler resolves only the few globals a genuine batch needs to rebuild a numpy array
(``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``; ``numpy._core`` on numpy 2; and
``_codecs.encode``, which Python 3 uses for bytes in protocol-2 pickles) and refuses
everything else, and the result is checked to be a dict of the expected keys with a uint8 array.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import VitlabError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes (str -> bytes, no side effects)
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches contain only numpy arrays")
        # numpy 2 moved numpy.core to numpy._core; both spellings name the same function
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_cifar_pickle(path: str | Path) -> dict:
    """Load one CIFAR batch or meta file with the restricted unpickler; keys are decoded to ``str``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise VitlabError(f"{path}: not a CIFAR batch file ({exc})") from exc
    if not isinstance(obj, dict):
        raise VitlabError(f"{path}: not a CIFAR batch file (holds a {type(obj).__name__}, expected a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _decode_names(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_cifar_batches(files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    images, labels = [], []
    for path in files:
        batch = read_cifar_pickle(path)
        data, lab = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise VitlabError(f"{path}: 'data' is not a uint8 array of shape (N, 3072)")
        lab = np.asarray(lab, dtype=np.int64)
        if lab.shape != (data.shape[0],):
            raise VitlabError(f"{path}: {label_key!r} has {lab.size} entries for {data.shape[0]} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(root: Path, variant: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and class names of CIFAR-10 (``variant='cifar10'``) or CIFAR-100 (fine labels) from the
    extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder ``root``."""
    if variant == "cifar10":
        files = [root / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [root / "test_batch"]
        meta, names_key, label_key = root / "batches.meta", "label_names", "labels"
    else:
        files = [root / ("train" if split == "train" else "test")]
        meta, names_key, label_key = root / "meta", "fine_label_names", "fine_labels"
    missing = [p.name for p in files + [meta] if not p.is_file()]
    if missing:
        raise VitlabError(f"{root}: incomplete {variant} folder, missing {', '.join(missing)}")
    images, labels = read_cifar_batches(files, label_key)
    names = _decode_names(read_cifar_pickle(meta).get(names_key, []))
    return images, labels, names
