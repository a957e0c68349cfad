"""The training loop: ``train(config) -> TrainResult``.

One function drives single-process and ``torchrun`` runs alike: build the data and the model, then repeat
forward / backward over micro-batches, clip, step, average, and at each evaluation point measure the model, log and
write the ``last`` and ``best`` checkpoints. Every random draw comes from (seed, position) (see
:mod:`vitlab.data.loaders`; the global torch generator is re-seeded from (seed, step, rank) before each step, which
fixes dropout and mixup), so a run resumed from a checkpoint continues exactly where the interrupted one was.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import remove_stale_temporaries
from ..compute.flops import forward_macs
from ..data import ArrayDataset, ImageFolderDataset, ShardDataset, build_dataset
from ..data.loaders import (
    Augment,
    FolderTrainLoader,
    InMemoryTrainLoader,
    folder_eval_batches,
    in_memory_eval_batches,
    mix_seed,
)
from ..errors import InvalidValueError, VitlabError
from ..evaluate.classification import SUMMARY_KEYS, evaluate_classifier
from ..evaluate.distributed import sum_over_processes
from ..models import create_model, get_config
from ..preprocessing import Preprocessing
from . import distributed as D
from .checkpoint import (
    STATE_FORMAT,
    STATE_VERSION,
    atomic_torch_save,
    load_train_state,
    rng_state,
    set_rng_state,
)
from .config import TrainConfig
from .evaluation import autocast_context
from .optim import EMA, build_optimizer, build_scheduler
from .patch_dropout import PatchDropoutForward
from .runlog import RunLog, default_run_name, new_run_dir


@dataclass
class TrainResult:
    """What a finished run returns: its folder, the final and best evaluation, and what it cost."""

    run_dir: Path | None
    metrics: dict                    # final evaluation of the saved model: top1, top5, loss, samples, skipped
    best: dict | None                # best evaluation seen (by top-1) and its step
    steps: int
    epochs: float
    train_seconds: float             # wall time of the training steps (evaluation excluded)
    total_seconds: float             # wall time of the whole call
    train_flops: float               # analytic training compute: 6 x forward MACs x images seen
    model_path: Path | None          # the final model (vitlab format) in the run folder
    model: nn.Module = field(repr=False, default=None)
    skipped_files: int = 0


# ----- set-up helpers
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in ("fp32", "bf16"):
        raise InvalidValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    return precision


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


def _eval_split_dataset(config: TrainConfig, channels: int):
    """The evaluation data set, or None (with the reason) when there is none."""
    source = config.val_data or config.data
    try:
        return build_dataset(source, config.eval_split if config.val_data is None else config.eval_split,
                             data_dir=config.data_dir, download=config.download, channels=channels,
                             on_error=config.on_bad_image), None
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


def build_model_for(config: TrainConfig, num_classes: int, in_chans: int | None, info: D.DistInfo, log: RunLog):
    """A fresh registered model, or the ``init_from`` checkpoint adapted to the run (resolution, head)."""
    overrides = dict(config.model_args)
    if config.img_size is not None:
        overrides["img_size"] = config.img_size
    if config.init_from:
        from ..checkpoints import load

        img_size = overrides.pop("img_size", None)
        source_classes = None
        model = load(config.init_from, img_size=img_size)
        source_classes = model.cfg.num_classes
        reset = config.reset_head == "always" or (config.reset_head == "auto" and source_classes != num_classes)
        if config.reset_head == "never" and source_classes != num_classes:
            raise VitlabError(f"{config.init_from}: has {source_classes} classes, the data {num_classes}; "
                              "reset_head=never cannot keep its head")
        pre_logits = bool(model.cfg.representation_size)
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
            state = model.state_dict()
            model = type(model)(model.cfg.replace(**extra))
            model.load_state_dict(state, strict=True)
        if in_chans is not None and model.cfg.in_chans != in_chans:
            raise VitlabError(f"{config.init_from}: the model takes {model.cfg.in_chans}-channel images, the data "
                              f"have {in_chans}")
        return model
    if in_chans is not None:
        overrides.setdefault("in_chans", in_chans)
    get_config(config.model, num_classes=num_classes, **overrides)  # validates names and values first
    return create_model(config.model, num_classes=num_classes, **overrides)


def _augment(config: TrainConfig) -> Augment:
    return Augment(config.augment, tuple(config.crop_scale), config.flip, config.max_shift,
                   tuple(config.randaugment) if config.randaugment else None)


def _mixer(config: TrainConfig, num_classes: int):
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


def _grad_norm(parameters: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Global gradient norm (clipping to ``clip`` when > 0). Computed on synchronised gradients, so every process
    gets the same value and makes the same skip decision."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
    else:
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


# ----- the run
class _Trainer:
    """State of one run; :func:`train` is its public face."""

    def __init__(self, config: TrainConfig, resume: str | Path | None, objective=None):
        self.objective = objective
        self.t_start = time.perf_counter()
        self.resume_state = None
        self.resume_path = None
        if resume is not None:
            self.resume_path = _checkpoint_path(resume)
            self.resume_state = load_train_state(self.resume_path)
            stored = TrainConfig.from_dict(self.resume_state["train_config"])
            # runtime-only settings may differ on the resumed run; everything that shapes the result may not
            config = stored.replace(device=config.device, threads=config.threads, progress=config.progress,
                                    num_workers=config.num_workers)
        self.config = config
        self.info = D.setup(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = self.info.device
        self.precision = resolve_precision(config.precision, self.device)
        if self.resume_path is not None:
            self.run_dir = self.resume_path.parent.parent
        elif self.info.is_main:
            name = config.run_name or default_run_name(config.data, config.model)
            self.run_dir = new_run_dir(config.out_dir, name)
        else:
            self.run_dir = None
        self.run_dir = D.broadcast_object(self.run_dir)
        self.log = RunLog(self.run_dir, enabled=self.info.is_main)
        self.skipped_total = 0

    # -- data and model
    def build(self) -> None:
        cfg, info, log = self.config, self.info, self.log
        # the channel count: in-memory sets have their own; folders and shards are decoded for the model
        model_cfg = get_config(cfg.model, **{k: v for k, v in cfg.model_args.items() if k != "num_classes"})
        want_channels = cfg.model_args.get("in_chans", model_cfg.in_chans)
        train_set = build_dataset(cfg.data, cfg.train_split, data_dir=cfg.data_dir, download=cfg.download,
                                  channels=want_channels, on_error=cfg.on_bad_image)
        in_chans = train_set.channels if isinstance(train_set, ArrayDataset) else None
        self.class_names = _class_names(train_set, cfg)
        channels = in_chans or want_channels
        eval_set, why_not = _eval_split_dataset(cfg, channels)
        if cfg.train_subset is not None or cfg.holdout:
            train_set, held_out = split_training_set(train_set, cfg.train_subset, cfg.holdout, cfg.seed)
            if held_out is not None:
                eval_set, why_not = held_out, None
        if eval_set is None:
            log.warning(f"no evaluation data ({why_not}); set val_data to evaluate")
        if isinstance(eval_set, ShardDataset) and eval_set.class_names and \
                eval_set.class_names != self.class_names:
            raise VitlabError("the evaluation shards name different classes than the training data")
        if isinstance(eval_set, (ArrayDataset, ImageFolderDataset)) and eval_set.class_names != self.class_names:
            raise VitlabError(f"evaluation classes {eval_set.class_names[:5]}... differ from the training classes "
                              f"{self.class_names[:5]}...")
        torch.manual_seed(mix_seed(cfg.seed, 5))  # the initial weights depend on the seed only (same on every rank)
        model = build_model_for(cfg, len(self.class_names), in_chans, info, log)
        self.model_cfg = model.cfg
        self.preprocessing = Preprocessing.for_model(model.cfg.img_size, model.cfg.in_chans)
        if self.objective is not None:  # another training objective trains its own wrapper around the model
            if cfg.fsdp or cfg.patch_dropout > 0:
                raise VitlabError("a custom training objective (e.g. masked patch prediction) supports neither fsdp "
                                  "nor patch_dropout")
            model = self.objective.wrap(model, self.preprocessing)
        model.to(self.device)
        self.raw_model = model
        self.train_set, self.eval_set = train_set, eval_set

        mean, std = self.preprocessing.mean, self.preprocessing.std
        common = dict(global_batch=cfg.batch_size, img_size=model.cfg.img_size, augment=_augment(cfg),
                      seed=cfg.seed, rank=info.rank, world_size=info.world_size, accum_steps=cfg.accum_steps,
                      mean=mean, std=std, device=self.device)
        if isinstance(train_set, ArrayDataset):
            self.loader = InMemoryTrainLoader(train_set, **common)
        else:
            self.loader = FolderTrainLoader(train_set, num_workers=cfg.num_workers, **common)
        spe = self.loader.steps_per_epoch
        self.steps_per_epoch = spe
        self.total_steps = cfg.steps if cfg.steps else int(math.ceil((cfg.epochs or 1) * spe))
        if self.total_steps <= 0:
            raise InvalidValueError("the run has no steps: set epochs or steps to a positive value")
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * spe))
        self.warmup_steps = min(warmup, self.total_steps)
        ev = cfg.eval_every_epochs
        self.eval_interval = max(1, int(round(ev * spe))) if ev and ev > 0 else self.total_steps

        if cfg.fsdp and cfg.ema_decay > 0:
            raise VitlabError("EMA with FSDP is not supported; use DDP (drop fsdp) or set ema_decay=0")
        trainable: nn.Module = model
        if cfg.patch_dropout > 0:
            if cfg.fsdp:
                raise VitlabError("patch_dropout with FSDP is not supported; use DDP (drop fsdp)")
            trainable = PatchDropoutForward(model, 1.0 - cfg.patch_dropout)
        self.model = D.wrap(trainable, info, fsdp=cfg.fsdp)
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, tuple(cfg.betas),
                                         cfg.momentum)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, self.warmup_steps, cfg.schedule,
                                         cfg.end_lr_factor)
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.mixer = _mixer(cfg, len(self.class_names)) if self.objective is None else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.macs = forward_macs(model.cfg)
        self.train_macs = self.macs  # per training image: fewer tokens with patch dropout
        if cfg.patch_dropout > 0:
            kept = max(1, int(round(model.cfg.num_patches * (1.0 - cfg.patch_dropout))))
            ph, pw = model.cfg.patch_size
            self.train_macs = forward_macs(model.cfg.replace(img_size=(ph, pw * kept)))  # a 1 x kept patch grid

    # -- checkpoints
    def _state_module(self) -> nn.Module:
        """The module whose state dict is the ViT's own (DDP and the patch-dropout wrapper share its parameters)."""
        return self.model if self.config.fsdp else self.raw_model

    def save_state(self, name: str, step: int, best: dict | None) -> None:
        model_sd, optim_sd = D.full_state_dicts(self._state_module(), self.optimizer)
        if not self.info.is_main:
            return
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "step": step, "epoch": step / self.steps_per_epoch,
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "train_config": self.config.to_dict(),
            "vit_config": self.model_cfg.to_dict(),
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.to_dict(),
            "best": best,
            "world_size": self.info.world_size,
        }
        if self.ema is not None:
            state["model_ema"] = {k: v.detach().cpu() for k, v in self.ema.state_dict().items()}
        atomic_torch_save(state, self.run_dir / "checkpoints" / name)

    def restore(self) -> tuple[int, dict | None]:
        state = self.resume_state
        if state is None:
            return 0, None
        if state.get("world_size", 1) != self.info.world_size:
            self.log.warning(f"resuming a {state.get('world_size')}-process run with {self.info.world_size} "
                             "processes: the data order differs from an uninterrupted run")
        D.load_full_state_dicts(self._state_module(), self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["model_ema"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        self.log.truncate_metrics(step)
        if self.info.is_main:
            remove_stale_temporaries(self.run_dir / "checkpoints")
        self.log.info(f"resumed from {self.resume_path} at step {step} (epoch {step / self.steps_per_epoch:.2f})")
        return step, state.get("best")

    # -- evaluation
    def evaluate(self, module: nn.Module) -> dict | None:
        if self.eval_set is None:
            return None
        cfg, info = self.config, self.info
        if isinstance(self.eval_set, ArrayDataset):
            batches = in_memory_eval_batches(self.eval_set, self.preprocessing, cfg.eval_batch_size, info.rank,
                                             info.world_size, self.device)
        else:
            batches = folder_eval_batches(self.eval_set, self.preprocessing, cfg.eval_batch_size, info.rank,
                                          info.world_size, cfg.num_workers, self.device)
        if self.objective is not None:
            return self.objective.evaluate(module, batches, self.device)
        results = evaluate_classifier(module, batches, device=self.device, precision=self.precision,
                                      on_skipped=self._report_skipped)
        return {k: results[k] for k in SUMMARY_KEYS if k in results}

    def _eval_modules(self) -> dict[str, nn.Module]:
        """The modules to evaluate on each rank independently: DDP's inner module, or for FSDP a gathered full copy
        (each rank's share of the evaluation data may need a different number of forward passes, which sharded
        modules cannot do)."""
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            main = type(self.raw_model)(self.model_cfg).to(self.device)
            main.load_state_dict(full, strict=True)
        else:
            main = self.raw_model
        return {"": main} | ({"ema_": self.ema.module} if self.ema is not None else {})

    def _report_skipped(self, reasons: list[str]) -> None:
        self.skipped_total += len(reasons)
        for reason in reasons:
            self.log.warning(f"skipped image: {reason}")

    # -- the loop
    def run(self) -> TrainResult:
        cfg, info, log = self.config, self.info, self.log
        self.build()
        step, best = self.restore()
        if self.resume_state is None:
            log.write_json("config.json", cfg.to_dict())
        images_total = self.total_steps * cfg.batch_size
        train_flops = 6.0 * self.train_macs * images_total
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        log.info(f"run folder: {self.run_dir}")
        log.info(f"data: {cfg.data} ({len(self.train_set):,} train images, {len(self.class_names)} classes"
                 + (f", {len(self.eval_set):,} evaluation images" if self.eval_set is not None else "") + ")")
        mc = self.model_cfg
        if hasattr(mc, "patch_size"):
            shape = (f"patch {mc.patch_size[0]}, {mc.num_patches + mc.num_prefix_tokens} tokens, width "
                     f"{mc.embed_dim}, depth {mc.depth}")
        else:  # a convolutional baseline (BiT ResNet-v2)
            shape = f"ResNet-v2 stages {tuple(mc.layers)}, width x{mc.width_factor}"
        log.info(f"model: {cfg.model} {mc.img_size[0]}x{mc.img_size[1]}, {shape}, {n_params:,} parameters, "
                 f"{self.macs / 1e6:.1f} M MACs per image forward")
        log.info(f"training: {self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.2f} epochs) of "
                 f"{cfg.batch_size} images, {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule} warmup {self.warmup_steps}"
                 f", {train_flops / 1e12:.1f} TFLOPs in total (6 x MACs x images); {info.world_size} process(es) on "
                 f"{self.device}, {self.precision}, {torch.get_num_threads()} threads")
        history_best = best
        bad_streak = 0
        train_seconds = 0.0
        last_eval = None
        loss_sum, loss_count, images_since, t_log = 0.0, 0, 0, time.perf_counter()
        model_main = self.forward_model
        progress = self._progress(step)
        accum = cfg.accum_steps
        while step < self.total_steps:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            for micro, batch in enumerate(self.loader.epoch(epoch, in_epoch * accum), start=in_epoch * accum):
                t0 = time.perf_counter()
                if micro % accum == 0:
                    torch.manual_seed(mix_seed(cfg.seed, step, info.rank, 4))
                    self.optimizer.zero_grad(set_to_none=True)
                    step_loss = 0.0
                if batch.skipped:
                    self._report_skipped(batch.skipped)
                last_micro = (micro + 1) % accum == 0
                images, targets = batch.images, batch.labels
                if images.shape[0]:
                    if self.mixer is not None:
                        images, targets = self.mixer(images, targets)
                    sync = last_micro or not isinstance(self.model, nn.parallel.DistributedDataParallel)
                    ctx = self.model.no_sync() if not sync else _null()
                    with ctx:
                        with autocast_context(self.device, self.precision):
                            output = model_main(images)
                        if self.objective is None:
                            loss = F.cross_entropy(output.float(), targets, label_smoothing=cfg.label_smoothing)
                        else:
                            loss = self.objective.loss(output, targets)
                        (loss / accum).backward()
                    step_loss += loss.item() / accum
                images_since += images.shape[0]
                if not last_micro:
                    train_seconds += time.perf_counter() - t0
                    continue
                norm = _grad_norm(self.params, cfg.grad_clip)
                if torch.isfinite(norm):
                    self.optimizer.step()
                    bad_streak = 0
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    bad_streak += 1
                    log.warning(f"step {step}: non-finite loss or gradients ({step_loss:.4g}); step skipped")
                    if bad_streak >= cfg.max_bad_steps:
                        raise VitlabError(
                            f"training diverged: {bad_streak} non-finite steps in a row at step {step} (lr "
                            f"{self.scheduler.get_last_lr()[0]:.3g}); lower lr, raise warmup, set grad_clip=1 or "
                            "use precision=fp32, then --resume from the last checkpoint")
                lr_now = self.scheduler.get_last_lr()[0]
                with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.raw_model, step)
                step += 1
                train_seconds += time.perf_counter() - t0
                if math.isfinite(step_loss):
                    loss_sum += step_loss
                    loss_count += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.3f}", refresh=False)
                if step % cfg.log_every_steps == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - t_log
                    row_loss = sum_over_processes([loss_sum, float(loss_count)])
                    throughput = images_since * info.world_size / max(elapsed, 1e-9)
                    log.metric({"kind": "step", "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                                "loss": row_loss[0] / max(row_loss[1], 1), "lr": lr_now,
                                "grad_norm": float(norm), "images_per_s": throughput})
                    if progress is not None:
                        progress.set_postfix(loss=f"{row_loss[0] / max(row_loss[1], 1):.3f}",
                                             img_s=f"{throughput:.0f}", lr=f"{lr_now:.2e}")
                    loss_sum, loss_count, images_since, t_log = 0.0, 0, 0, time.perf_counter()
                at_eval = step % self.eval_interval == 0 or step == self.total_steps
                if at_eval:
                    last_eval, history_best = self._evaluate_and_save(step, history_best, train_seconds)
                    t_log = time.perf_counter()
                elif cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    self.save_state("last.pt", step, history_best)
                if step >= self.total_steps:
                    break
        if progress is not None:
            progress.close()
        if last_eval is None:  # resumed exactly at the end
            last_eval, history_best = self._evaluate_and_save(step, history_best, train_seconds)
        model_path = self._save_final(last_eval)
        result = TrainResult(
            run_dir=self.run_dir, metrics=last_eval or {}, best=history_best, steps=step,
            epochs=step / self.steps_per_epoch, train_seconds=train_seconds,
            total_seconds=time.perf_counter() - self.t_start, train_flops=train_flops, model_path=model_path,
            model=self._final_module(), skipped_files=self.skipped_total)
        log.write_json("result.json", {
            "metrics": result.metrics, "best": result.best, "steps": result.steps, "epochs": result.epochs,
            "train_seconds": result.train_seconds, "total_seconds": result.total_seconds,
            "train_flops": train_flops, "forward_macs_per_image": self.macs, "skipped_files": self.skipped_total,
            "world_size": info.world_size, "device": str(self.device), "precision": self.precision,
            "threads": torch.get_num_threads(), "model_path": str(model_path) if model_path else None})
        if self.skipped_total:
            log.warning(f"{self.skipped_total} image file(s) skipped in total (named above and in log.txt)")
        return result

    def _progress(self, step: int):
        import sys

        if not (self.config.progress and self.info.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True, desc="train")

    def _evaluate_and_save(self, step: int, best: dict | None, train_seconds: float):
        metrics: dict = {}
        for prefix, module in self._eval_modules().items():
            result = self.evaluate(module)
            if result is not None:
                metrics.update({f"{prefix}{k}": v for k, v in result.items()})
        key = "ema_top1" if self.ema is not None else "top1"
        final_view = None
        if metrics:
            final_view = {k.removeprefix("ema_"): v for k, v in metrics.items()
                          if (k.startswith("ema_") if self.ema is not None else not k.startswith("ema_"))}
            row = {"kind": "eval", "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                   "train_seconds": round(train_seconds, 2), **metrics}
            self.log.metric(row)
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                              if k.endswith(("top1", "top5", "loss")))
            self.log.info(f"epoch {step / self.steps_per_epoch:.2f} step {step}/{self.total_steps}: {shown} "
                          f"({train_seconds:.0f} s training)")
        improved = metrics and (best is None or metrics.get(key, -1) > best.get("top1", -1))
        if improved:
            best = {**final_view, "step": step}
        self.save_state("last.pt", step, best)
        if improved:
            self.save_state("best.pt", step, best)
        D.barrier()
        return final_view, best

    def _final_module(self) -> nn.Module:
        module = self.ema.module if self.ema is not None else self.raw_model
        return self.objective.export(module) if self.objective is not None else module

    def _save_final(self, metrics: dict | None) -> Path | None:
        """The final model (EMA weights when EMA is on) in the vitlab format, with preprocessing and class names."""
        if self.config.fsdp:
            model_sd, _ = D.full_state_dicts(self.model, None)  # a collective: every rank takes part
            if not self.info.is_main:
                return None
            module = type(self.raw_model)(self.model_cfg)
            module.load_state_dict(model_sd, strict=True)
        else:
            module = self._final_module()
        if not self.info.is_main:
            return None
        from ..checkpoints import save

        meta = {"train_config": self.config.to_dict(), "metrics": metrics or {}, "steps": self.total_steps}
        path = save(module.cpu() if self.device.type != "cpu" else module, self.run_dir / "model.safetensors",
                    preprocessing=self.preprocessing, metadata=meta,
                    class_names=self.class_names if self.objective is None else None)
        if self.device.type != "cpu":
            module.to(self.device)
        return Path(path)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _checkpoint_path(resume: str | Path) -> Path:
    """``--resume`` takes a run folder (its ``checkpoints/last.pt``) or a checkpoint file."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise VitlabError(f"{resume}: no checkpoint to resume from (expected a run folder with checkpoints/last.pt "
                          "or a .pt file)")
    return path


def train(config: TrainConfig, *, resume: str | Path | None = None, objective=None) -> TrainResult:
    """Train (or fine-tune, with ``config.init_from``) a ViT as ``config`` says and return the result.

    ``resume``: a run folder or a ``last.pt``/``best.pt`` file; the run continues in its folder with its stored
    config (runtime settings such as device and threads may change) and ends with the same weights as a run that
    was never interrupted (with the same number of processes).

    ``objective`` replaces classification by another training objective (self-supervised pre-training such as
    :class:`vitlab.selfsup.MaskedPatchObjective`): ``wrap(model, preprocessing)`` gives the module to train,
    ``loss(output, labels)`` the loss from its output, ``evaluate(module, batches, device)`` the evaluation metrics
    (with ``top1`` for choosing the best checkpoint) and ``export(module)`` the model saved at the end. A resumed run
    needs the same objective."""
    threads = torch.get_num_threads()
    trainer = _Trainer(config, resume, objective)
    try:
        return trainer.run()
    finally:
        trainer.log.close()
        D.teardown()
        torch.set_num_threads(threads)  # the thread count is process-wide; leave it as the caller had it
