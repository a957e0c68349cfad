"""Deployment formats: ONNX export with a dynamic batch (and, for dynamic-size ViTs, dynamic height and width), a
parity check against PyTorch, and CPU int8 inference.

int8 uses ONNX Runtime's dynamic quantization: the weights of every matrix product (the Linear layers: qkv, attention
output, MLP, head) are stored as 8-bit integers per output channel, activations are quantised per tensor (unsigned) on
the fly and the products run on integer kernels. The weights are signed (s8) or unsigned (u8), chosen for the CPU the
model is quantised on (:func:`choose_weight_type`): on x86 without VNNI (AVX2-only CPUs such as AMD Zen 3, or
AVX-512 without VNNI) ONNX Runtime multiplies u8 activations by s8 weights with ``vpmaddubsw``, whose 16-bit
intermediate sums saturate and cost accuracy (on a Zen 3, ViT-Ti/16: 73% of top-1 predictions kept, against 100%
with u8 weights); u8 x u8 products are widened to 16 bits first and do not saturate. With VNNI (``vpdpbusd``, and
AMX) u8 x s8 sums are exact and fastest. The choice is recorded in the file (:data:`INT8_KEY`) and a signed file
loaded on a CPU without VNNI warns once (:class:`OnnxModel`).

PyTorch's own ``torch.ao.quantization.quantize_dynamic`` is deprecated (it warns that it will be removed; its
successor is the separate ``torchao`` package), so vitlab does not build on it. The patch-embedding convolution stays
float32 (a small share of the compute, and the one layer that sees raw pixels).

Needs the ``onnx`` extra: ``onnx``, ``onnxscript``, ``onnxruntime``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import InvalidValueError, VitlabError
from ..models import has_tokens, metadata_of

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# the ONNX metadata entry (metadata_props) holding what the model needs at inference: its config, preprocessing,
# class names and the loss it was trained with (sigmoid: per-label probabilities), as JSON; see model_metadata
METADATA_KEY = "vitlab"
# the metadata entry of an int8 file saying how it was quantised (JSON): the weight type ("signed" / "unsigned"), what
# was asked ("auto" / ...), and the CPU it was chosen for (architecture, VNNI, the int8 feature flags seen)
INT8_KEY = "vitlab_int8"
WEIGHT_TYPES = ("auto", "signed", "unsigned")
# the x86 features that give exact (non-saturating) u8 x s8 dot products: AVX512-VNNI, AVX-VNNI (256-bit, e.g. Alder
# Lake, Zen 5 also has it), AMX int8; /proc/cpuinfo spellings
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


class Int8AccuracyWarning(UserWarning):
    """An int8 file with signed weights runs on an x86 CPU without VNNI, where its accuracy may drop."""


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
    config, the preprocessing (``model.preprocessing``, else the paper's for its input), the class names and the loss
    the head was trained with (``model.loss``: ``"sigmoid"`` for multi-label models, whose probabilities are
    per-label sigmoids; None when unknown, read as softmax)."""
    cfg, meta = model.cfg, metadata_of(model)
    pre, names = meta.preprocessing, meta.class_names
    return {"architecture": type(model).__name__, "config": cfg.to_dict(), "preprocessing": pre.to_dict(),
            "class_names": [str(n) for n in names] if names else None, "loss": meta.loss}


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


def _write_metadata(path: Path, entries: dict[str, dict]) -> None:
    """Set metadata entries (key -> JSON-able object) of the ONNX file at ``path``, replacing those keys."""
    onnx = _require("onnx")
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
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
    if not has_tokens(cfg):
        raise VitlabError(f"dynamic_size export needs a ViT; {type(model).__name__} has no dynamic_img_size")
    rh, rw = cfg.reduction
    if cfg.dynamic_img_pad:
        return {2: torch.export.Dim("height", min=rh, max=8192), 3: torch.export.Dim("width", min=rw, max=8192)}
    return {2: rh * torch.export.Dim("grid_h", min=1, max=1024), 3: rw * torch.export.Dim("grid_w", min=1, max=1024)}


