"""Everything a training run needs, built once: ``build_run(config, ...) -> Run``.

The data (training loader, evaluation set), the model and the module that trains it (objective wrapper, patch
dropout, DDP / FSDP, ``torch.compile``), the optimiser, the schedule, EMA and the step counts. The loop
(:mod:`vitlab.train.loop`) only reads the frozen :class:`Run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..compute.flops import forward_macs, resnetv2_forward_macs
from ..compute.onednn import describe_linear_kernels, linear_kernels, linear_shapes, set_onednn_linear
from ..compute.precision import choose_cpu_precision, cpu_precision_reason
from ..data import (
    ArrayDataset,
    HFImageDataset,
    HFStreamDataset,
    ImageFolderDataset,
    ManifestDataset,
    ShardDataset,
    build_dataset,
)
from ..data.balance import class_counts, describe_counts, loss_weights, sample_classes, sampling_weights
from ..data.loaders import Augment, FolderTrainLoader, InMemoryTrainLoader, mix_seed
from ..data.manifest import looks_like_manifest
from ..data.stats import channel_statistics
from ..errors import InvalidValueError, VitlabError
from ..factory import load
from ..models import ModelConfig, create_model, get_config, key_bias_slices, metadata_of
from ..preprocessing import Preprocessing
from . import distributed as D
from .config import TrainConfig
from .distill import Distillation
from .lora import apply_lora, check_lora_config
from .objectives import Classification, Objective
from .optim import EMA, build_optimizer, build_scheduler
from .patch_dropout import PatchDropoutForward
from .runfolder import eval_interval_for, total_steps_for
from .runlog import RunLog
from .transfer import adapt_init_channels, apply_controls, init_channels


@dataclass(frozen=True)
class Run:
    """One run's parts. ``model`` is the module whose weights are trained and saved (the ViT, or an objective's
    wrapper around it); ``trainable`` is what the optimiser steps (``model`` inside patch dropout and DDP, or
    sharded by FSDP); ``forward`` is ``trainable``, compiled when asked."""

    config: TrainConfig
    info: D.DistInfo
    precision: str                   # fp32, bf16 or fp16 (``auto`` resolved)
    run_dir: Path | None
    log: RunLog
    objective: Objective             # see vitlab.train.objectives
    class_names: list[str]
    preprocessing: Preprocessing
    train_set: Dataset
    eval_set: Dataset | None
    loader: InMemoryTrainLoader | FolderTrainLoader
    model: nn.Module
    trainable: nn.Module
    forward: nn.Module
    params: list[torch.Tensor]       # trainable parameters, for the gradient norm
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_interval: int               # optimiser steps between evaluations
    macs: int                        # forward multiply-accumulates per image
    train_macs: int                  # ... per training image, averaged over the run (fewer tokens with patch dropout)
    patch_dropout_steps: int = 0     # patch dropout in steps [0, patch_dropout_steps); all tokens after
    key_biases: list = field(default_factory=list)  # (bias, key slice): gradients zeroed (models.key_bias_slices)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale (None in fp32 and bf16)
    teacher_macs: int = 0            # the distillation teacher's forward multiply-accumulates per image (0: none)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.cfg


# fp16's first loss scale (torch's default): lowered at once where the gradients overflow, raised again after
# 2000 steps without overflow
LOSS_SCALE_INIT = 2.0 ** 16
# compute capability from which a GPU multiplies fp16 on tensor cores (Volta); bf16 natively from Ampere (8.0)
FP16_CAPABILITY = (7, 0)


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """``auto`` -> bf16 on GPUs with native bf16 (Ampere and later), fp16 (with loss scaling) on GPUs with fp16
    tensor cores but no bf16 (V100, T4); on the CPU, given the ``model``, bf16 where this CPU has native bf16 and
    it measured faster at the model's Linear shapes (:func:`vitlab.compute.precision.choose_cpu_precision`, which
    also warns once when bf16 or fp16 is asked for on a CPU that emulates it); fp32 elsewhere."""
    if precision not in ("fp32", "bf16", "fp16", "auto"):
        raise InvalidValueError(f"precision must be fp32, bf16, fp16 or auto, got {precision!r}")
    if device.type == "cpu" and model is not None:
        return choose_cpu_precision(precision, linear_shapes(model, min_features=0))
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        # not torch's default: it also says yes where bf16 is only emulated (several times slower than fp16)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16"
        return "fp16" if torch.cuda.get_device_capability(device) >= FP16_CAPABILITY else "fp32"
    return precision


def device_side_step(config: TrainConfig, device: torch.device, precision: str) -> bool:
    """Whether the optimiser is the fused kind that takes the skip decision as a device tensor (``found_inf``, as a
    gradient scaler passes it), so that a step never waits for the device: on CUDA (single process and DDP) and for
    fp16 anywhere. The CPU's float32 and bf16 runs keep the unfused optimiser, whose arithmetic earlier runs had
    (there reading the decision back costs nothing); FSDP's sharded parameters keep it too."""
    return (device.type == "cuda" and not config.fsdp) or precision == "fp16"


