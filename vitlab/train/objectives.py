"""Training objectives: what the loop trains for, behind one small interface.

The loop never asks which objective it runs. An objective says

- ``check(config)``: refuse settings it does not support (before anything is built);
- ``wrap(model, preprocessing)``: the module to train around the freshly built model;
- ``transform(images, targets)``: what a training batch becomes before the forward (mixup / cutmix);
- ``loss(output, targets)``: the training loss from the module's output;
- ``evaluate(module, batches, device, precision=..., on_skipped=...)``: evaluation metrics over this process's
  evaluation batches, summed over processes, with ``top1`` for choosing the best checkpoint;
- ``export(module)``: the model saved at the end, and ``saves_class_names``: whether its head predicts the data's
  classes (then their names go into the saved file).

:class:`Classification` is the default; masked patch prediction (:class:`vitlab.selfsup.MaskedPatchObjective`) is
another.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from ..evaluate.classification import SUMMARY_KEYS, evaluate_classifier
from ..preprocessing import Preprocessing
from .config import TrainConfig


def batch_mixer(config: TrainConfig, num_classes: int):
    """torchvision's batch MixUp / CutMix (one of them per batch when both are on), or None."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    from torchvision.transforms import v2 as T

    options = []
    if config.mixup > 0:
        options.append(T.MixUp(alpha=config.mixup, num_classes=num_classes))
    if config.cutmix > 0:
        options.append(T.CutMix(alpha=config.cutmix, num_classes=num_classes))
    return options[0] if len(options) == 1 else T.RandomChoice(options)


class Objective:
    """The defaults of an objective other than classification: it supports neither FSDP nor patch dropout, leaves
    batches as they are, and its exported model has no class head for the data (subclasses fill in ``wrap``,
    ``loss``, ``evaluate`` and ``export``)."""

    saves_class_names = False

    def check(self, config: TrainConfig) -> None:
        if config.fsdp or config.patch_dropout > 0:
            raise VitlabError("a custom training objective (e.g. masked patch prediction) supports neither fsdp "
                              "nor patch_dropout")

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets

    def export(self, module: nn.Module) -> nn.Module:
        return module


class Classification(Objective):
    """Supervised classification: cross-entropy with label smoothing on the model's logits, mixup / cutmix on the
    batches when the config asks, top-1 / top-5 by :func:`vitlab.evaluate.evaluate_classifier`; the model itself is
    exported with the data's class names."""

    saves_class_names = True

    def __init__(self, config: TrainConfig, num_classes: int):
        self.label_smoothing = config.label_smoothing
        self.mixer = batch_mixer(config, num_classes)

    def check(self, config: TrainConfig) -> None:
        pass

    def wrap(self, model: nn.Module, preprocessing: Preprocessing) -> nn.Module:
        return model

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixer(images, targets) if self.mixer is not None else (images, targets)

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float(), targets, label_smoothing=self.label_smoothing)

    def evaluate(self, module: nn.Module, batches: Iterable, device: torch.device, precision: str = "fp32",
                 on_skipped=None) -> dict:
        results = evaluate_classifier(module, batches, device=device, precision=precision, on_skipped=on_skipped)
        return {k: results[k] for k in SUMMARY_KEYS if k in results}

    def export(self, module: nn.Module) -> nn.Module:
        return module
