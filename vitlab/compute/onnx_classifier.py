"""An exported ONNX file used like a loaded vitlab model, so that ``vitlab predict``, ``vitlab eval`` and
``vitlab serve`` take ``.onnx`` files (for example the int8 model) with the same code as PyTorch checkpoints.

:func:`vitlab.compute.deploy.export_onnx` writes the model's config, preprocessing, class names and loss into the
file's ``vitlab`` metadata entry; :class:`OnnxClassifier` reads them back and offers what the evaluators use of a
model: ``forward`` on (B, C, H, W) tensors returning logits, ``.cfg`` (``img_size``, ``in_chans``, ``num_classes``,
...), ``.preprocessing``, ``.class_names`` and ``.loss`` (``"sigmoid"`` for a multi-label model: ``predict`` and
``serve`` then answer per-label sigmoid probabilities, as for its checkpoint). An int8 file with signed weights
warns once where this CPU would saturate them (:func:`vitlab.compute.deploy.warn_if_saturating`). It runs on ONNX
Runtime's CPU provider whatever device the inputs are on (the logits come back on the inputs' device). It has no
attention maps: attention rollout needs the PyTorch model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import VitlabError
from ..models import ModelMetadata, ViTConfig
from ..preprocessing import Preprocessing
from .deploy import METADATA_KEY, OnnxModel


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX file (by its ``.onnx`` suffix, any case)."""
    return str(path).lower().endswith(".onnx")


def _config(architecture: str, data: dict):
    """The config object of the exported model: a ``ViTConfig`` for plain ViTs, else a namespace of its fields."""

    if architecture == "VisionTransformer":
        try:
            return ViTConfig.from_dict(data)
        except (TypeError, ValueError):
            pass  # a config written by another vitlab version: fall back to the plain fields
    fields = {k: tuple(v) if k in ("img_size", "patch_size") and isinstance(v, list) else v for k, v in data.items()}
    return SimpleNamespace(**fields)


def read_exported_metadata(path: str | os.PathLike, text: str) -> SimpleNamespace:
    """The fields an exported file's ``vitlab`` metadata entry (JSON text, :func:`vitlab.compute.deploy.model_metadata`)
    gives its classifier: ``architecture``, ``cfg``, ``preprocessing``, ``class_names``, ``quantization`` (None:
    float32) and ``loss`` (``"sigmoid"``: per-label probabilities; None in files exported before it was recorded,
    read as softmax). Raises :class:`VitlabError` naming ``path`` when the entry is unreadable."""
    try:
        meta = json.loads(text)
        architecture = str(meta.get("architecture", "VisionTransformer"))
        cfg = _config(architecture, dict(meta["config"]))
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VitlabError(f"{path}: the file's vitlab metadata is unreadable ({exc})") from exc
    names = meta.get("class_names")
    loss = meta.get("loss")
    if loss not in (None, "softmax", "sigmoid"):
        raise VitlabError(f"{path}: the file's vitlab metadata names an unknown loss {loss!r} (expected 'softmax' or "
                          "'sigmoid')")
    return SimpleNamespace(architecture=architecture, cfg=cfg, preprocessing=preprocessing,
                           class_names=[str(n) for n in names] if names else None,
                           quantization=meta.get("quantization"), loss=loss)


def set_exported_metadata(classifier: nn.Module, fields: SimpleNamespace) -> None:
    """Give an exported file's classifier the fields of :func:`read_exported_metadata` as attributes: its
    ``ModelMetadata`` (preprocessing, class names, loss, read through :func:`vitlab.models.metadata_of`), and
    ``architecture``, ``cfg``, ``quantization``."""
    for name, value in vars(fields).items():
        setattr(classifier, name, value)


class OnnxClassifier(ModelMetadata, nn.Module):
    """An exported vitlab ONNX file (float32 or int8) on ONNX Runtime, with the model's config, preprocessing and
    class names from the file's metadata. ``threads``: ONNX Runtime intra-op threads (default: torch's)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise VitlabError(f"{path}: no such ONNX file")
        try:
            self.runtime = OnnxModel(path, threads=threads)
        except VitlabError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeError types
            raise VitlabError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        meta = self.runtime.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise VitlabError(f"{path}: no vitlab metadata (config, preprocessing, class names) in this ONNX file; "
                              "export it with `vitlab export-onnx`")
        set_exported_metadata(self, read_exported_metadata(path, meta))
        self.int8 = self.runtime.int8  # how an int8 file was quantised (weight type, the CPU chosen for); None: fp32
        self.path = path
        self.num_prefix_tokens = getattr(self.cfg, "num_prefix_tokens", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for preprocessed images (B, C, H, W), on the device ``x`` is on."""
        return self.runtime(x.float()).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path.name}, {self.quantization or 'float32'}"