def _class_names(dataset, config: TrainConfig) -> list[str]:
    names = getattr(dataset, "class_names", None)
    if names:
        if config.num_classes is not None and config.num_classes != len(names):
            raise VitlabError(f"num_classes={config.num_classes} but the data has {len(names)} classes")
        return list(names)
    if config.num_classes is None:
        raise VitlabError(f"{config.data}: the data do not name their classes (no classes.txt next to the shards); "
                          "set num_classes")
    return [str(i) for i in range(config.num_classes)]


def _eval_split_dataset(config: TrainConfig, channels: int, train_set=None, class_names=None):
    """The evaluation data set, or None (with the reason) when there is none. A manifest's evaluation rows take the
    training class list."""
    source = config.val_data or config.data
    if config.val_data is None and isinstance(train_set, ManifestDataset) and not train_set.has_split_column:
        return None, f"{config.data} has no split column"
    try:
        return build_dataset(source, config.eval_split, data_dir=config.data_dir, download=config.download,
                             channels=channels, on_error=config.on_bad_image,
                             classes=class_names if looks_like_manifest(source) else None), None
    except VitlabError as exc:
        if config.val_data is not None:
            raise
        return None, str(exc)


def split_training_set(dataset, size: int | None, holdout: int, seed: int):
    """(training images, held-out images or None) of an in-memory set: a class-balanced random order fixed by
    ``seed`` (every class in turn), the first ``holdout`` images held out and the next ``size`` (default: all the
    rest) for training, so that smaller training sets are part of larger ones and every model of an experiment sees
    the same images."""
    if not isinstance(dataset, ArrayDataset):
        raise VitlabError("train_subset and holdout need an in-memory data set (a named set such as fashion-mnist)")
    available = len(dataset) - holdout
    if holdout < 0 or available < 1:
        raise VitlabError(f"holdout must be between 0 and {len(dataset) - 1:,}, got {holdout}")
    if size is not None and not 0 < size <= available:
        raise VitlabError(f"train_subset must be between 1 and {available:,} (training images left after the "
                          f"holdout), got {size}")
    gen = torch.Generator().manual_seed(mix_seed(seed, 11))
    order = torch.randperm(len(dataset), generator=gen)
    labels = dataset.labels[order]
    rank = torch.zeros_like(labels)  # position of each image within its class in the shuffled order
    for k in labels.unique():
        members = labels == k
        rank[members] = torch.arange(int(members.sum()))
    balanced = order[torch.argsort(rank * len(dataset) + torch.arange(len(dataset)))]
    held = dataset.subset(balanced[:holdout].sort().values) if holdout else None
    chosen = balanced[holdout:] if size is None else balanced[holdout:holdout + size]
    return dataset.subset(chosen.sort().values), held


