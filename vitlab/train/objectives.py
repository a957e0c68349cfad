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

An objective may also bring its own data and model (:class:`vitlab.train.contrastive.ContrastiveObjective`'s
captioned images and two-tower model): ``datasets(config)`` returns (training set, evaluation set or None, why there
is none, class names, channels of in-memory data or None) in place of the config's data sets, and
``build_model(config, log)`` the module ``wrap`` then receives, in place of ``config.model`` / ``init_from``.

:class:`Classification` is the default; masked patch prediction (:class:`vitlab.selfsup.MaskedPatchObjective`) and
the masked autoencoder (:class:`vitlab.selfsup.MaskedAutoencoderObjective`) are others. ``better(metrics, best)``
says which evaluation ``best.pt`` keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from ..evaluate.classification import SUMMARY_KEYS, evaluate_classifier
from ..preprocessing import Preprocessing
from .config import TrainConfig


def batch_mixer(config: TrainConfig, num_classes: int, multi_label: bool = False):
    """torchvision's batch MixUp / CutMix (one of them per batch when both are on), or None. Multi-hot targets
    (``multi_label``) are mixed by :class:`MultiHotMixer` instead (torchvision's take class indices)."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    if multi_label:
        return MultiHotMixer(config.mixup, config.cutmix)
    from torchvision.transforms import v2 as T

    options = []
    if config.mixup > 0:
        options.append(T.MixUp(alpha=config.mixup, num_classes=num_classes))
    if config.cutmix > 0:
        options.append(T.CutMix(alpha=config.cutmix, num_classes=num_classes))
    return options[0] if len(options) == 1 else T.RandomChoice(options)


class MultiHotMixer:
    """MixUp / CutMix for multi-hot targets (B, K): as torchvision's, each image is paired with the batch rolled by
    one, ``lam ~ Beta(alpha, alpha)`` from torch's global generator (seeded per step by the loop), one of the two
    per batch when both are on; the targets are mixed with the same weight (for CutMix the pasted box's share of
    the area), so a label of both images keeps weight 1."""

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0):
        self.mixup, self.cutmix = mixup, cutmix

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or bool(torch.rand(()) < 0.5))
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample(()))
        rolled_x, rolled_y = images.roll(1, 0), targets.roll(1, 0)
        if not use_cutmix:
            return images * lam + rolled_x * (1.0 - lam), targets * lam + rolled_y * (1.0 - lam)
        H, W = images.shape[-2:]
        cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
        half_h, half_w = int(0.5 * H * math.sqrt(1.0 - lam)), int(0.5 * W * math.sqrt(1.0 - lam))
        top, bottom = max(cy - half_h, 0), min(cy + half_h, H)
        left, right = max(cx - half_w, 0), min(cx + half_w, W)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = rolled_x[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (H * W)
        return mixed, targets * lam + rolled_y * (1.0 - lam)


def sigmoid_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid cross-entropy: every label an independent binary decision, summed over the labels and averaged over
    the images (big_vision's ``sigmoid_xent``, the loss of the paper's ImageNet-21k pre-training). ``targets``:
    multi-hot / mixed rows (B, K), or class indices (B,) (one-hot). ``pos_weight`` (K,): each label's positive term
    weighted (:func:`vitlab.data.balance.loss_weights`)."""
    logits = logits.float()
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), logits.shape[1])
    per_label = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none",
                                                   pos_weight=pos_weight)
    return per_label.sum(dim=1).mean()


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy (with label smoothing) as a weighted mean over the images, each image weighted by its class's
    weight (``targets`` (B,) class indices), or by its target mixture's (mixup / cutmix rows (B, K): ``rows @
    weights``). For class indices without smoothing this is torch's ``cross_entropy(weight=...)``; with smoothing
    torch would also weigh the smoothing mass by class (pulling every image towards the rare classes), this does not."""
    per_image = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="none")
    weight = class_weights[targets] if targets.ndim == 1 else targets.float() @ class_weights
    return (weight * per_image).sum() / weight.sum()


def resolve_loss(config: TrainConfig, multi_label: bool) -> str:
    """``softmax`` or ``sigmoid``: the config's ``loss``, ``auto`` meaning sigmoid for multi-label data."""
    if config.loss == "auto":
        return "sigmoid" if multi_label else "softmax"
    return config.loss


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

    def better(self, metrics: dict, best: dict) -> bool:
        """Whether an evaluation (``metrics``) beats the best so far (``best``), for ``best.pt``: a higher ``top1``
        (an objective without an accuracy, such as MAE's reconstruction, compares its loss instead)."""
        return metrics.get("top1", -1) > best.get("top1", -1)

    def export(self, module: nn.Module) -> nn.Module:
        return module


