"""Deployment formats: ONNX export with a dynamic batch (and, for dynamic-size ViTs, dynamic height and width), a
parity check against PyTorch, and CPU int8 inference.

int8 uses ONNX Runtime's dynamic quantization: the weights of every matrix product (the Linear layers: qkv, attention
output, MLP, head) are stored as int8 per output channel, activations are quantised per tensor on the fly and the
products run on int8 kernels (VNNI where the CPU has it). PyTorch's own ``torch.ao.quantization.quantize_dynamic`` is
deprecated (it warns that it will be removed; its successor is the separate ``torchao`` package), so vitlab does not
build on it. The patch-embedding convolution stays float32 (a small share of the compute, and the one layer that sees
raw pixels).

Needs the ``onnx`` extra: ``onnx``, ``onnxscript``, ``onnxruntime``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import VitlabError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# the ONNX metadata entry (metadata_props) holding what the model needs at inference: its config, preprocessing and
# class names, as JSON; see model_metadata / read_metadata
METADATA_KEY = "vitlab"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise VitlabError(f"{module} is not installed; install vitlab's 'onnx' extra (pip install 'vitlab[onnx]')") \
            from exc


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise VitlabError("export needs a vitlab model (with .cfg giving the input size)")
    return (cfg.in_chans, *cfg.img_size)


def model_metadata(model: nn.Module) -> dict:
    """What an exported file carries about ``model`` so that it can be used on its own: the architecture class and
    config, the preprocessing (``model.preprocessing``, else the paper's for its input) and the class names."""
    from ..preprocessing import Preprocessing

    cfg = model.cfg
    pre = getattr(model, "preprocessing", None) or Preprocessing.for_model(cfg.img_size, cfg.in_chans)
    names = getattr(model, "class_names", None)
    return {"architecture": type(model).__name__, "config": cfg.to_dict(), "preprocessing": pre.to_dict(),
            "class_names": [str(n) for n in names] if names else None}


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The vitlab metadata of an ONNX file (see :func:`model_metadata`), or None for a file exported without it."""
    onnx = _require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise VitlabError(f"{path}: not a readable ONNX file ({exc})") from exc
    entry = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        return None
    try:
        data = json.loads(entry)
    except json.JSONDecodeError as exc:
        raise VitlabError(f"{path}: the '{METADATA_KEY}' metadata entry is not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise VitlabError(f"{path}: the '{METADATA_KEY}' metadata entry is not a JSON object")
    return data


def _write_metadata(path: Path, metadata: dict) -> None:
    onnx = _require("onnx")
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    onnx.save(proto, str(path))


class _AtAnySize(nn.Module):
    """A ViT called with ``dynamic_img_size=True`` on every call (for export with dynamic height and width)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, dynamic_img_size=True)


def _size_axes(model: nn.Module) -> dict:
    """Dynamic height / width axes: multiples of the patch (any size >= one patch with ``dynamic_img_pad``)."""
    cfg = model.cfg
    if not hasattr(cfg, "dynamic_img_size"):
        raise VitlabError(f"dynamic_size export needs a ViT; {type(model).__name__} has no dynamic_img_size")
    rh, rw = cfg.reduction
    if cfg.dynamic_img_pad:
        return {2: torch.export.Dim("height", min=rh, max=8192), 3: torch.export.Dim("width", min=rw, max=8192)}
    return {2: rh * torch.export.Dim("grid_h", min=1, max=1024), 3: rw * torch.export.Dim("grid_w", min=1, max=1024)}


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 18, dynamic_size: bool | None = None) -> Path:
    """Write ``model`` (eval mode, float32) as ONNX with a dynamic batch dimension: input ``pixel_values``
    (B, C, H, W), output ``logits`` (B, classes), and the model's config, preprocessing and class names in the
    ``vitlab`` metadata entry (:func:`read_metadata`). Written atomically (temp file + fsync + rename).

    ``dynamic_size`` (default: the model's ``dynamic_img_size``) makes height and width dynamic too (multiples of
    the patch; any size with ``dynamic_img_pad``): the graph resamples the position embedding for the input's grid."""
    _require("onnx")
    _require("onnxscript")
    path = Path(path)
    model = model.eval()
    metadata = model_metadata(model)  # before any wrapping below
    shape = _input_shape(model)
    example = torch.randn(2, *shape)
    axes = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size is None:
        dynamic_size = bool(getattr(model.cfg, "dynamic_img_size", False))
    if dynamic_size:
        axes.update(_size_axes(model))
        metadata["config"]["dynamic_img_size"] = True  # the graph takes any size, whatever the model's default
        model = _AtAnySize(model).eval()
    with atomic_path(path) as tmp:
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=(axes,), opset_version=opset,
                                        external_data=False, verbose=False)
        program.save(str(tmp))
        _write_metadata(tmp, metadata)
    return path


