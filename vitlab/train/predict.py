"""Top-k predictions for image files with a trained model.

Each image is decoded with :func:`vitlab.data.load_sample` (``.npy`` arrays and multi-band TIFFs too) and
transformed with the model's own preprocessing (the record a saved model carries); a file that cannot be read gets
its own error entry while the others are still predicted. A model trained with the sigmoid loss (``model.loss``,
recorded in the checkpoint) answers independent per-label sigmoid probabilities, others softmax probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.images import ImageLoadError, load_sample
from ..models import metadata_of
from ..preprocessing import Preprocessing


@dataclass
class Prediction:
    """The result for one input: ``top`` is a list of (class index, class name, probability), best first;
    ``error`` says why the image could not be used (then ``top`` is empty)."""

    source: str
    top: list[tuple[int, str, float]] = field(default_factory=list)
    error: str | None = None


def probabilities(logits: torch.Tensor, loss: str | None = None) -> torch.Tensor:
    """The model's probabilities from its logits (B, K): per-label sigmoid for a model trained with the sigmoid loss
    (each in [0, 1], not summing to 1), else the softmax over the classes."""
    return logits.float().sigmoid() if loss == "sigmoid" else logits.float().softmax(dim=1)


@torch.no_grad()
def predict(model: nn.Module, images: list[str | Path], *, topk: int = 5, preprocessing: Preprocessing | None = None,
            class_names: list[str] | None = None, batch_size: int = 32, device: str | torch.device = "cpu"
            ) -> list[Prediction]:
    """Top-``topk`` classes and their probabilities for each image file, in input order: softmax, or per-label
    sigmoid for a model trained with the sigmoid loss (``model.loss == "sigmoid"``, multi-label models).

    ``preprocessing`` and ``class_names`` default to the model's ``preprocessing`` / ``class_names`` attributes
    (set by ``vitlab.load``), then to the paper's preprocessing for the model's input and the class indices."""
    cfg = model.cfg
    meta = metadata_of(model)
    pre = preprocessing or meta.preprocessing
    names = class_names or meta.class_names or [str(i) for i in range(cfg.num_classes)]
    transform = pre.transform()
    device = torch.device(device)
    model = model.to(device).eval()
    results = [Prediction(str(src)) for src in images]
    ready: list[tuple[int, torch.Tensor]] = []
    for i, src in enumerate(images):
        try:
            ready.append((i, transform(load_sample(src, channels=pre.channels))))
        except (ImageLoadError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            results[i].error = str(exc) if isinstance(exc, ImageLoadError) else f"{src}: {exc.strerror or exc}"
    k = min(topk, cfg.num_classes)
    for lo in range(0, len(ready), batch_size):
        chunk = ready[lo: lo + batch_size]
        probs = probabilities(model(torch.stack([x for _, x in chunk]).to(device)), meta.loss)
        values, indices = probs.topk(k, dim=1)
        for (i, _), vals, idxs in zip(chunk, values.tolist(), indices.tolist()):
            results[i].top = [(j, names[j] if j < len(names) else str(j), v) for j, v in zip(idxs, vals)]
    return results
