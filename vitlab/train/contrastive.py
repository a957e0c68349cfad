"""Contrastive fine-tuning of a two-tower image-text model (CLIP / SigLIP) on captioned images, with the training
loop (:func:`vitlab.train.train` and its ``objective`` hook): the same data pipeline, optimiser, schedule, run
folder, checkpoints, exact resume and torchrun as supervised training.

- **Start**: ``init_from`` is anything :func:`vitlab.load_image_text` reads (with a tokenizer); ``data`` captioned
  images (:func:`vitlab.data.captions.build_captioned`: a manifest with a text column or a Hugging Face source with
  one), ``train_split`` for training and ``val_data`` / ``eval_split`` held out for evaluation.
- **Loss** (``loss``): ``softmax`` is CLIP's symmetric contrastive loss (Radford et al. 2021): the logits
  ``exp(t) * img @ txt.T`` of the batch's unit embeddings, cross-entropy of each image over the batch's captions and
  of each caption over the images, averaged; the scale ``exp(t)`` is learned and clipped at 100 as CLIP does.
  ``sigmoid`` is SigLIP's pairwise loss (Zhai et al. 2023): ``-sum log sigmoid(z_ij * (exp(t) * img_i . txt_j + b))``
  over all pairs, ``z`` +1 on the diagonal and -1 elsewhere, divided by the batch size. ``auto``: sigmoid for a
  model with a logit bias (SigLIP), softmax otherwise.
- **Captions**: one per image per step; an image with several gets one drawn from the step's generator, which the
  loop seeds from (seed, step, the micro-batch's place), so a resumed run draws the same captions.
- **Negatives**: every pair of the global batch, as CLIP trains: with torchrun each process gathers every
  process's embeddings (:func:`gather_pairs`, gradients flowing back to the process that computed them) and takes
  its share of the loss, so that the processes' mean (what DDP's averaged gradients follow) is the global batch's
  loss. With ``accum_steps`` above 1 each accumulation step's micro-batches (over all processes) are their own
  contrastive batch.
- **Locking** (:class:`ContrastiveObjective`'s ``lock_image`` / ``lock_text`` / ``lock_logit_scale``): the locked
  parameters get no gradient and stay bit for bit as loaded, and a locked tower runs in eval mode without
  autograd (LiT, Zhai et al. 2022, locks the image tower).
- **Evaluation**: image -> text and text -> image recall@1 / @5 on the held-out captions
  (:func:`vitlab.evaluate.retrieval.retrieval_metrics`); ``top1``, the mean of the two recall@1s, is what ``best.pt``
  keeps and early stopping watches.
- **Output**: ``model.safetensors`` is the image tower alone (as the run folder keeps a model) and
  ``image_text/`` the two towers as a transformers CLIPModel / SiglipModel folder (:func:`vitlab.save_image_text`)
  that ``vitlab zero-shot``, ``eval --retrieval`` and ``serve --zero-shot`` take.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import SPLIT_FOLDERS
from ..data.captions import CaptionedImages, build_captioned
from ..data.folder import BadSample
from ..data.manifest import _read_rows, looks_like_manifest
from ..devices import autocast
from ..errors import VitlabError
from ..evaluate.distributed import gather_by_index, sum_over_processes, world
from ..evaluate.retrieval import retrieval_metrics
from ..image_text import load_image_text, save_image_text
from ..models.image_text import ImageTextModel, embed_texts
from ..preprocessing import Preprocessing
from .config import TrainConfig
from .loop import train
from .objectives import Objective

MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned temperature so that logits are scaled by at most 100
LOSSES = ("softmax", "sigmoid")
IMAGE_TEXT_FOLDER = "image_text"  # the two-tower model in the run folder


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, kind: str = "softmax", *,
                     all_images: torch.Tensor | None = None, all_texts: torch.Tensor | None = None,
                     offset: int = 0) -> torch.Tensor:
    """The contrastive loss of a batch of matching pairs: image ``i`` and text ``i`` (B, P) each, unit embeddings.

    ``softmax`` (CLIP): ``(CE(logits, arange) + CE(logits.T, arange)) / 2`` with ``logits = min(exp(logit_scale),
    100) * img @ txt.T``. ``sigmoid`` (SigLIP): ``-sum(log sigmoid(z * logits)) / B`` with ``logits = exp(logit_scale)
    * img @ txt.T + logit_bias`` and ``z`` +1 for the B matching pairs, -1 for the others. Computed in float32.

    Across processes: ``all_images`` / ``all_texts`` (N, P) are every process's pairs and the local ones sit at
    rows ``offset:offset + B`` of them; this process's share is its images against all texts and its texts against
    all images (softmax) or its images against all texts (sigmoid), so that the mean of the shares over
    equal-sized processes is the loss of the global batch."""
    if kind not in LOSSES:
        raise VitlabError(f"contrastive loss must be one of {', '.join(LOSSES)}, got {kind!r}", options=("loss",))
    img, txt = image_embeds.float(), text_embeds.float()
    every_img = img if all_images is None else all_images.float()
    every_txt = txt if all_texts is None else all_texts.float()
    size = img.shape[0]
    positive = torch.arange(offset, offset + size, device=img.device)
    if kind == "softmax":
        scale = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
        per_image = F.cross_entropy(scale * img @ every_txt.t(), positive)
        per_text = F.cross_entropy(scale * txt @ every_img.t(), positive)
        return (per_image + per_text) / 2
    if logit_bias is None:
        raise VitlabError("the sigmoid loss needs a model with a logit bias (SigLIP); use loss=softmax",
                          options=("loss",))
    logits = logit_scale.float().exp() * img @ every_txt.t() + logit_bias.float()
    signs = -torch.ones_like(logits)
    signs[torch.arange(size, device=img.device), positive] = 1.0
    return -F.logsigmoid(signs * logits).sum() / size


class _GatherRows(torch.autograd.Function):
    """All processes' rows (padded to the longest for the collective), with the gradient of this process's rows in
    the backward pass: the sum over processes of the gradient of their losses (an all-reduce, which gloo and NCCL
    both have)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_pairs(image_embeds: torch.Tensor, text_embeds: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(every process's image embeddings, text embeddings, the row of this process's first pair) with gradients
    flowing back to each process's own rows; (None, None, 0) in a single process. The batch sizes are exchanged
    first (a rank that skipped unreadable images has fewer)."""
    rank, size = world()
    if size == 1:
        return None, None, 0
    count = torch.tensor([image_embeds.shape[0]], device=image_embeds.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    return (_GatherRows.apply(image_embeds.contiguous(), sizes, rank),
            _GatherRows.apply(text_embeds.contiguous(), sizes, rank), sum(sizes[:rank]))


class ContrastivePair(nn.Module):
    """The module the loop trains: an :class:`~vitlab.models.image_text.ImageTextModel` (``pair``) with parts locked.
    ``forward((images, tokens))`` returns (unit image embeddings, unit text embeddings, logit scale, logit bias or
    None). It stands where a ViT stands in the loop (``cfg`` is the image tower's)."""

    def __init__(self, pair: ImageTextModel, lock_image: bool = False, lock_text: bool = False,
                 lock_logit_scale: bool = False):
        super().__init__()
        self.pair = pair
        self.lock_image, self.lock_text = lock_image, lock_text
        locked = ([pair.visual] if lock_image else []) + ([pair.text] if lock_text else [])
        for module in locked:
            module.requires_grad_(False)
        head = getattr(pair.visual, "head", None)
        if isinstance(head, nn.Linear) and head.bias is not None and not head.bias.any():
            # CLIP's visual projection has no bias (the tower holds a zero one): it stays zero, as the saved
            # CLIPModel folder needs
            head.bias.requires_grad_(False)
        if lock_logit_scale:
            for p in (pair.logit_scale, pair.logit_bias):
                if p is not None:
                    p.requires_grad_(False)
        if not any(p.requires_grad for p in self.parameters()):
            raise VitlabError("every part of the model is locked: nothing would train (drop one of --lock-image, "
                              "--lock-text, --lock-logit-scale)")

    @property
    def cfg(self):
        return self.pair.visual.cfg

    def train(self, mode: bool = True) -> ContrastivePair:
        """Training mode for what trains; a locked tower stays in eval mode (no dropout, no drop-path)."""
        super().train(mode)
        if self.lock_image:
            self.pair.visual.eval()
        if self.lock_text:
            self.pair.text.eval()
        return self

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        images, tokens = inputs
        with torch.no_grad() if self.lock_image else nullcontext():  # a locked tower keeps no activations
            image_embeds = self.pair.encode_image(images)
        with torch.no_grad() if self.lock_text else nullcontext():
            text_embeds = self.pair.encode_text(tokens)
        return image_embeds, text_embeds, self.pair.logit_scale, self.pair.logit_bias


class CaptionedTraining(Dataset):
    """The images of :class:`~vitlab.data.captions.CaptionedImages` as the training loader reads a folder:
    ``(image, image index)`` with ``transform`` applied under ``sample_seed(index)``, or a ``BadSample``."""

    def __init__(self, data: CaptionedImages, channels: int):
        self.data, self.channels = data, channels
        self.data.transform = None
        self.transform = None
        self.sample_seed = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image, _ = self.data[index]
        if isinstance(image, BadSample) or self.transform is None:
            return image, index
        if self.sample_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.sample_seed(index))
                return self.transform(image), index
        return self.transform(image), index


def _splits(name: str) -> tuple[str, ...]:
    return SPLIT_FOLDERS.get(name, (name,))


def _has_split_column(spec: str) -> bool:
    return _read_rows(Path(spec).expanduser())[1].count("split") > 0


class ContrastiveObjective(Objective):
    """Contrastive fine-tuning of ``config.init_from`` (a CLIP / SigLIP two-tower model) on the captioned images
    of ``config.data`` (the module doc). ``config.loss``: ``auto`` / ``softmax`` / ``sigmoid``. ``lock_image``,
    ``lock_text``, ``lock_logit_scale``: parts kept as loaded (a resumed run needs the same ones)."""

    saves_class_names = False

    def __init__(self, lock_image: bool = False, lock_text: bool = False, lock_logit_scale: bool = False):
        self.lock_image, self.lock_text, self.lock_logit_scale = lock_image, lock_text, lock_logit_scale
        self.pair: ImageTextModel | None = None
        self.module: ContrastivePair | None = None
        self.kind = "softmax"
        self.train_data: CaptionedImages | None = None
        self.eval_data: CaptionedImages | None = None
        self.eval_batch_size = 256
        self._first = self._count = None

    # --- what the run builds (hooks of vitlab.train.run.build_run) ---
    def _load(self, config: TrainConfig) -> ImageTextModel:
        if self.pair is None:
            if not config.init_from:
                raise VitlabError("contrastive fine-tuning starts from an image-text model: set init_from (vitlab "
                                  "finetune-image-text --from)", options=("init_from",))
            try:
                pair = load_image_text(config.init_from)
            except VitlabError as exc:
                raise VitlabError(f"{config.init_from}: not an image-text model vitlab reads ({exc})",
                                  options=("init_from",)) from None
            if pair.tokenizer is None:
                raise VitlabError(f"{config.init_from}: no tokenizer files (tokenizer.json / spiece.model) beside "
                                  "the weights; the captions cannot be tokenized", options=("init_from",))
            self.pair = pair.train()
        return self.pair

    def datasets(self, config: TrainConfig):
        """(training set, evaluation set or None, why there is none, class names (none), channels (None)):
        the captioned images of ``data`` / ``val_data``, split by ``train_split`` / ``eval_split``."""
        self.pair = None  # every run (and resume) starts from init_from's files, not from an earlier run's weights
        channels = self._load(config).visual.cfg.in_chans
        common = dict(channels=channels, on_error=config.on_bad_image)
        self.train_data = build_captioned(config.data, _splits(config.train_split), **common)
        eval_source = config.val_data or config.data
        why_not = None
        if config.val_data is None and looks_like_manifest(eval_source) and not _has_split_column(eval_source):
            self.eval_data, why_not = None, f"{config.data} has no split column"
        else:
            try:
                self.eval_data = build_captioned(eval_source, _splits(config.eval_split), **common)
            except VitlabError as exc:
                if config.val_data is not None:
                    raise
                self.eval_data, why_not = None, str(exc)
        # each image's captions: texts[order[first[i]:first[i] + count[i]]]
        owner = torch.as_tensor(self.train_data.text_image)
        self._order = torch.argsort(owner, stable=True)
        self._count = torch.bincount(owner, minlength=len(self.train_data))
        self._first = torch.cumsum(self._count, 0) - self._count
        return CaptionedTraining(self.train_data, channels), self.eval_data, why_not, [], None

    def build_model(self, config: TrainConfig, log) -> nn.Module:
        """The image tower of ``init_from``'s two-tower model (the run's ViT); the rest waits for :meth:`wrap`."""
        pair = self._load(config)
        self.kind = resolve_contrastive_loss(config.loss, pair)
        log.info(f"image-text fine-tuning from {config.init_from}: {self.describe()}")
        return pair.visual

    @property
    def resume_record(self) -> dict:
        """What a resumed run must repeat (saved in its checkpoints, compared on resume)."""
        return {"lock_image": self.lock_image, "lock_text": self.lock_text, "lock_logit_scale": self.lock_logit_scale}

    def describe(self) -> str:
        loss = ("CLIP's softmax contrastive loss" if self.kind == "softmax" else "SigLIP's sigmoid loss")
        locked = [n for n, on in (("image tower", self.lock_image), ("text tower", self.lock_text),
                                  ("logit scale / bias", self.lock_logit_scale)) if on]
        return loss + (f", locked: {', '.join(locked)}" if locked else ", every part trained")

    def check(self, config: TrainConfig) -> None:
        super().check(config)
        refused = [name for name, on in (
            ("mixup", config.mixup > 0), ("cutmix", config.cutmix > 0), ("label_smoothing", config.label_smoothing > 0),
            ("teacher", bool(config.teacher)), ("lora_rank", bool(config.lora_rank)),
            ("linear_probe", config.linear_probe), ("freeze_blocks", bool(config.freeze_blocks)),
            ("freeze", bool(config.freeze)), ("layer_decay", config.layer_decay not in (None, 1.0)),
            ("ema_decay", config.ema_decay > 0), ("class_weights", config.class_weights != "none"),
            ("sampling", config.sampling != "uniform"), ("train_subset", config.train_subset is not None),
            ("holdout", bool(config.holdout)), ("img_size", config.img_size is not None),
            ("normalize_from_data", config.normalize_from_data), ("aug_repeats", config.aug_repeats > 1),
            ("model_args", bool(config.model_args))) if on]
        if refused:
            raise VitlabError(f"image-text fine-tuning does not support {', '.join(refused)} (classification "
                              "options); leave them at their defaults (lock parts with --lock-image / --lock-text)",
                              options=tuple(refused))
        self.eval_batch_size = config.eval_batch_size

    def wrap(self, model: nn.Module, preprocessing: Preprocessing) -> ContrastivePair:
        self.module = ContrastivePair(self.pair, self.lock_image, self.lock_text, self.lock_logit_scale)
        if self.kind == "softmax" and self.pair.logit_bias is not None:
            # a shift of every logit: the softmax loss gives it no gradient (and DDP wants none left unused)
            self.pair.logit_bias.requires_grad_(False)
        return self.module

    # --- every step ---
    def captions_for(self, images: torch.Tensor) -> list[str]:
        """One caption per image index (B,): drawn uniformly from the image's captions with torch's global
        generator (seeded by the loop for every micro-batch)."""
        idx = images.cpu()
        draw = torch.rand(idx.shape[0])
        count = self._count[idx]
        pick = self._first[idx] + torch.minimum((draw * count).long(), count - 1)
        texts = self.train_data.texts
        return [texts[int(i)] for i in self._order[pick]]

    def transform(self, images: torch.Tensor, targets: torch.Tensor):
        tokens = self.pair.tokenizer(self.captions_for(targets)).to(images.device)
        return (images, tokens), targets

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        image_embeds, text_embeds, scale, bias = output
        all_images, all_texts, offset = gather_pairs(image_embeds, text_embeds)
        return contrastive_loss(image_embeds, text_embeds, scale, bias, self.kind, all_images=all_images,
                                all_texts=all_texts, offset=offset)

    # --- evaluation ---
    @torch.no_grad()
    def evaluate(self, module: ContrastivePair, batches: Iterable, device: torch.device, precision: str = "fp32",
                 on_skipped=None) -> dict:
        """Image <-> text recall@1 / @5 on the held-out captions (every process embeds its share of the images and
        of the captions; the rows are gathered): ``image_to_text_r1``, ``text_to_image_r1``, ``..._r5``, ``top1``
        (the mean of the two recall@1s), ``samples`` (images), ``texts`` and ``skipped`` (unreadable images)."""
        pair = module.pair
        was_training = module.training
        module.eval()
        data = self.eval_data
        chunks, kept = [], []
        skipped = 0
        try:
            for batch in batches:
                if batch.skipped:
                    skipped += len(batch.skipped)
                    if on_skipped is not None:
                        on_skipped(batch.skipped)
                if batch.images.shape[0] == 0:
                    continue
                with autocast(device, precision):
                    features = pair.encode_image(batch.images.to(device), normalize=False)
                chunks.append(F.normalize(features.float(), dim=-1).cpu())
                kept.append(batch.labels.cpu())
            rank, size = world()
            mine = np.arange(rank, len(data.texts), size)
            text_embeds = embed_texts(pair, [data.texts[i] for i in mine], self.eval_batch_size, precision)
        finally:
            module.train(was_training)
        empty = torch.empty(0, pair.embed_dim)
        image_index, image_embeds = gather_by_index(torch.cat(kept) if kept else torch.empty(0, dtype=torch.long),
                                                    torch.cat(chunks) if chunks else empty)
        _, text_embeds = gather_by_index(torch.as_tensor(mine, dtype=torch.long), text_embeds)
        skipped = int(sum_over_processes([float(skipped)])[0])
        owner = np.asarray(data.text_image)
        keep = np.isin(owner, image_index.numpy())
        if not keep.any():
            raise VitlabError(f"{data.name}: no evaluation image could be read")
        renumber = np.full(len(data), -1, dtype=np.int64)
        renumber[image_index.numpy()] = np.arange(len(image_index))
        result = retrieval_metrics(image_embeds, text_embeds[torch.as_tensor(keep)], renumber[owner[keep]], (1, 5))
        i2t, t2i = result["image_to_text"], result["text_to_image"]
        return {"top1": (i2t["recall@1"] + t2i["recall@1"]) / 2,
                "image_to_text_r1": i2t["recall@1"], "text_to_image_r1": t2i["recall@1"],
                "image_to_text_r5": i2t["recall@5"], "text_to_image_r5": t2i["recall@5"],
                "samples": result["images"], "texts": result["texts"], "skipped": skipped}

    def export(self, module: ContrastivePair) -> nn.Module:
        return module.pair.visual


def resolve_contrastive_loss(loss: str, pair: ImageTextModel) -> str:
    """``softmax`` or ``sigmoid``: ``loss``, with ``auto`` meaning sigmoid for a model with a logit bias (SigLIP).
    The sigmoid loss on a model without a bias is refused."""
    if loss == "auto":
        return "sigmoid" if pair.logit_bias is not None else "softmax"
    if loss == "sigmoid" and pair.logit_bias is None:
        raise VitlabError("loss=sigmoid (SigLIP's) needs a model with a logit bias; this one has none (a CLIP "
                          "model): use loss=softmax or auto", options=("loss",))
    if loss not in LOSSES:
        raise VitlabError(f"loss must be auto, softmax or sigmoid, got {loss!r}", options=("loss",))
    return loss


def finetune_image_text(config: TrainConfig, *, objective: ContrastiveObjective | None = None, resume=None,
                        epochs: float | None = None, steps: int | None = None):
    """Fine-tune the two-tower model ``config.init_from`` contrastively on the captioned images ``config.data``
    (the module doc); returns the :class:`~vitlab.train.TrainResult` with ``image_text`` added to it: the folder of
    the fine-tuned two-tower model (``<run>/image_text``; None on other processes than rank 0 or without a run
    folder). ``model_path`` is the image tower alone. ``resume``, ``epochs`` and ``steps`` as :func:`vitlab.train.train`
    takes them; a resumed run needs the objective's lock settings of the run (they are saved in its checkpoints)."""
    objective = objective or ContrastiveObjective()
    result = train(config, resume=resume, objective=objective, epochs=epochs, steps=steps)
    folder = None
    if result.run_dir is not None and world()[0] == 0 and objective.pair is not None:
        pair = objective.pair
        device = pair.logit_scale.device
        if objective.kind == "softmax":  # CLIP clips the parameter itself: the saved model never scales above 100
            with torch.no_grad():
                pair.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
        folder = Path(result.run_dir) / IMAGE_TEXT_FOLDER
        save_image_text(pair.cpu(), folder)
        pair.to(device)
    result.image_text = folder
    return result