def quantize_int8(onnx_path: str | os.PathLike, out_path: str | os.PathLike, per_channel: bool = True) -> Path:
    """Dynamic int8 quantisation of an exported model's matrix products (MatMul / Gemm) with ONNX Runtime: int8
    weights (per output channel by default), per-tensor activations quantised at run time. Written atomically."""
    quantization = _require("onnxruntime.quantization")
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        quantization.quantize_dynamic(str(onnx_path), str(tmp), weight_type=quantization.QuantType.QInt8,
                                      per_channel=per_channel, op_types_to_quantize=["MatMul", "Gemm"])
        metadata = read_metadata(onnx_path)
        if metadata is not None:  # the quantised file carries the same metadata, marked int8
            _write_metadata(tmp, {**metadata, "quantization": "int8 dynamic (ONNX Runtime), MatMul / Gemm weights"})
    return out_path


class OnnxModel:
    """An ONNX model on ONNX Runtime's CPU provider, called like a PyTorch model: (B, C, H, W) tensor -> logits."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


@dataclass(frozen=True)
class Parity:
    """Largest absolute difference of the logits between PyTorch and ONNX Runtime, per batch size tried."""

    max_abs_diff: dict[int | str, float]
    tolerance: float
    max_abs_logit: float = 0.0  # the scale of what was compared (0 means a zero head: nothing was tested)

    @property
    def ok(self) -> bool:
        return max(self.max_abs_diff.values()) <= self.tolerance


def check_parity(model: nn.Module, onnx_model: OnnxModel, batch_sizes: tuple[int, ...] = (1, 3),
                 tolerance: float = 1e-4, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ()) -> Parity:
    """Run random N(0, 1) inputs at several batch sizes (the batch axis is dynamic) through both and compare.
    ``sizes`` adds one batch at each (height, width) (a model exported with dynamic size); ``max_abs_diff`` is keyed
    by batch size, and by "HxW" for those."""
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    shape = _input_shape(model)
    runs = [(batch, (batch, *shape)) for batch in batch_sizes]
    runs += [(f"{h}x{w}", (batch_sizes[-1], shape[0], h, w)) for h, w in sizes]
    diffs = {}
    scale = 0.0
    for key, input_shape in runs:
        x = torch.randn(input_shape, generator=gen)
        with torch.no_grad():
            expected = model(x, dynamic_img_size=True) if tuple(input_shape[1:]) != shape else model(x)
        got = onnx_model(x)
        if got.shape != expected.shape:
            raise VitlabError(f"ONNX output shape {tuple(got.shape)} differs from PyTorch's {tuple(expected.shape)}")
        diffs[key] = float((got - expected).abs().max())
        scale = max(scale, float(expected.abs().max()))
    return Parity(diffs, tolerance, scale)


def prediction_agreement(reference, candidate, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Compare two classifiers on ``images`` (N, C, H, W): the share of equal top-1 predictions and the largest
    logit difference. Both are callables returning logits."""
    same = 0
    max_diff = 0.0
    ref_pred, cand_pred = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        with torch.no_grad():
            a, b = reference(x), candidate(x)
        ref_pred.append(a.argmax(1))
        cand_pred.append(b.argmax(1))
        same += int((ref_pred[-1] == cand_pred[-1]).sum())
        max_diff = max(max_diff, float((a - b).abs().max()))
    return {"agreement": same / len(images), "max_abs_logit_diff": max_diff,
            "reference_predictions": torch.cat(ref_pred), "candidate_predictions": torch.cat(cand_pred)}
