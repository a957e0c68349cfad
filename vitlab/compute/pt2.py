"""The PyTorch-native deployment format: a model compiled ahead of time into a ``.pt2`` package.

:func:`export_pt2` traces the model with ``torch.export`` (dynamic batch; dynamic height and width for dynamic-size
ViTs, the position embedding resampled in the graph, as for ONNX) and compiles the program with AOTInductor into one
zip file holding a shared library (the weights inside it) for the CPU, or for a CUDA GPU where one is used. The
model's config, preprocessing and class names travel in the package's AOTInductor metadata under the key ``vitlab``
(JSON text), so that the file is usable on its own: plain PyTorch loads and runs it without vitlab installed::

    import json, torch
    package = torch._inductor.aoti_load_package("model.pt2")
    logits = package(pixels)                                 # (B, C, H, W) float32 -> (B, classes)
    meta = json.loads(package.get_metadata()["vitlab"])      # config, preprocessing, class_names

:class:`Pt2Classifier` is the package used like a loaded vitlab model, so that ``vitlab predict``, ``vitlab eval``
and ``vitlab serve --backend pt2`` take ``.pt2`` files; :func:`load_exported` opens either exported format.

A package runs only with the PyTorch version (and on the CPU instruction set / GPU kind) it was compiled for: the
version is recorded in the metadata and named when loading fails. ``torch.jit.script`` (TorchScript) is not
supported: scripting needs the models written in TorchScript's subset of Python, and TorchScript is deprecated in
favour of ``torch.export``, which this format is built on.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import VitlabError
from ..models import ModelMetadata
from .deploy import METADATA_KEY, export_inputs
from .onnx_classifier import OnnxClassifier, is_onnx_file, read_exported_metadata, set_exported_metadata

FORMAT = "pt2"


def is_pt2_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a ``.pt2`` package (by its suffix, any case)."""
    return str(path).lower().endswith(".pt2")


def is_exported_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (``.onnx`` or ``.pt2``) rather than a checkpoint."""
    return is_onnx_file(path) or is_pt2_file(path)


def export_pt2(model: nn.Module, path: str | os.PathLike, dynamic_size: bool | None = None,
               device: str | torch.device = "cpu") -> Path:
    """Compile ``model`` (eval mode, float32) with ``torch.export`` + AOTInductor into the package ``path``
    (``.pt2``) for ``device`` (``cpu``, or a CUDA device: needs the CUDA toolkit's compiler). Input: (B, C, H, W)
    float32 on that device with a dynamic batch; ``dynamic_size`` (default: the model's ``dynamic_img_size``) makes
    height and width dynamic too. The model's config, preprocessing and class names go into the package's
    metadata. ``model`` itself is not moved. Written atomically; compiling takes tens of seconds (a C++ compiler
    builds the kernels)."""
    path = Path(path)
    if not is_pt2_file(path):
        raise VitlabError(f"{path}: a PyTorch package's name must end in .pt2")
    device = torch.device(device)
    traced, example, axes, metadata = export_inputs(model, dynamic_size)
    if device != example.device:
        traced = copy.deepcopy(traced).to(device)
    metadata["format"] = {"name": FORMAT, "device": device.type, "torch": torch.__version__,
                          "dynamic_size": len(axes) > 1}
    with torch.no_grad():
        program = torch.export.export(traced, (example.to(device),), dynamic_shapes=(axes,))
    configs = {"aot_inductor.metadata": {METADATA_KEY: json.dumps(metadata)}}
    with atomic_path(path) as tmp, open(tmp, "w+b") as out:  # AOTInductor takes a file object or a *.pt2 name
        torch._inductor.aoti_compile_and_package(program, package_path=out, inductor_configs=configs)
    return path


def _check_archive(path: Path) -> None:
    """Refuse a file that is not a zip archive holding an AOTInductor model, in one line (PyTorch's loader logs
    warnings of its own before failing on those)."""
    if not zipfile.is_zipfile(path):
        raise VitlabError(f"{path}: not a .pt2 package (packages are zip archives)")
    with zipfile.ZipFile(path) as archive:
        if not any("/data/aotinductor/" in name for name in archive.namelist()):
            raise VitlabError(f"{path}: a zip archive with no AOTInductor model inside; export one with "
                              "`vitlab export MODEL model.pt2`")


class Pt2Classifier(ModelMetadata, nn.Module):
    """A ``.pt2`` package from :func:`export_pt2` on AOTInductor's runtime, with the model's config, preprocessing
    and class names from its metadata. Takes inputs on any device (they are moved to the package's device) and
    returns the logits on the inputs' device."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise VitlabError(f"{path}: no such .pt2 file")
        _check_archive(path)
        try:
            self.package = torch._inductor.aoti_load_package(str(path))
            entries = self.package.get_metadata()
        except Exception as exc:  # not a zip, no compiled model inside, a package for a device not here, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise VitlabError(f"{path}: PyTorch {torch.__version__} cannot load this .pt2 package ({first}); "
                              "packages run with the PyTorch version and device kind they were exported for") \
                from exc
        meta = entries.get(METADATA_KEY)
        if meta is None:
            raise VitlabError(f"{path}: no vitlab metadata (config, preprocessing, class names) in this .pt2 "
                              "package; export it with `vitlab export --format pt2`")
        set_exported_metadata(self, read_exported_metadata(path, meta))
        self.format = json.loads(meta).get("format") or {}
        self.device = torch.device(entries.get("AOTI_DEVICE_KEY") or "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.path = path
        self.num_prefix_tokens = getattr(self.cfg, "num_prefix_tokens", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for preprocessed images (B, C, H, W), on the device ``x`` is on."""
        logits = self.package(x.to(self.device, torch.float32).contiguous())
        if isinstance(logits, (list, tuple)):  # some runtimes hand back the flat list of outputs
            logits = logits[0]
        return logits.to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path.name}, AOTInductor on {self.device}"


def load_exported(path: str | os.PathLike, threads: int | None = None) -> nn.Module:
    """An exported file as a classifier: an ``.onnx`` file on ONNX Runtime (``threads``: its intra-op threads) or a
    ``.pt2`` package on AOTInductor. Raises :class:`VitlabError` for any other name."""
    if is_onnx_file(path):
        return OnnxClassifier(path, threads=threads)
    if is_pt2_file(path):
        return Pt2Classifier(path)
    raise VitlabError(f"{path}: not an exported model (.onnx or .pt2)")
