"""Self-supervised pre-training with the normal training loop (:func:`vitlab.train.train` and its ``objective``
hook): masked patch prediction and the masked autoencoder. Same data pipeline, optimiser, schedule, checkpoints and
resumption as supervised training; the labels are ignored. The saved ``model.safetensors`` is the ViT alone (no
[mask] embedding, no colour head or decoder, no class head), ready for ``vitlab finetune`` / ``init_from``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import InvalidValueError
from ..evaluate.distributed import sum_over_processes
from ..preprocessing import Preprocessing
from ..train import train
from ..train.objectives import Objective
from .mae import MaskedAutoencoder, decoder_options
from .mpp import MaskedPatchPrediction

EVAL_SEED = 20201022  # fixed corruption for evaluation, so that evaluations of a run are comparable


class MaskedPatchObjective(Objective):
    """The training objective for :func:`vitlab.train.train`: wraps the ViT in :class:`MaskedPatchPrediction`
    (the class head is dropped first: pre-training has no labels), takes the wrapper's output as the loss, evaluates
    the held-out loss and colour accuracy (as ``top1``) on a fixed corruption, and exports the ViT."""

    def __init__(self, bits: int = 3, ratio: float = 0.5, probs: tuple[float, float, float] = (0.8, 0.1, 0.1)):
        self.bits, self.ratio, self.probs = bits, ratio, tuple(probs)

    def wrap(self, model: nn.Module, preprocessing: Preprocessing) -> MaskedPatchPrediction:
        model.reset_head(0)
        return MaskedPatchPrediction(model, preprocessing.mean, preprocessing.std, self.bits, self.ratio, self.probs)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return output  # the wrapper's forward is the masked-patch loss

    @torch.no_grad()
    def evaluate(self, module: MaskedPatchPrediction, batches: Iterable, device: torch.device, precision: str = "fp32",
                 on_skipped=None) -> dict:
        """``loss`` (mean cross-entropy per corrupted patch), ``top1`` (colour accuracy on corrupted patches),
        ``patches`` and ``samples``, summed over all processes."""
        was_training = module.training
        module.eval()
        gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
        loss = correct = patches = samples = 0.0
        try:
            for batch in batches:
                if batch.images.shape[0] == 0:
                    continue
                batch_loss, batch_correct, batch_patches = module.accuracy(batch.images.to(device), gen)
                loss, correct, patches = loss + batch_loss, correct + batch_correct, patches + batch_patches
                samples += batch.images.shape[0]
        finally:
            module.train(was_training)
        loss, correct, patches, samples = sum_over_processes([loss, correct, patches, samples])
        return {"loss": loss / max(patches, 1), "top1": correct / max(patches, 1), "patches": int(patches),
                "samples": int(samples)}

    def export(self, module: MaskedPatchPrediction) -> nn.Module:
        return module.vit


def pretrain_mpp(config, *, objective: MaskedPatchObjective | None = None, resume=None):
    """Pre-train ``config.model`` by masked patch prediction on ``config.data`` (labels unused) with the training
    loop; returns its :class:`~vitlab.train.TrainResult` (``metrics``: held-out MPP ``loss`` and colour ``top1``;
    ``model_path``: the ViT to fine-tune)."""
    return train(config, resume=resume, objective=objective or MaskedPatchObjective())


class MaskedAutoencoderObjective(Objective):
    """The masked autoencoder as a training objective for :func:`vitlab.train.train`: wraps the ViT (class head
    dropped) in :class:`~vitlab.selfsup.mae.MaskedAutoencoder`, takes its output as the loss, evaluates the held-out
    reconstruction loss per masked patch on a fixed masking (``EVAL_SEED``; best.pt keeps the lowest) and exports
    the ViT. Decoder sizes left None: :func:`~vitlab.selfsup.mae.decoder_options`."""

    def __init__(self, mask_ratio: float = 0.75, decoder_width: int | None = None, decoder_depth: int | None = None,
                 decoder_heads: int | None = None, norm_pix_loss: bool = True):
        if not 0.0 < mask_ratio < 1.0:  # 0 would leave no patch to reconstruct: a loss of 0 / 0
            raise InvalidValueError(f"mask ratio must be in (0, 1) for pre-training, got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.decoder = (decoder_width, decoder_depth, decoder_heads)

    def wrap(self, model: nn.Module, preprocessing: Preprocessing) -> MaskedAutoencoder:
        model.reset_head(0)
        return MaskedAutoencoder(model, self.mask_ratio, norm_pix_loss=self.norm_pix_loss,
                                 **decoder_options(model.cfg, *self.decoder))

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return output  # the wrapper's forward is the reconstruction loss

    def better(self, metrics: dict, best: dict) -> bool:
        return metrics.get("loss", float("inf")) < best.get("loss", float("inf"))

    @torch.no_grad()
    def evaluate(self, module: MaskedAutoencoder, batches: Iterable, device: torch.device, precision: str = "fp32",
                 on_skipped=None) -> dict:
        """``loss`` (mean squared error per masked patch), ``patches`` and ``samples``, summed over processes."""
        was_training = module.training
        module.eval()
        gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
        loss = patches = samples = 0.0
        try:
            for batch in batches:
                if batch.images.shape[0] == 0:
                    continue
                batch_loss, batch_patches = module.reconstruction_error(batch.images.to(device), gen)
                loss, patches = loss + batch_loss, patches + batch_patches
                samples += batch.images.shape[0]
        finally:
            module.train(was_training)
        loss, patches, samples = sum_over_processes([loss, patches, samples])
        return {"loss": loss / max(patches, 1), "patches": int(patches), "samples": int(samples)}

    def export(self, module: MaskedAutoencoder) -> nn.Module:
        return module.vit


def pretrain_mae(config, *, objective: MaskedAutoencoderObjective | None = None, resume=None):
    """Pre-train ``config.model`` as a masked autoencoder on ``config.data`` (labels unused) with the training loop;
    returns its :class:`~vitlab.train.TrainResult` (``metrics``: held-out reconstruction ``loss`` per masked patch;
    ``model_path``: the ViT to fine-tune)."""
    return train(config, resume=resume, objective=objective or MaskedAutoencoderObjective())
