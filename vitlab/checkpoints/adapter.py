"""LoRA / DoRA adapter files: the trained adapter alone, tied to its base checkpoint by name and sha256.

An adapter file is a ``.safetensors`` file whose tensors are the adapter parameters (``blocks.0.attn.qkv.lora_A.
default.weight``, ...) and the other parameters the run trained (a new head, norms), under the adapted model's names;
its ``__metadata__`` holds one entry, ``vitlab_adapter``, a JSON document::

    {"format": "vitlab-adapter", "format_version": 1, "method": "lora" | "dora",
     "lora": LoraSettings.to_dict(), "base": {"name": ..., "path": ..., "sha256": ...},
     "architecture": "vit", "config": the adapted model's ViTConfig,
     "preprocessing": ..., "class_names": [...] or null, "metadata": {...}}

``base.name`` is what the run started from as it was given (a catalog name, an ``hf-hub:`` name or a path),
``base.path`` its absolute path when it was a file, ``base.sha256`` the hash of the file (of a Hugging Face folder:
of its files). Reading one (:func:`vitlab.checkpoints.read_checkpoint`, so ``vitlab.load`` and every command) finds
the base, refuses a base whose hash differs, rebuilds the adapted model and merges the adapter.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..atomic import write_atomic
from ..errors import InvalidValueError, VitlabError
from ..models.lora import LoraSettings, adapter_names
from ..preprocessing import Preprocessing
from .files import sniff, write_safetensors
from .vitlab_format import dump_document, family_of_model, load_document, unwrap_module

ADAPTER_KEY = "vitlab_adapter"
ADAPTER_FORMAT = "vitlab-adapter"
ADAPTER_VERSION = 1
# the files of a Hugging Face model folder that a reader uses (and so what its hash covers)
_FOLDER_SUFFIXES = (".safetensors", ".bin", ".json")


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file, or of a Hugging Face folder (its weight and JSON files in name order, each as
    name and file hash). Cached per (file, size, modification time, inode) within a process."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_FOLDER_SUFFIXES)):
            digest.update(f"{item.name}\0{checkpoint_sha256(item)}\n".encode())
        return digest.hexdigest()
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def base_record(name: str, path: str | os.PathLike) -> dict:
    """What an adapter file records of its base: the name it was given, the file it resolved to, its sha256."""
    return {"name": str(name), "path": str(Path(path).resolve()), "sha256": checkpoint_sha256(path)}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, base: dict, trained: list[str],
                 preprocessing: Preprocessing | None = None,
                 class_names: list[str] | None = None, metadata: dict | None = None) -> Path:
    """Write the adapter of ``model`` (a model adapted by :func:`vitlab.models.lora.add_lora`) and the parameters
    named in ``trained`` (other than the adapters: e.g. a new head) to ``path`` (``.safetensors``, atomically).
    ``base``: :func:`base_record` of the checkpoint the adapters were trained on; the rest as :func:`vitlab.save`.
    The adapted model's config is recorded: a reader loads the base at its resolution, channels and class count
    (a new head, pre-logits dropped when the config has none), as a fine-tuning run does."""
    model = unwrap_module(model)
    settings = getattr(model, "lora_settings", None)
    if settings is None:
        raise InvalidValueError(f"{path}: the model has no LoRA adapters to save (vitlab.models.lora.add_lora)")
    arch = family_of_model(model)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidValueError(f"{path}: adapter files are .safetensors files; use a name ending in .safetensors")
    state = model.state_dict()
    names = adapter_names(model) + [n for n in trained if n not in adapter_names(model)]
    missing = [n for n in names if n not in state]
    if missing:
        raise InvalidValueError(f"{path}: no parameter {', '.join(missing[:5])} in the model")
    cfg = model.cfg
    if preprocessing is None:
        preprocessing = getattr(model, "preprocessing", None) or Preprocessing.for_model(cfg.img_size, cfg.in_chans)
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    document = {
        "format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, "method": "dora" if settings.dora else "lora",
        "lora": settings.to_dict(), "base": dict(base), "architecture": arch.name, "config": cfg.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "class_names": [str(c) for c in class_names] if class_names is not None else None,
        "metadata": metadata or {},
    }
    text = dump_document(document)
    tensors = {k: state[k].detach().to("cpu").contiguous().clone() for k in names}
    return write_atomic(path, lambda tmp: write_safetensors(tensors, tmp, {ADAPTER_KEY: text}))


def read_adapter_document(metadata: dict[str, str], source: str) -> dict | None:
    """The adapter document of a safetensors ``__metadata__``, or None when the file is not an adapter file."""
    document = load_document(metadata, ADAPTER_KEY, ADAPTER_FORMAT, ADAPTER_VERSION, "adapter", "vitlab adapter",
                             source)
    if document is None:
        return None
    base = document.get("base")
    if not isinstance(base, dict) or not base.get("name") or not base.get("sha256"):
        raise VitlabError(f"{source}: the adapter names no base checkpoint (base.name and base.sha256)")
    document["lora"] = LoraSettings.from_dict(document.get("lora") or {})
    return document


def adapter_document(path: str | os.PathLike) -> dict | None:
    """The adapter document of ``path`` (its header alone is read), or None when it is not an adapter file."""
    try:
        if sniff(path) != "safetensors":
            return None
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (VitlabError, OSError, SafetensorError):  # not readable as safetensors: the file readers say why
        return None
    return read_adapter_document(metadata, str(path))


def is_adapter_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a vitlab adapter file (a safetensors file with the adapter metadata entry)."""
    return adapter_document(path) is not None


def base_candidates(document: dict, source: str, base: str | os.PathLike | None = None) -> list[str]:
    """Where to look for an adapter's base, in order: ``base`` when given; else the recorded name (a catalog or hub
    name, or a path as given), the recorded absolute path, and the recorded file's name next to the adapter."""
    if base is not None:
        return [os.fspath(base)]
    record = document["base"]
    out = [record["name"]]
    if record.get("path"):
        out.append(record["path"])
        out.append(str(Path(source).resolve().parent / Path(record["path"]).name))
    return list(dict.fromkeys(out))


def check_base_hash(document: dict, source: str, base_path: str | os.PathLike) -> None:
    """Refuse (one line naming both) a base whose sha256 is not the one the adapter was trained on."""
    want = document["base"]["sha256"]
    have = checkpoint_sha256(base_path)
    if have != want:
        raise VitlabError(f"{source}: the adapter was trained on {document['base']['name']} (sha256 {want}), but "
                          f"{base_path} has sha256 {have}; give the base it was trained on")


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy an adapter file's tensors into an adapted ``model``; every adapter parameter must be in the file, and
    every tensor of the file must fit a parameter."""
    own = model.state_dict()
    missing = [n for n in adapter_names(model) if n not in tensors]
    unexpected = [n for n in tensors if n not in own]
    wrong = [f"{n} {tuple(t.shape)} vs model {tuple(own[n].shape)}" for n, t in tensors.items()
             if n in own and t.shape != own[n].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:10])}" for label, items in
                 (("missing adapter tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong))
                 if items]
        raise VitlabError(f"{source}: the adapter does not fit its base; " + "; ".join(parts))
    model.load_state_dict({**own, **tensors}, strict=True)