def export_inputs(model: nn.Module, dynamic_size: bool | None = None
                  ) -> tuple[nn.Module, torch.Tensor, dict, dict]:
    """What every export format traces: the module (``model`` in eval mode, or wrapped to run at any size), an
    example input (2, C, H, W), the dynamic axes of that input (batch; height and width with ``dynamic_size``,
    default: the model's ``dynamic_img_size``) and the metadata the file carries (:func:`model_metadata`)."""
    model = model.eval()
    metadata = model_metadata(model)  # before any wrapping below
    example = torch.randn(2, *_input_shape(model))
    axes = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size is None:
        dynamic_size = has_tokens(model.cfg) and model.cfg.dynamic_img_size
    if dynamic_size:
        axes.update(_size_axes(model))
        metadata["config"]["dynamic_img_size"] = True  # the graph takes any size, whatever the model's default
        model = _AtAnySize(model).eval()
    return model, example, axes, metadata


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 18, dynamic_size: bool | None = None) -> Path:
    """Write ``model`` (eval mode, float32) as ONNX with a dynamic batch dimension: input ``pixel_values``
    (B, C, H, W), output ``logits`` (B, classes), and the model's config, preprocessing and class names in the
    ``vitlab`` metadata entry (:func:`read_metadata`). Written atomically (temp file + fsync + rename).

    ``dynamic_size`` (default: the model's ``dynamic_img_size``) makes height and width dynamic too (multiples of
    the patch; any size with ``dynamic_img_pad``): the graph resamples the position embedding for the input's grid."""
    _require("onnx")
    _require("onnxscript")
    path = Path(path)
    model, example, axes, metadata = export_inputs(model, dynamic_size)
    with atomic_path(path) as tmp:
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=(axes,), opset_version=opset,
                                        external_data=False, verbose=False)
        program.save(str(tmp))
        _write_metadata(tmp, {METADATA_KEY: metadata})
    return path


@lru_cache(maxsize=1)
def cpu_features() -> tuple[str, frozenset[str] | None]:
    """This machine's architecture (``platform.machine()``, lower case) and its CPU feature flags as Linux lists them
    in ``/proc/cpuinfo`` (None where they cannot be read: another OS, a restricted container)."""
    machine = platform.machine().lower()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86 / ARM spelling; the first processor's line
                    return machine, frozenset(value.split())
    except OSError:
        pass
    return machine, None


def has_vnni(flags: Iterable[str] | None) -> bool:
    """Whether a CPU with these feature flags has exact u8 x s8 int8 dot products (:data:`VNNI_FLAGS`)."""
    return bool(flags) and any(flag in VNNI_FLAGS for flag in flags)


def choose_weight_type(weights: str = "auto", machine: str | None = None,
                       flags: Iterable[str] | None = None) -> str:
    """``"signed"`` or ``"unsigned"``: the int8 weight type for ``weights`` (``auto``, ``signed`` or ``unsigned``).

    ``auto`` picks signed weights where the products are exact and fastest -- x86 with VNNI or AMX int8, and non-x86
    CPUs (ARM's int8 kernels accumulate in 32 bits) -- and unsigned weights on x86 without VNNI, or where the flags
    are unknown (None), where ONNX Runtime's u8 x s8 kernels saturate 16-bit sums. ``machine`` and ``flags``
    describe the CPU (default: this one, :func:`cpu_features`)."""
    if weights not in WEIGHT_TYPES:
        raise InvalidValueError(f"int8 weights must be one of {', '.join(WEIGHT_TYPES)}; got {weights!r}")
    if weights != "auto":
        return weights
    if machine is None:
        machine, flags = cpu_features()
    if machine.lower() not in _X86:
        return "signed"
    return "signed" if has_vnni(flags) else "unsigned"


def _cpu_record(machine: str, flags: frozenset[str] | None) -> dict:
    """What an int8 file records about the CPU its weight type was chosen for."""
    int8_flags = sorted(f for f in flags or () if f in VNNI_FLAGS or f.startswith(("avx2", "avx512f", "avx512bw")))
    return {"machine": machine, "vnni": has_vnni(flags), "flags": int8_flags if flags is not None else None}


