"""The training loop: ``train(config) -> TrainResult``.

One function drives single-process and ``torchrun`` runs alike. :func:`~vitlab.train.run.build_run` builds the data,
the model, the optimiser and the rest once; then each step is :func:`~vitlab.train.step.train_step` (forward /
backward over the micro-batches, clip, step, schedule, EMA), :class:`~vitlab.train.progress.StepLog` logs, and at
each evaluation point the objective measures the model and the ``last`` and ``best`` checkpoints are written
(:mod:`vitlab.train.checkpoint`). Every random draw comes from (seed, position) (see :mod:`vitlab.data.loaders`; the
global torch generator is re-seeded from (seed, step, rank) before each step, which fixes dropout and mixup), so a
run resumed from a checkpoint continues exactly where the interrupted one was.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import ArrayDataset
from ..data.loaders import folder_eval_batches, in_memory_eval_batches
from ..errors import VitlabError
from . import distributed as D
from .checkpoint import checkpoint_path, full_model, load_train_state, restore_run_state, save_run_state
from .config import TrainConfig
from .progress import StepLog
from .run import Run, build_run
from .runlog import RunLog, default_run_name, new_run_dir
from .step import train_step


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


class _Skipped:
    """Counts and logs the image files a run could not read (training and evaluation)."""

    def __init__(self, log: RunLog):
        self.log, self.total = log, 0

    def __call__(self, reasons: list[str]) -> None:
        self.total += len(reasons)
        for reason in reasons:
            self.log.warning(f"skipped image: {reason}")


def evaluate_run(run: Run, on_skipped) -> dict:
    """The objective's metrics of the model (``top1``, ...) and, with EMA, of the averaged model (``ema_top1``, ...),
    each process evaluating its share of the evaluation set; empty without evaluation data."""
    if run.eval_set is None:
        return {}
    cfg, info = run.config, run.info
    modules = {"": full_model(run, run.device)} | ({"ema_": run.ema.module} if run.ema is not None else {})
    metrics: dict = {}
    for prefix, module in modules.items():
        if isinstance(run.eval_set, ArrayDataset):
            batches = in_memory_eval_batches(run.eval_set, run.preprocessing, cfg.eval_batch_size, info.rank,
                                             info.world_size, run.device)
        else:
            batches = folder_eval_batches(run.eval_set, run.preprocessing, cfg.eval_batch_size, info.rank,
                                          info.world_size, cfg.num_workers, run.device)
        result = run.objective.evaluate(module, batches, run.device, precision=run.precision, on_skipped=on_skipped)
        metrics.update({f"{prefix}{k}": v for k, v in result.items()})
    return metrics


def _evaluate_and_save(run: Run, step: int, best: dict | None, train_seconds: float, on_skipped):
    """Evaluate, log, write ``last.pt`` (and ``best.pt`` when top-1 improved); returns (the final model's metrics:
    the EMA model's with EMA on, the best so far)."""
    metrics = evaluate_run(run, on_skipped)
    final_view = None
    if metrics:
        prefix = "ema_" if run.ema is not None else ""
        final_view = {k.removeprefix(prefix): v for k, v in metrics.items()
                      if k.startswith(prefix) and (prefix or not k.startswith("ema_"))}
        run.log.metric({"kind": "eval", "step": step, "epoch": round(step / run.steps_per_epoch, 4),
                        "train_seconds": round(train_seconds, 2), **metrics})
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                          if k.endswith(("top1", "top5", "loss")))
        run.log.info(f"epoch {step / run.steps_per_epoch:.2f} step {step}/{run.total_steps}: {shown} "
                     f"({train_seconds:.0f} s training)")
    improved = bool(metrics) and (best is None or final_view.get("top1", -1) > best.get("top1", -1))
    if improved:
        best = {**final_view, "step": step}
    save_run_state(run, "last.pt", step, best)
    if improved:
        save_run_state(run, "best.pt", step, best)
    D.barrier()
    return final_view, best