class Classification(Objective):
    """Supervised classification: cross-entropy with label smoothing on the model's logits (``loss='softmax'``) or
    sigmoid cross-entropy (``loss='sigmoid'``, the default for multi-label data: :func:`sigmoid_loss`, with the
    head's bias initialised to -10 as the paper's authors did for ImageNet-21k), mixup / cutmix on the batches when
    the config asks, top-1 / top-5 (mean average precision for multi-label data) by
    :func:`vitlab.evaluate.evaluate_classifier`; the model itself is exported with the data's class names."""

    saves_class_names = True
    SIGMOID_HEAD_BIAS = -10.0  # sigmoid(-10) ~ 4.5e-5: every label starts as absent, as most are

    def __init__(self, config: TrainConfig, num_classes: int, multi_label: bool = False):
        self.label_smoothing = config.label_smoothing
        self.multi_label = multi_label
        self.loss_name = resolve_loss(config, multi_label)
        self.mixer = batch_mixer(config, num_classes, multi_label)
        self.head_bias_init = config.head_bias
        self.class_weights: torch.Tensor | None = None

    def set_class_weights(self, weights: torch.Tensor | None) -> None:
        """Weigh the label loss by class (K,): the softmax loss's class weights, the sigmoid loss's ``pos_weight``
        (:func:`vitlab.data.balance.loss_weights`); None: unweighted."""
        self.class_weights = None if weights is None else weights.float()

    @property
    def head_bias(self) -> float | None:
        """The initial bias of a new head: the config's ``head_bias``, else -10 with the sigmoid loss (None: the
        model's own zero init)."""
        if self.head_bias_init is not None:
            return self.head_bias_init
        return self.SIGMOID_HEAD_BIAS if self.loss_name == "sigmoid" else None

    def check(self, config: TrainConfig) -> None:
        if self.multi_label and self.loss_name != "sigmoid":
            raise VitlabError("multi-label data need loss=sigmoid (or auto)", options=("loss",))
        if self.loss_name == "sigmoid" and config.label_smoothing > 0:
            raise VitlabError("label_smoothing is for the softmax loss; set it to 0 with loss=sigmoid",
                              options=("label_smoothing", "loss"))

    def wrap(self, model: nn.Module, preprocessing: Preprocessing) -> nn.Module:
        return model

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixer(images, targets) if self.mixer is not None else (images, targets)

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = self.class_weights
        if weights is not None and weights.device != output.device:
            self.class_weights = weights = weights.to(output.device)  # once: no copy in every step
        if self.loss_name == "sigmoid":
            return sigmoid_loss(output, targets, pos_weight=weights)
        if weights is None:
            return F.cross_entropy(output.float(), targets, label_smoothing=self.label_smoothing)
        return weighted_cross_entropy(output, targets, weights, self.label_smoothing)

    def evaluate(self, module: nn.Module, batches: Iterable, device: torch.device, precision: str = "fp32",
                 on_skipped=None) -> dict:
        results = evaluate_classifier(module, batches, device=device, precision=precision, on_skipped=on_skipped)
        return {k: results[k] for k in SUMMARY_KEYS if k in results}

    def export(self, module: nn.Module) -> nn.Module:
        return module