def quantize_int8(onnx_path: str | os.PathLike, out_path: str | os.PathLike, per_channel: bool = True,
                  weights: str = "auto") -> Path:
    """Dynamic int8 quantisation of an exported model's matrix products (MatMul / Gemm) with ONNX Runtime: 8-bit
    weights (per output channel by default), per-tensor activations quantised at run time. Written atomically.

    ``weights``: ``auto`` (default; :func:`choose_weight_type` for this CPU), ``signed`` or ``unsigned``. The choice
    and this CPU's int8 features are recorded in the file's :data:`INT8_KEY` metadata entry."""
    quantization = _require("onnxruntime.quantization")
    machine, flags = cpu_features()
    chosen = choose_weight_type(weights, machine, flags)
    record = {"weights": chosen, "requested": weights, "chosen_for": _cpu_record(machine, flags)}
    qtype = quantization.QuantType.QInt8 if chosen == "signed" else quantization.QuantType.QUInt8
    out_path = Path(out_path)
    root = logging.getLogger()
    root.addFilter(_no_preprocessing_advice)
    try:
        with atomic_path(out_path) as tmp:
            quantization.quantize_dynamic(str(onnx_path), str(tmp), weight_type=qtype,
                                          per_channel=per_channel, op_types_to_quantize=["MatMul", "Gemm"])
            metadata = read_metadata(onnx_path)
            entries = {INT8_KEY: record}
            if metadata is not None:  # the quantised file carries the same metadata, marked int8
                entries[METADATA_KEY] = {**metadata, "quantization": "int8 dynamic (ONNX Runtime), MatMul / Gemm "
                                                                     f"weights {chosen}"}
            _write_metadata(tmp, entries)
    finally:
        root.removeFilter(_no_preprocessing_advice)
    return out_path


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop ONNX Runtime's "Please consider to run pre-processing before quantization" line, logged on the root
    logger at every call (a ``WARNING:root:`` line on a user's terminal): general advice, while this export
    quantises only the MatMul / Gemm weights and measures the result against float32."""
    return not record.getMessage().startswith("Please consider to run pre-processing before quantization")


def read_int8_record(custom_metadata: dict[str, str]) -> dict | None:
    """How an int8 file was quantised (:data:`INT8_KEY`), from its metadata map (key -> JSON text): None for a
    float32 file. A file quantised before the weight type was recorded had signed weights."""
    entry = custom_metadata.get(INT8_KEY)
    if entry is not None:
        try:
            record = json.loads(entry)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and record.get("weights") in ("signed", "unsigned"):
            return record
    vitlab = custom_metadata.get(METADATA_KEY)
    try:
        quantised = vitlab is not None and str(json.loads(vitlab).get("quantization", "")).startswith("int8")
    except (json.JSONDecodeError, AttributeError):
        quantised = False
    return {"weights": "signed", "requested": None, "chosen_for": None} if quantised else None


_warned: set[str] = set()


def warn_if_saturating(path: str | os.PathLike, record: dict | None, machine: str | None = None,
                       flags: Iterable[str] | None = None) -> bool:
    """Warn (:class:`Int8AccuracyWarning`, once per file and process) when an int8 file with signed weights runs on
    an x86 CPU without VNNI (default: this one); returns whether it warned."""
    if record is None or record.get("weights") != "signed":
        return False
    if machine is None:
        machine, flags = cpu_features()
    if choose_weight_type("auto", machine, flags) == "signed":
        return False
    key = str(Path(path).resolve())
    if key in _warned:
        return False
    _warned.add(key)
    seen = f"none of {' / '.join(VNNI_FLAGS)}" if flags is not None else "its CPU flags could not be read"
    warnings.warn(f"{path}: int8 with signed weights on a CPU without VNNI ({machine}, {seen}): ONNX Runtime's int8 "
                  "products saturate here and accuracy may drop; re-export on this machine (vitlab export-onnx "
                  "MODEL out.onnx --int8 out_int8.onnx) or with --int8-weights unsigned", Int8AccuracyWarning,
                  stacklevel=3)
    return True


class OnnxModel:
    """An ONNX model on ONNX Runtime's CPU provider, called like a PyTorch model: (B, C, H, W) tensor -> logits."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # how the file was quantised (None: float32); signed weights on a CPU without VNNI lose accuracy: say so
        self.int8 = read_int8_record(self.session.get_modelmeta().custom_metadata_map)
        warn_if_saturating(self.path, self.int8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


@dataclass(frozen=True)
class Parity:
    """Largest absolute difference of the logits between PyTorch and an exported model (ONNX Runtime, AOTInductor),
    per batch size tried."""

    max_abs_diff: dict[int | str, float]
    tolerance: float
    max_abs_logit: float = 0.0  # the scale of what was compared (0 means a zero head: nothing was tested)

    @property
    def ok(self) -> bool:
        return max(self.max_abs_diff.values()) <= self.tolerance


def check_parity(model: nn.Module, onnx_model: Callable[[torch.Tensor], torch.Tensor],
                 batch_sizes: tuple[int, ...] = (1, 3), tolerance: float = 1e-4, seed: int = 0,
                 sizes: tuple[tuple[int, int], ...] = ()) -> Parity:
    """Run random N(0, 1) inputs at several batch sizes (the batch axis is dynamic) through both and compare.
    ``onnx_model``: the exported model, called like a PyTorch one (:class:`OnnxModel`, a ``.pt2`` package).
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
            raise VitlabError(f"the exported model's output shape {tuple(got.shape)} differs from PyTorch's "
                              f"{tuple(expected.shape)}")
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