def build_model_for(config: TrainConfig, num_classes: int, in_chans: int | None, log: RunLog) -> nn.Module:
    """A fresh registered model, or the ``init_from`` checkpoint adapted to the run (resolution, head)."""
    overrides = dict(config.model_args)
    if config.img_size is not None:
        overrides["img_size"] = config.img_size
    if config.init_from:
        img_size = overrides.pop("img_size", None)
        want_chans = in_chans if in_chans is not None else overrides.pop("in_chans", None)
        overrides.pop("in_chans", None)
        model = load(config.init_from, img_size=img_size)
        source_classes = model.cfg.num_classes
        reset = config.reset_head == "always" or (config.reset_head == "auto" and source_classes != num_classes)
        if config.reset_head == "never" and source_classes != num_classes:
            raise VitlabError(f"{config.init_from}: has {source_classes} classes, the data {num_classes}; "
                              "reset_head=never cannot keep its head")
        pre_logits = bool(getattr(model.cfg, "representation_size", None))  # a BiT config has no such field
        if reset:
            model = load(config.init_from, img_size=img_size, num_classes=num_classes, drop_pre_logits=True)
            model.reset_head(num_classes, drop_pre_logits=True)
            log.info(f"fine-tuning from {config.init_from}: new zero-initialised head for {num_classes} classes"
                     + (" (pre-logits removed)" if pre_logits else ""))
        else:
            log.info(f"fine-tuning from {config.init_from}: keeping its {source_classes}-class head")
        extra = {k: v for k, v in overrides.items() if getattr(model.cfg, k) != v}
        if extra:  # dropout and similar options can change; shapes cannot
            shape_keys = {"embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "in_chans", "class_token"}
            bad = sorted(set(extra) & shape_keys)
            if bad:
                raise VitlabError(f"cannot change {', '.join(bad)} of a loaded checkpoint")
            state, loaded = model.state_dict(), model
            model = type(model)(model.cfg.replace(**extra))
            model.load_state_dict(state, strict=True)
            model.preprocessing = loaded.preprocessing  # the source's, for run_preprocessing
            model.class_names = loaded.class_names
        return adapt_init_channels(model, want_chans, config.init_from, log.info)  # RGB checkpoint, grey data
    if in_chans is not None:
        overrides.setdefault("in_chans", in_chans)
    get_config(config.model, num_classes=num_classes, **overrides)  # validates names and values first
    return create_model(config.model, num_classes=num_classes, **overrides)


def _init_head_bias(model: nn.Module, bias: float | None, log: RunLog) -> None:
    """Set a new head's bias to ``bias`` (the sigmoid loss's -10, or the config's ``head_bias``). Only a fresh
    head, all zeros (built from scratch, reset for fine-tuning, or an ImageNet-21k release's zeroed one), is
    touched; a trained head is kept."""
    head = getattr(model, "head", None)
    if bias is None or not isinstance(head, nn.Linear) or head.bias is None:
        return
    with torch.no_grad():
        if torch.count_nonzero(head.weight) or torch.count_nonzero(head.bias):
            return
        head.bias.fill_(bias)
    log.info(f"new head: bias initialised to {bias:g}")


def run_preprocessing(config: TrainConfig, model: nn.Module) -> tuple[Preprocessing, str]:
    """(the preprocessing a run trains and evaluates with, where it comes from). From scratch: the paper's (square
    resize, bilinear, [-1, 1]). Fine-tuning (``init_from``): the source checkpoint's (``model.preprocessing``, set by
    ``vitlab.load``, with mean / std adapted when the channel count changed) at the run's resolution: its mean / std
    and interpolation in training and evaluation, its resize policy (``crop_pct``) in evaluation."""
    cfg = model.cfg
    paper = Preprocessing.for_model(cfg.img_size, cfg.in_chans)
    if not config.init_from:
        return paper, "the paper's (training from scratch)"
    meta = metadata_of(model)
    source = meta.preprocessing
    if not meta.preprocessing_known or source.channels != cfg.in_chans:
        return paper, f"the paper's ({config.init_from} records none for {cfg.in_chans}-channel images)"
    return source.replace(img_size=cfg.img_size), f"the source checkpoint's ({config.init_from})"


def describe_preprocessing(pre: Preprocessing) -> str:
    """One line: normalisation, interpolation, evaluation resize."""
    def values(v):
        return "/".join(f"{x:.4g}" for x in v)

    h, w = pre.img_size
    if pre.resize == "crop":
        resize = f"shorter side to {round(h / pre.crop_pct)} (crop_pct {pre.crop_pct:g}), centre {h}x{w} crop"
    else:
        resize = f"squash to {h}x{w}"
    return f"mean {values(pre.mean)}, std {values(pre.std)}, {pre.interpolation}; evaluation: {resize}"


def _datasets(config: TrainConfig):
    """(training set, evaluation set or None, class names, channels of in-memory data or None)."""
    # the channel count: in-memory sets have their own; folders and shards are decoded for the model
    model_cfg = get_config(config.model, **{k: v for k, v in config.model_args.items() if k != "num_classes"})
    want_channels = config.model_args.get("in_chans", init_channels(config.init_from) or model_cfg.in_chans)
    train_set = build_dataset(config.data, config.train_split, data_dir=config.data_dir, download=config.download,
                              channels=want_channels, on_error=config.on_bad_image, classes=config.classes)
    in_chans = train_set.channels if isinstance(train_set, ArrayDataset) else None
    class_names = _class_names(train_set, config)
    eval_set, why_not = _eval_split_dataset(config, in_chans or want_channels, train_set, class_names)
    if eval_set is not None and getattr(eval_set, "multi_label", False) != getattr(train_set, "multi_label", False):
        raise VitlabError("the training and evaluation data differ in being multi-label (a 'labels' column) or not")
    if config.train_subset is not None or config.holdout:
        train_set, held_out = split_training_set(train_set, config.train_subset, config.holdout, config.seed)
        if held_out is not None:
            eval_set, why_not = held_out, None
    if isinstance(eval_set, ShardDataset) and eval_set.class_names and eval_set.class_names != class_names:
        raise VitlabError("the evaluation shards name different classes than the training data")
    if (isinstance(eval_set, (ArrayDataset, ImageFolderDataset, HFImageDataset, HFStreamDataset))
            and eval_set.class_names != class_names):
        raise VitlabError(f"evaluation classes {eval_set.class_names[:5]}... differ from the training classes "
                          f"{class_names[:5]}...")
    return train_set, eval_set, why_not, class_names, in_chans


def _balance_loss(config: TrainConfig, objective, train_set, class_names: list[str], multi_label: bool,
                  log: RunLog) -> None:
    """``class_weights``: weigh the objective's label loss by the training set's class counts."""
    if config.class_weights == "none":
        return
    if not isinstance(objective, Classification):
        raise VitlabError("class_weights weigh a classification loss, not another objective such as masked patch "
                          "prediction", options=("class_weights",))
    counts, labelled = class_counts(train_set, "class_weights")
    weights = loss_weights(counts, labelled, config.class_weights, multi_label)
    objective.set_class_weights(weights)
    kind = "positive weights per label" if multi_label else "class weights"
    log.info(f"{kind} ({config.class_weights}): {describe_counts(counts, class_names)}; weights "
             f"{float(weights[counts > 0].min()):.3g} to {float(weights.max()):.3g}")


def _sampling_weights(config: TrainConfig, train_set, class_names: list[str], log: RunLog) -> torch.Tensor | None:
    """``sampling``: each training sample's drawing weight (None: every epoch a plain permutation)."""
    if config.sampling == "uniform":
        return None
    classes = sample_classes(train_set, "sampling")
    weights = sampling_weights(classes, len(class_names), config.sampling)
    counts = torch.bincount(classes[classes >= 0], minlength=len(class_names))
    share = torch.zeros(len(class_names), dtype=torch.float64).index_add_(0, classes.clamp(min=0),
                                                                          weights) / weights.sum()
    log.info(f"{config.sampling} sampling: {describe_counts(counts, class_names)}; each epoch draws "
             f"{len(classes):,} images with replacement, classes {100 * float(share[counts > 0].min()):.1f}% to "
             f"{100 * float(share.max()):.1f}% of them")
    return weights


def _record_kernels(vit: nn.Module, asked: str, precision: str, device: torch.device, log: RunLog) -> None:
    """Write what the run computes with to ``kernels.json`` in the run folder (and one log line): the precision
    and why (on the CPU measured per machine, :mod:`vitlab.compute.precision`), and per Linear shape the product
    it runs on (oneDNN or F.linear, measured per machine, :func:`vitlab.compute.onednn.linear_kernels`)."""
    record = {"device": str(device), "precision": precision, "precision_asked": asked}
    if device.type == "cpu":
        record["precision_reason"] = cpu_precision_reason(asked, linear_shapes(vit, min_features=0))
        record["linear"] = linear_kernels(vit)
        if precision != "fp32":  # autocast products never take the float32 oneDNN path
            record["linear"]["note"] = f"under {precision} autocast every Linear layer runs F.linear"
        log.info(describe_linear_kernels(record["linear"]))
    else:
        record["precision_reason"] = f"asked for {asked}" if asked != "auto" else f"auto on {device.type}"
        record["linear"] = {"decided_by": "the oneDNN fast path is CPU only", "shapes": {}}
    log.write_json("kernels.json", record)


def build_run(config: TrainConfig, info: D.DistInfo, run_dir: Path | None, log: RunLog, objective=None) -> Run:
    """Build every part of a run from its config (``objective``: default :class:`Classification`)."""
    cfg = config
    precision = resolve_precision(cfg.precision, info.device)
    if cfg.fsdp and precision == "fp16":  # the loss scale's overflow check would have to see every shard
        if cfg.precision != "auto":
            raise VitlabError("precision=fp16 with fsdp is not supported; use precision=bf16 or precision=fp32 "
                              "with fsdp, or fp16 without fsdp (DDP)", options=("precision", "fsdp"))
        precision = "fp32"
    # an objective with data of its own (image-text fine-tuning's captioned images) builds them
    own_data = getattr(objective, "datasets", None)
    train_set, eval_set, why_not, class_names, in_chans = own_data(cfg) if own_data else _datasets(cfg)
    if eval_set is None:
        log.warning(f"no evaluation data ({why_not}); set val_data to evaluate")
    multi_label = bool(getattr(train_set, "multi_label", False))
    if cfg.teacher and objective is not None:
        raise VitlabError("teacher (knowledge distillation) is for classification training, not for another "
                          "objective such as masked patch prediction", options=("teacher",))
    if objective is None:
        objective = (Distillation(cfg, class_names, multi_label, named=bool(getattr(train_set, "class_names", None)))
                     if cfg.teacher else
                     Classification(cfg, len(class_names), multi_label))
    objective.check(cfg)
    _balance_loss(cfg, objective, train_set, class_names, multi_label, log)
    check_lora_config(cfg)
    torch.manual_seed(mix_seed(cfg.seed, 5))  # the initial weights depend on the seed only (same on every rank)
    own_model = getattr(objective, "build_model", None)  # ... and a model of its own (a two-tower's image tower)
    vit = own_model(cfg, log) if own_model else build_model_for(cfg, len(class_names), in_chans, log)
    _init_head_bias(vit, getattr(objective, "head_bias", None), log)
    if cfg.randaugment and vit.cfg.in_chans not in (1, 3):  # its colour operations need grey or RGB images
        raise VitlabError(f"randaugment works on 1- and 3-channel images, not {vit.cfg.in_chans}; drop it")
    if cfg.lora_rank:  # adapters on the frozen model (vitlab.train.lora): before DDP and the optimiser
        apply_lora(vit, cfg, log.info)
    else:
        apply_controls(vit, linear_probe_only=cfg.linear_probe, freeze_blocks=cfg.freeze_blocks, patterns=cfg.freeze,
                       layer_decay=cfg.layer_decay, log=log.info)  # fine-tuning controls: before DDP and the optimiser
    if cfg.grad_checkpointing:  # the model's own switch: its blocks (and a hybrid's CNN stages) recompute
        vit.set_grad_checkpointing(True)
        log.info("gradient checkpointing: each block's activations are recomputed in the backward pass")
    set_onednn_linear(vit)  # this machine's CPU fast-path default for its Linear layers
    if info.device.type == "cpu":  # auto: bf16 only where this CPU has it natively and it measures faster
        precision = resolve_precision(cfg.precision, info.device, vit)
        log.info(f"precision on the CPU: {precision} (asked: {cfg.precision})")
    _record_kernels(vit, cfg.precision, precision, info.device, log)
    preprocessing, origin = run_preprocessing(cfg, vit)
    if cfg.normalize_from_data:
        mean, std, measured = channel_statistics(train_set)
        preprocessing = preprocessing.replace(mean=mean, std=std)
        origin += f", mean / std measured on {measured:,} training images"
    log.info(f"preprocessing: {origin}: {describe_preprocessing(preprocessing)}; training: augmentation "
             f"{cfg.augment} at {preprocessing.img_size[0]}x{preprocessing.img_size[1]} with the same mean / std "
             f"and interpolation; saved with the model")
    # training mode: a loaded checkpoint (init_from) comes in eval mode, which would leave dropout, drop-path, LoRA
    # dropout and a distilled model's second head off for the whole run
    model = objective.wrap(vit, preprocessing).to(info.device).train()
    teacher_macs = 0
    if isinstance(objective, Distillation):
        teacher_macs = forward_macs(objective.teacher.cfg)
        log.info(objective.describe() + f"; {teacher_macs / 1e6:.1f} M MACs per image forward")
        if cfg.compile:
            objective.compile()

    common = dict(global_batch=cfg.batch_size, img_size=vit.cfg.img_size, augment=Augment(
        cfg.augment, tuple(cfg.crop_scale), cfg.flip, cfg.max_shift,
        tuple(cfg.randaugment) if cfg.randaugment else None, cfg.random_erasing), seed=cfg.seed, rank=info.rank,
        world_size=info.world_size, accum_steps=cfg.accum_steps, mean=preprocessing.mean, std=preprocessing.std,
        device=info.device, interpolation=preprocessing.interpolation, repeats=cfg.aug_repeats,
        weights=_sampling_weights(cfg, train_set, class_names, log))
    if isinstance(train_set, ArrayDataset):
        loader = InMemoryTrainLoader(train_set, **common)
    else:
        loader = FolderTrainLoader(train_set, num_workers=cfg.num_workers, **common)
    spe = loader.steps_per_epoch
    total_steps = total_steps_for(cfg.steps, cfg.epochs, spe)
    if total_steps <= 0:
        raise InvalidValueError("the run has no steps: set epochs or steps to a positive value")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * spe))
    ev = cfg.eval_every_epochs

    if cfg.early_stop and (eval_set is None or not ev or ev <= 0):
        raise VitlabError("early_stop needs evaluations during the run: evaluation data (val_data, or a test split) "
                          "and eval_every_epochs above 0", options=("early_stop",))
    if cfg.fsdp and cfg.ema_decay > 0:
        raise VitlabError("EMA with FSDP is not supported; use DDP (drop fsdp) or set ema_decay=0")
    if cfg.fsdp and cfg.optimizer == "muon":  # it orthogonalises whole matrices; FSDP holds a shard of each
        raise VitlabError("optimizer=muon with FSDP is not supported; use DDP (drop fsdp) or optimizer=adamw")
    trainable: nn.Module = model
    if cfg.patch_dropout > 0:
        if cfg.fsdp:
            raise VitlabError("patch_dropout with FSDP is not supported; use DDP (drop fsdp)")
        trainable = PatchDropoutForward(model, 1.0 - cfg.patch_dropout)
    trainable = D.wrap(trainable, info, fsdp=cfg.fsdp)
    optimizer = build_optimizer(trainable, cfg.optimizer, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.momentum,
                                layer_decay=cfg.layer_decay, fused=device_side_step(cfg, info.device, precision),
                                muon_momentum=cfg.muon_momentum)
    warmup_steps = min(warmup, total_steps)
    if 0 < total_steps <= warmup:
        log.warning(f"the warmup ({warmup} steps) is as long as the run ({total_steps} steps): the learning rate only "
                    "rises and never decays; set warmup_steps or warmup_epochs lower")
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.schedule, cfg.end_lr_factor)
    macs = forward_macs(vit.cfg)
    train_macs = macs
    patch_dropout_steps = 0
    if cfg.patch_dropout > 0:
        patch_dropout_steps = max(0, total_steps - int(round(cfg.full_token_epochs * spe)))
        kept = max(1, int(round(vit.cfg.num_patches * (1.0 - cfg.patch_dropout))))
        ph, pw = getattr(vit.cfg, "reduction", vit.cfg.patch_size)  # pixels per token (a hybrid: stride x patch)
        strip = vit.cfg.replace(img_size=(ph, pw * kept))  # a 1 x kept patch grid (an estimate: the embedding of
        # the dropped tokens, which the model also computes, is left out)
        train_macs = forward_macs(strip)
        if hasattr(vit.cfg, "backbone"):  # a hybrid's CNN still sees the whole image; only its tokens are dropped
            train_macs += resnetv2_forward_macs(vit.cfg.backbone, False) - resnetv2_forward_macs(strip.backbone, False)
        train_macs = (train_macs * patch_dropout_steps + macs * (total_steps - patch_dropout_steps)) // total_steps
    return Run(
        config=cfg, info=info, precision=precision, run_dir=run_dir, log=log, objective=objective,
        class_names=class_names, preprocessing=preprocessing, train_set=train_set, eval_set=eval_set, loader=loader,
        model=model, trainable=trainable, forward=torch.compile(trainable) if cfg.compile else trainable,
        params=[p for p in trainable.parameters() if p.requires_grad], optimizer=optimizer, scheduler=scheduler,
        ema=EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None, steps_per_epoch=spe,
        total_steps=total_steps, warmup_steps=warmup_steps,
        eval_interval=eval_interval_for(ev, spe, total_steps), macs=macs,
        train_macs=train_macs, patch_dropout_steps=patch_dropout_steps, teacher_macs=teacher_macs,
        # FSDP shards the gradients: the key-bias slices are not whole on any process there
        key_biases=[] if cfg.fsdp else key_bias_slices(model),
        scaler=torch.amp.GradScaler(info.device.type, init_scale=LOSS_SCALE_INIT) if precision == "fp16" else None)
