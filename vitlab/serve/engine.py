"""The model side of the server: a loaded model (PyTorch, ONNX Runtime int8, or a .pt2 package), its preprocessing
and class names, and the two batch operations the endpoints need: class probabilities, and probabilities with
attention rollout.

Uploaded bytes are decoded by :func:`vitlab.data.images.load_sample` (the guards training data gets: truncated files,
decompression bombs, 16-bit, CMYK, transparency, EXIF orientation; ``.npy`` arrays without pickles and multi-band
TIFFs, told apart by their first bytes, with their size checked from the header) from memory, never from a path,
and transformed with the model's own preprocessing, as ``vitlab predict`` does with files.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..compute.deploy import export_onnx, quantize_int8
from ..compute.onnx_classifier import OnnxClassifier, is_onnx_file
from ..compute.pt2 import Pt2Classifier, export_pt2, is_pt2_file
from ..data.images import declared_pixels, load_sample
from ..errors import VitlabError
from ..factory import load
from ..inspect import attention_rollout, upsample_map
from ..models import has_tokens, metadata_of
from ..preprocessing import Preprocessing
from ..train.predict import probabilities

BACKENDS = ("torch", "onnx-int8", "pt2")
HEAD_FUSIONS = ("mean", "max", "min")
OVERLAY_MIN_SIDE = 224  # overlays of small models (28 px) are scaled up to at least this for display


class _Upload(io.BytesIO):
    """Uploaded bytes as a file object; Pillow's messages show its repr, which should not be a memory address."""

    def __repr__(self) -> str:
        return "(uploaded bytes)"


@dataclass(frozen=True)
class Rollout:
    """One image's attention rollout: ``values`` (gh, gw), the share of the source token's information from each
    patch (:func:`vitlab.inspect.attention_rollout`), and the options it was computed with."""

    values: torch.Tensor
    source: str
    head_fusion: str
    discard_ratio: float