def _save_final(run: Run, metrics: dict | None) -> tuple[Path | None, nn.Module]:
    """The final model (EMA weights when EMA is on) in the vitlab format, with preprocessing and class names;
    returns (its path on rank 0, the exported module)."""
    trained = run.ema.module if run.ema is not None else full_model(run, "cpu")  # FSDP: a collective
    module = run.objective.export(trained)
    if not run.info.is_main:
        return None, module
    from ..checkpoints import save

    meta = {"train_config": run.config.to_dict(), "metrics": metrics or {}, "steps": run.total_steps}
    on_device = run.device.type != "cpu"
    path = save(module.cpu() if on_device else module, run.run_dir / "model.safetensors",
                preprocessing=run.preprocessing, metadata=meta,
                class_names=run.class_names if run.objective.saves_class_names else None)
    if on_device:
        module.to(run.device)
    return Path(path), module


def _describe(run: Run, train_flops: float) -> None:
    cfg, log, mc = run.config, run.log, run.model_cfg
    n_params = sum(p.numel() for p in run.model.parameters())
    log.info(f"run folder: {run.run_dir}")
    log.info(f"data: {cfg.data} ({len(run.train_set):,} train images, {len(run.class_names)} classes"
             + (f", {len(run.eval_set):,} evaluation images" if run.eval_set is not None else "") + ")")
    if hasattr(mc, "patch_size"):
        shape = (f"patch {mc.patch_size[0]}, {mc.num_patches + mc.num_prefix_tokens} tokens, width "
                 f"{mc.embed_dim}, depth {mc.depth}")
    else:  # a convolutional baseline (BiT ResNet-v2)
        shape = f"ResNet-v2 stages {tuple(mc.layers)}, width x{mc.width_factor}"
    log.info(f"model: {cfg.model} {mc.img_size[0]}x{mc.img_size[1]}, {shape}, {n_params:,} parameters, "
             f"{run.macs / 1e6:.1f} M MACs per image forward")
    log.info(f"training: {run.total_steps} steps ({run.total_steps / run.steps_per_epoch:.2f} epochs) of "
             f"{cfg.batch_size} images, {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule} warmup {run.warmup_steps}"
             f", {train_flops / 1e12:.1f} TFLOPs in total (6 x MACs x images); {run.info.world_size} process(es) on "
             f"{run.device}, {run.precision}, {torch.get_num_threads()} threads")


