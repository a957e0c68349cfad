"""vitlab's own checkpoint format: one ``.safetensors`` file that describes itself.

The tensors are the model's state dict (vitlab names). The safetensors ``__metadata__`` holds one entry, ``vitlab``,
a JSON document::

    {"format": "vitlab", "format_version": 1, "architecture": "vit",
     "config": ViTConfig.to_dict(), "preprocessing": Preprocessing.to_dict(),
     "class_names": [...] or null, "metadata": {...free, JSON-serialisable...}}

so that :func:`load_vitlab` rebuilds the model and its preprocessing from the file alone. Files are written
atomically (temporary file in the same folder, fsync, rename): an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..atomic import write_atomic
from ..errors import InvalidValueError, VitlabError
from ..models import FAMILIES, ModelFamily, family_of
from ..preprocessing import Preprocessing
from .files import write_safetensors

FORMAT_NAME = "vitlab"
FORMAT_VERSION = 1
METADATA_KEY = "vitlab"


def family_of_model(model: nn.Module) -> ModelFamily:
    """The model family (:data:`vitlab.models.FAMILIES`) whose model class is exactly ``type(model)``."""
    family = family_of(model)
    if family is None or type(model) is not family.model_class:
        raise VitlabError(f"cannot save a {type(model).__name__}: not a vitlab model family (add it with "
                          "vitlab.models.register_family)")
    return family


def unwrap_module(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``) and DDP / DataParallel (``module``) wrappers."""
    for _ in range(4):
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def save(model: nn.Module, path: str | os.PathLike, *, preprocessing: Preprocessing | None = None,
         class_names: list[str] | None = None, metadata: dict | None = None) -> Path:
    """Write ``model`` as one self-describing ``.safetensors`` file at ``path`` (atomically) and return the path.

    ``preprocessing`` defaults to ``model.preprocessing`` if set, else the paper's evaluation preprocessing for the
    model's input (squash, bilinear, [-1, 1]); ``class_names`` defaults to ``model.class_names`` if set. ``metadata``
    is any JSON-serialisable dict (training info, dataset, accuracy)."""
    model = unwrap_module(model)
    arch = family_of_model(model)
    cfg = model.cfg
    if preprocessing is None:
        preprocessing = getattr(model, "preprocessing", None) or Preprocessing.for_model(cfg.img_size, cfg.in_chans)
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a vitlab.Preprocessing, got {type(preprocessing).__name__}")
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != cfg.num_classes:
            raise InvalidValueError(f"{len(class_names)} class names for a model with {cfg.num_classes} classes")
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": arch.name,
        "config": cfg.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "class_names": class_names,
        "metadata": metadata or {},
    }
    text = dump_document(document)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidValueError(f"{path}: vitlab checkpoints are .safetensors files; use a name ending in .safetensors")
    return write_atomic(path, lambda tmp: write_safetensors(tensors, tmp, {METADATA_KEY: text}))


def read_document(metadata: dict[str, str], source: str) -> dict | None:
    """The vitlab JSON document from a safetensors ``__metadata__``, or None if it is not a vitlab file."""
    return load_document(metadata, METADATA_KEY, FORMAT_NAME, FORMAT_VERSION, "vitlab", "vitlab checkpoint",
                         source)


def dump_document(document: dict) -> str:
    """A vitlab file's JSON document as the text of its safetensors ``__metadata__`` entry."""
    try:
        return json.dumps(document)
    except TypeError as exc:
        raise InvalidValueError(f"metadata must be JSON-serialisable: {exc}") from None


def load_document(metadata: dict[str, str], key: str, fmt: str, version: int, name: str, what: str,
                  source: str) -> dict | None:
    """The JSON document under ``key`` of a safetensors ``__metadata__`` whose ``format`` is ``fmt`` and whose
    ``format_version`` is at most ``version`` (``name`` / ``what`` name it in errors); None without ``key``."""
    if key not in metadata:
        return None
    try:
        document = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise VitlabError(f"{source}: the {name} metadata is not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise VitlabError(f"{source}: the '{key}' metadata entry is not a {what} description")
    found = document.get("format_version")
    if not isinstance(found, int) or found > version:
        raise VitlabError(f"{source}: {what} format version {found!r}; this vitlab reads up to {version} "
                          "(upgrade vitlab)")
    return document


def parse_document(document: dict, source: str) -> tuple[ModelFamily, object, Preprocessing, list[str] | None, dict]:
    """(model family, config, preprocessing, class names, metadata) from a vitlab document, with clear errors."""
    arch_name = document.get("architecture", "vit")
    if arch_name not in FAMILIES:
        raise VitlabError(f"{source}: architecture {arch_name!r} is not known to this vitlab "
                          f"(known: {', '.join(FAMILIES)})")
    arch = FAMILIES[arch_name]
    try:
        config = arch.config_class.from_dict(document["config"])
        preprocessing = Preprocessing.from_dict(document["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VitlabError(f"{source}: invalid vitlab config ({exc})") from None
    class_names = document.get("class_names")
    if class_names is not None and (not isinstance(class_names, list) or len(class_names) != config.num_classes):
        raise VitlabError(f"{source}: {len(class_names) if isinstance(class_names, list) else '?'} class names for "
                          f"{config.num_classes} classes")
    return arch, config, preprocessing, class_names, dict(document.get("metadata") or {})