class Engine:
    """A model ready to serve: ``classify`` and ``explain`` take preprocessed images (B, C, H, W) and return
    probabilities (B, classes) as float32 on the CPU (``explain`` also rollout maps (B, gh, gw)).

    ``model`` is a vitlab model (``vitlab.load``'s result), an
    :class:`~vitlab.compute.onnx_classifier.OnnxClassifier` or a :class:`~vitlab.compute.pt2.Pt2Classifier`;
    ``name`` and ``source`` describe it on the model card.

    ``prompts`` (a :class:`vitlab.zeroshot.PromptHeads`; ``model`` is then the image tower's
    :func:`~vitlab.zeroshot.image_embedder`): zero-shot classes named per request. The batch operations then return
    unit image embeddings, and :meth:`prompt_probabilities` scores them against a request's labels;
    ``class_names`` are the labels used when a request names none (may be empty)."""

    def __init__(self, model: nn.Module, *, backend: str = "torch", device: str | torch.device = "cpu",
                 name: str | None = None, source: str | None = None, prompts=None,
                 class_names: list[str] | None = None):
        if backend not in BACKENDS:
            raise VitlabError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.device = torch.device(device) if backend != "pt2" else model.device  # a package runs where it was built
        self.model = model.to(self.device).eval() if backend == "torch" else model.eval()
        cfg = model.cfg
        self.cfg = cfg
        meta = metadata_of(model)
        self.preprocessing: Preprocessing = meta.preprocessing
        self.prompts = prompts
        if prompts is not None and backend != "torch":
            raise VitlabError("zero-shot labels named per request run on the torch backend")
        names = class_names if prompts is not None else meta.class_names
        self.class_names = [str(n) for n in names] if names else [str(i) for i in range(cfg.num_classes)]
        self.named_classes = bool(names)
        # "sigmoid": per-label probabilities (multi-label models, SigLIP's zero-shot)
        self.loss = prompts.loss if prompts is not None else meta.loss
        self.name = name or (Path(source).stem if source else type(model).__name__)
        self.source = source
        self.transform = self.preprocessing.transform()
        self.can_explain = backend == "torch" and hasattr(model, "forward_with_attention") and has_tokens(cfg)
        pool = getattr(cfg, "pool", "token")
        self.rollout_source = ("class" if pool == "token" and getattr(cfg, "class_token", False)
                               else "probe" if pool == "map" else "mean")

    # -- inputs --------------------------------------------------------------------------------------------------
    def prepare(self, data: bytes, label: str, max_pixels: int | None) -> torch.Tensor:
        """Decode uploaded bytes and apply the model's preprocessing: (C, H, W) float32. Raises
        :class:`~vitlab.data.images.ImageLoadError` (a ``VitlabError``) naming ``label`` for a bad image."""
        image = load_sample(_Upload(data), channels=self.preprocessing.channels, max_pixels=max_pixels, name=label)
        return self.transform(image)

    def pixels(self, data: bytes) -> int:
        """Width x height an upload declares in its header (nothing decoded: an image's, a ``.npy`` array's or a
        multi-band TIFF's); 0 when the header is unreadable (decoding it then fails with the reason)."""
        return declared_pixels(_Upload(data), self.preprocessing.channels)

    def input_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_chans, *self.cfg.img_size)

    # -- batch operations (run in the model thread) --------------------------------------------------------------
    def _outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities, or with per-request prompts the unit image embeddings (scored later)."""
        return logits.float().cpu() if self.prompts is not None else probabilities(logits, self.loss).cpu()

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self._outputs(self.model(images.to(self.device)))

    @torch.inference_mode()
    def explain(self, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:

        if not self.can_explain:
            raise VitlabError("attention rollout needs the PyTorch model of a ViT (serve with --backend torch)")
        probe = None
        if self.rollout_source == "probe":  # pool='map': the pooling probe's attention starts the rollout
            logits, attn, probe = self.model.forward_with_attention(images.to(self.device), return_pool_attention=True)
        else:
            logits, attn = self.model.forward_with_attention(images.to(self.device))
        maps = attention_rollout(attn, self.cfg.num_prefix_tokens, self.cfg.grid_size, head_fusion=head_fusion,
                                 discard_ratio=discard_ratio, source=self.rollout_source, probe=probe)
        return self._outputs(logits), maps.cpu()

    def run_batch(self, key: tuple, images: torch.Tensor) -> list:
        """The batcher's entry point: ``key`` is ``("classify",)`` or ``("explain", head_fusion, discard_ratio)``;
        one result per image: its probabilities, or (probabilities, Rollout)."""
        if key[0] == "classify":
            return list(self.classify(images))
        _, fusion, discard = key
        probs, maps = self.explain(images, fusion, discard)
        return [(p, Rollout(m, self.rollout_source, fusion, discard)) for p, m in zip(probs, maps)]

    # -- outputs -------------------------------------------------------------------------------------------------
    def prompt_probabilities(self, embeddings: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor]
                             ) -> torch.Tensor:
        """Unit image embeddings (B, P) scored against a zero-shot head (weight (K, P), bias (K,)): (B, K)
        probabilities."""
        weight, bias = head
        return probabilities(embeddings @ weight.t() + bias, self.loss)

    def top(self, probs: torch.Tensor, k: int, names: list[str] | None = None) -> list[dict]:
        """The ``k`` most probable classes of one image, best first, as ``vitlab predict --json`` lists them
        (``names``: the classes of this answer, default the model's)."""
        names = self.class_names if names is None else names
        values, indices = probs.topk(min(k, probs.shape[0]))
        return [{"index": int(i), "class": names[i] if i < len(names) else str(i),
                 "probability": float(v)} for v, i in zip(values.tolist(), indices.tolist())]

    def overlay_png(self, image: torch.Tensor, values: torch.Tensor) -> bytes:
        """The model's input (C, H, W; de-normalised) with the rollout map (gh, gw), upsampled and scaled to its
        maximum, blended over it in the jet colour map (as ``vitlab inspect`` draws it): PNG bytes."""
        import matplotlib


        pre = self.preprocessing
        mean = torch.tensor(pre.mean).view(-1, 1, 1)
        std = torch.tensor(pre.std).view(-1, 1, 1)
        picture = (image.float().cpu() * std + mean).clamp(0, 1)
        height, width = picture.shape[-2:]
        scale = max(1, -(-OVERLAY_MIN_SIDE // max(height, width)))
        size = (height * scale, width * scale)
        picture = torch.nn.functional.interpolate(picture[None], size=size, mode="bilinear", align_corners=False)[0]
        picture = picture.permute(1, 2, 0).clamp(0, 1).numpy()
        if picture.shape[2] != 3:  # grey, or bands with no colours of their own: their mean as grey
            picture = np.repeat(picture.mean(axis=2, keepdims=True), 3, axis=2)
        heat = upsample_map(values[None].float(), size)[0].numpy()
        blended = 0.5 * picture + 0.5 * matplotlib.colormaps["jet"](heat)[..., :3]
        out = io.BytesIO()
        Image.fromarray(np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)).save(out, format="PNG")
        return out.getvalue()

    def card(self) -> dict:
        """The model card: what the model is, what it expects, what it answers."""
        cfg = self.cfg
        config = cfg.to_dict() if hasattr(cfg, "to_dict") else {k: (list(v) if isinstance(v, tuple) else v)
                                                                  for k, v in vars(cfg).items()}
        params = sum(p.numel() for p in self.model.parameters()) if self.backend == "torch" else None
        return {
            "name": self.name,
            "architecture": getattr(self.model, "architecture", type(self.model).__name__),
            "source": Path(self.source).name if self.source else None,
            "backend": self.backend,
            "device": {"torch": str(self.device), "pt2": f"{self.device} (AOTInductor)"}.get(self.backend,
                                                                                         "cpu (ONNX Runtime)"),
            "quantization": getattr(self.model, "quantization", None),
            "token_merging": list(self.model.merge_r) if hasattr(self.model, "merge_r") else None,
            "parameters": params,
            "img_size": list(cfg.img_size),
            "patch_size": list(cfg.patch_size) if has_tokens(cfg) else None,
            "in_chans": cfg.in_chans,
            "num_classes": len(self.class_names) if self.prompts is not None else cfg.num_classes,
            "config": config,
            "preprocessing": self.preprocessing.to_dict(),
            "class_names": self.class_names if self.named_classes else None,
            "probabilities": "sigmoid" if self.loss == "sigmoid" else "softmax",
            "explain": self.can_explain,
            "rollout_source": self.rollout_source if self.can_explain else None,
            # zero-shot classes named per request: the default prompt templates (labels: the request's)
            "zero_shot": {"templates": list(self.prompts.templates)} if self.prompts is not None else None,
        }


def load_engine(source: str | os.PathLike | nn.Module, *, backend: str = "torch", device: str = "cpu",
                name: str | None = None, threads: int | None = None, workdir: str | os.PathLike | None = None
                ) -> Engine:
    """Load what ``vitlab serve`` serves: a model object, any checkpoint (or name) ``vitlab.load`` reads, or an
    ``.onnx`` file from ``vitlab export-onnx``.

    ``backend='onnx-int8'`` runs ONNX Runtime's int8 model on the CPU: an int8 ``.onnx`` file as it is; a float32
    ``.onnx`` file, a checkpoint or a model is exported and quantised first, into ``workdir`` (default: a temporary
    folder kept for the life of the process). ``backend='pt2'`` runs a ``.pt2`` package (``vitlab export --format
    pt2``) as it is, or compiles a checkpoint or model into one for ``device`` first, into ``workdir``."""

    if backend not in BACKENDS:
        raise VitlabError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    label = None if isinstance(source, nn.Module) else str(source)
    onnx_file = label is not None and is_onnx_file(label)
    if label is not None and is_pt2_file(label) and backend != "pt2":
        raise VitlabError(f"{label}: a .pt2 package needs --backend pt2")
    if backend == "pt2":
        if onnx_file:
            raise VitlabError(f"{label}: an ONNX file needs --backend onnx-int8")
        if threads:
            torch.set_num_threads(threads)
        if label is not None and is_pt2_file(label):
            return Engine(Pt2Classifier(label), backend=backend, name=name, source=label)

        torch_model = source if isinstance(source, nn.Module) else load(source)
        folder = Path(workdir) if workdir is not None else Path(_scratch_dir())
        package = export_pt2(torch_model.eval(), folder / "model.pt2", device=device)
        return Engine(Pt2Classifier(package), backend=backend, name=name or _stem(label), source=label)
    if backend == "torch":
        if onnx_file:
            raise VitlabError(f"{label}: an ONNX file needs --backend onnx-int8")
        if isinstance(source, nn.Module):
            model = source
        else:

            model = load(source)
        if threads:
            torch.set_num_threads(threads)
        return Engine(model, backend=backend, device=device, name=name, source=label)
    if torch.device(device).type != "cpu":
        raise VitlabError(f"--backend onnx-int8 runs on the CPU (ONNX Runtime); drop --device {device}")
    if onnx_file:
        model = OnnxClassifier(label, threads=threads)
        if model.quantization is not None:
            return Engine(model, backend=backend, name=name, source=label)
        fp32_path = Path(label)
    else:
        fp32_path = None

    folder = Path(workdir) if workdir is not None else Path(_scratch_dir())
    if fp32_path is None:

        torch_model = source if isinstance(source, nn.Module) else load(source)
        fp32_path = export_onnx(torch_model.cpu().eval(), folder / "model.onnx")
    int8_path = quantize_int8(fp32_path, folder / "model_int8.onnx")
    return Engine(OnnxClassifier(int8_path, threads=threads), backend=backend, name=name or _stem(label), source=label)


def _stem(label: str | None) -> str | None:
    return Path(label).stem if label else None


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def _scratch_dir() -> str:
    """A temporary folder removed at interpreter exit (holds the int8 model built at start-up)."""
    folder = tempfile.TemporaryDirectory(prefix="vitlab-serve-")
    _SCRATCH.append(folder)
    return folder.name