def _start(config: TrainConfig, resume: str | Path | None):
    """(config, distributed info, run folder, resume state and path): the stored config of a resumed run, with the
    runtime-only settings of this call."""
    state = path = None
    if resume is not None:
        path = checkpoint_path(resume)
        state = load_train_state(path)
        stored = TrainConfig.from_dict(state["train_config"])
        # runtime-only settings may differ on the resumed run; everything that shapes the result may not
        config = stored.replace(device=config.device, threads=config.threads, progress=config.progress,
                                num_workers=config.num_workers)
    info = D.setup(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if path is not None:
        run_dir = path.parent.parent
    elif info.is_main:
        run_dir = new_run_dir(config.out_dir, config.run_name or default_run_name(config.data, config.model))
    else:
        run_dir = None
    return config, info, D.broadcast_object(run_dir), state, path


def _train(config: TrainConfig, info: D.DistInfo, run_dir: Path | None, log: RunLog, state: dict | None,
           state_path: Path | None, objective, t_start: float) -> TrainResult:
    run = build_run(config, info, run_dir, log, objective)
    cfg = run.config
    skipped = _Skipped(log)
    step, best = restore_run_state(run, state, state_path) if state is not None else (0, None)
    if state is None:
        log.write_json("config.json", cfg.to_dict())
    train_flops = 6.0 * run.train_macs * run.total_steps * cfg.batch_size
    _describe(run, train_flops)
    bad_streak, train_seconds, last_eval = 0, 0.0, None
    step_log = StepLog(run, step)
    while step < run.total_steps:
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        micro_batches = run.loader.epoch(epoch, in_epoch * cfg.accum_steps)
        for _ in range(in_epoch, min(run.steps_per_epoch, in_epoch + run.total_steps - step)):
            t0 = time.perf_counter()
            out = train_step(run, micro_batches, step)
            train_seconds += time.perf_counter() - t0
            if out.skipped:
                skipped(out.skipped)
            if out.stepped:
                bad_streak = 0
            else:
                bad_streak += 1
                log.warning(f"step {step}: non-finite loss or gradients ({out.loss.item():.4g}); step skipped")
                if bad_streak >= cfg.max_bad_steps:
                    raise VitlabError(
                        f"training diverged: {bad_streak} non-finite steps in a row at step {step} (lr "
                        f"{out.lr:.3g}); lower lr, raise warmup, set grad_clip=1 or use precision=fp32, then "
                        "--resume from the last checkpoint")
            step += 1
            step_log.update(step, out)
            if step % run.eval_interval == 0 or step == run.total_steps:
                last_eval, best = _evaluate_and_save(run, step, best, train_seconds, skipped)
                step_log.restart_clock()
            elif cfg.save_every_steps and step % cfg.save_every_steps == 0:
                save_run_state(run, "last.pt", step, best)
    step_log.close()
    if last_eval is None:  # resumed exactly at the end
        last_eval, best = _evaluate_and_save(run, step, best, train_seconds, skipped)
    model_path, module = _save_final(run, last_eval)
    result = TrainResult(
        run_dir=run.run_dir, metrics=last_eval or {}, best=best, steps=step, epochs=step / run.steps_per_epoch,
        train_seconds=train_seconds, total_seconds=time.perf_counter() - t_start, train_flops=train_flops,
        model_path=model_path, model=module, skipped_files=skipped.total)
    log.write_json("result.json", {
        "metrics": result.metrics, "best": result.best, "steps": result.steps, "epochs": result.epochs,
        "train_seconds": result.train_seconds, "total_seconds": result.total_seconds,
        "train_flops": train_flops, "forward_macs_per_image": run.macs, "skipped_files": skipped.total,
        "world_size": info.world_size, "device": str(run.device), "precision": run.precision,
        "threads": torch.get_num_threads(), "model_path": str(model_path) if model_path else None})
    if skipped.total:
        log.warning(f"{skipped.total} image file(s) skipped in total (named above and in log.txt)")
    return result


def train(config: TrainConfig, *, resume: str | Path | None = None, objective=None) -> TrainResult:
    """Train (or fine-tune, with ``config.init_from``) a ViT as ``config`` says and return the result.

    ``resume``: a run folder or a ``last.pt``/``best.pt`` file; the run continues in its folder with its stored
    config (runtime settings such as device and threads may change) and ends with the same weights as a run that
    was never interrupted (with the same number of processes).

    ``objective`` replaces classification (:class:`~vitlab.train.objectives.Classification`) by another training
    objective, a :class:`~vitlab.train.objectives.Objective` such as self-supervised pre-training
    (:class:`vitlab.selfsup.MaskedPatchObjective`): ``wrap(model, preprocessing)`` gives the module to train,
    ``loss(output, labels)`` the loss from its output, ``evaluate(module, batches, device, ...)`` the evaluation
    metrics (with ``top1`` for choosing the best checkpoint) and ``export(module)`` the model saved at the end. A
    resumed run needs the same objective."""
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    log = None
    try:
        config, info, run_dir, state, state_path = _start(config, resume)
        log = RunLog(run_dir, enabled=info.is_main)
        return _train(config, info, run_dir, log, state, state_path, objective, t_start)
    finally:
        if log is not None:
            log.close()
        D.teardown()
        torch.set_num_threads(threads)  # the thread count is process-wide; leave it as the caller had it
