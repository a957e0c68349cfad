"""The training loop: ``train(config) -> TrainResult``.

One function drives single-process and ``torchrun`` runs alike. :func:`~vitlab.train.run.build_run` builds the data,
the model, the optimiser and the rest once; then each step is :func:`~vitlab.train.step.train_step` (forward /
backward over the micro-batches, clip, step, schedule, EMA), :class:`~vitlab.train.progress.StepLog` logs, and at
each evaluation point the objective measures the model and the ``last`` and ``best`` checkpoints are written
(:mod:`vitlab.train.checkpoint`). Every random draw comes from (seed, position) (see :mod:`vitlab.data.loaders`; the
global torch generator is re-seeded from (seed, step, micro-batch) before each micro-batch, which fixes dropout and
mixup), so a run resumed from a checkpoint continues exactly where the interrupted one was.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import save
from ..compute.bench import measure_gemm_rate
from ..data import ArrayDataset
from ..data.loaders import folder_eval_batches, in_memory_eval_batches
from ..errors import Stopped, VitlabError
from ..models import has_tokens
from ..models.lora import has_lora
from . import distributed as D
from .checkpoint import full_model, load_train_state, restore_run_state, save_run_state
from .config import TrainConfig
from .distill import Distillation
from .lora import save_lora
from .progress import StepLog
from .run import Run, build_run
from .runfolder import RunFolder, RunLock, disagreement, early_stop_due, launch_ids, shared_wait, unseen_folder
from .runlog import RunLog, default_run_name, new_run_dir, read_metrics
from .step import train_step
from .stop import RunStopped, StopSignals
from .transfer import source_model_name


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
    data_seconds: float = 0.0        # of train_seconds, the time spent waiting for batches (rank 0)
    stopped_early: bool = False      # early_stop ended it before its length (best: the evaluation it kept)


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
    modules = {"": full_model(run, run.device)} | ({"ema_": run.ema.module} if run.ema is not None else {})
    metrics: dict = {}
    for prefix, module in modules.items():
        result = run.objective.evaluate(module, _eval_batches(run), run.device, precision=run.precision,
                                        on_skipped=on_skipped)
        metrics.update({f"{prefix}{k}": v for k, v in result.items()})
    return metrics


def _eval_batches(run: Run):
    """This process's share of the evaluation set, prepared with the run's preprocessing."""
    cfg, info = run.config, run.info
    if isinstance(run.eval_set, ArrayDataset):
        return in_memory_eval_batches(run.eval_set, run.preprocessing, cfg.eval_batch_size, info.rank,
                                      info.world_size, run.device)
    return folder_eval_batches(run.eval_set, run.preprocessing, cfg.eval_batch_size, info.rank, info.world_size,
                               cfg.num_workers, run.device)


def _evaluate_teacher(run: Run, on_skipped) -> None:
    """Distillation: the teacher's own accuracy on the evaluation data, logged once when a run starts, so that a
    teacher that does not fit the data (other classes in the same number, other preprocessing) shows before the
    training is spent on it."""
    if run.eval_set is None or not isinstance(run.objective, Distillation):
        return
    result = run.objective.evaluate(run.objective.teacher_module(run.device), _eval_batches(run), run.device,
                                    precision=run.precision, on_skipped=on_skipped)
    run.log.metric({"kind": "teacher", "step": 0, **result})  # (result.json repeats it, trackers get teacher/top1)
    run.log.info(f"teacher {run.objective.source}: test top-1 {100 * result['top1']:.2f}% (top-5 "
                 f"{100 * result.get('top5', float('nan')):.2f}%) on {result['samples']:,} evaluation images")


def _teacher_metrics(run: Run) -> dict | None:
    """The distillation teacher's own evaluation, as logged when the run started (None without a teacher or
    evaluation data; read back from ``metrics.jsonl``, so a resumed run keeps it)."""
    if not isinstance(run.objective, Distillation) or run.run_dir is None:
        return None
    rows = [r for r in read_metrics(RunFolder(run.run_dir).metrics) if r.get("kind") == "teacher"]
    return {k: v for k, v in rows[-1].items() if k not in ("kind", "step")} if rows else None


def _evaluate_and_save(run: Run, step: int, best: dict | None, times: dict, on_skipped):
    """Evaluate, log, write ``best.pt`` (when top-1 improved) and then ``last.pt`` (so a kill between the two is
    repaired by the resumed run, which evaluates again); returns (the final model's metrics: the EMA model's with
    EMA on, the best so far). ``times``: the run's time so far."""
    metrics = evaluate_run(run, on_skipped)
    final_view = None
    train_seconds = times.get("train_seconds", 0.0)
    if metrics:
        prefix = "ema_" if run.ema is not None else ""
        final_view = {k.removeprefix(prefix): v for k, v in metrics.items()
                      if k.startswith(prefix) and (prefix or not k.startswith("ema_"))}
        run.log.metric({"kind": "eval", "step": step, "epoch": round(step / run.steps_per_epoch, 4),
                        "train_seconds": round(train_seconds, 2), **metrics})
        names = ("top1", "top5", "loss", "map_macro", "map_micro")
        if run.config.class_weights != "none" or run.config.sampling != "uniform":  # what balancing is for
            names += ("mean_class_accuracy",)
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                          if k.endswith(names))
        run.log.info(f"epoch {step / run.steps_per_epoch:.2f} step {step}/{run.total_steps}: {shown} "
                     f"({train_seconds:.0f} s training)")
    improved = bool(metrics) and (best is None or run.objective.better(final_view, best))
    if improved:
        best = {**final_view, "step": step}
        save_run_state(run, RunFolder.BEST, step, best, times)
    save_run_state(run, RunFolder.LAST, step, best, times)
    D.barrier()
    return final_view, best


def _save_final(run: Run, metrics: dict | None) -> tuple[Path | None, nn.Module]:
    """The final model (EMA weights when EMA is on) in the vitlab format, with preprocessing and class names;
    returns (its path on rank 0, the exported module)."""
    trained = run.ema.module if run.ema is not None else full_model(run, "cpu")  # FSDP: a collective
    module = run.objective.export(trained)
    if not run.info.is_main:
        return None, module

    meta = {"train_config": run.config.to_dict(), "metrics": metrics or {}, "steps": run.total_steps}
    if hasattr(run.objective, "loss_name"):  # what predict / serve turn the logits into (softmax or sigmoid)
        meta.update(loss=run.objective.loss_name, multi_label=run.objective.multi_label)
    on_device = run.device.type != "cpu"
    class_names = run.class_names if run.objective.saves_class_names else None
    if has_lora(module):  # the adapter alone (and the merged model with merge_lora)
        path = save_lora(module.cpu() if on_device else module, run.run_dir, run.config, run.preprocessing,
                         class_names, meta)
    else:
        path = save(module.cpu() if on_device else module, RunFolder(run.run_dir).model,
                    preprocessing=run.preprocessing, metadata=meta, class_names=class_names)
    if on_device:
        module.to(run.device)
    return Path(path), module


# the share of the measured matrix-product rate a CPU training step reaches (docs/performance.md: 13-59% for
# Ti/16 to B/16 inference on the 2-core Xeon; backward passes are less efficient): the estimate's assumption
CPU_TRAIN_UTILISATION = 0.3
LONG_CPU_RUN_SECONDS = 15 * 60


def cpu_cost(train_flops: float, eval_flops: float, rate: float, suggest_preset: bool = False) -> tuple[bool, str]:
    """(whether to warn, the line) for a run on the CPU: its FLOPs and the time they take at
    :data:`CPU_TRAIN_UTILISATION` of ``rate`` (the measured matrix-product FLOP/s); a warning above 15 minutes, with
    the ways to a CPU-sized run (``suggest_preset``: the ``finetune-cpu`` recipe, for a fine-tune larger than it)."""
    seconds = (train_flops + eval_flops) / (CPU_TRAIN_UTILISATION * rate)
    if seconds >= 2 * 86400:
        shown = f"{seconds / 86400:.0f} days"
    else:
        shown = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(1, round(seconds / 60))} min"
    line = (f"cost on this CPU: {train_flops / 1e12:.1f} TFLOPs training + {eval_flops / 1e12:.1f} TFLOPs evaluation, "
            f"about {shown} (at {CPU_TRAIN_UTILISATION:.0%} of the measured {rate / 1e9:.0f} GFLOP/s matrix-product "
            "rate)")
    if seconds <= LONG_CPU_RUN_SECONDS:
        return False, line
    ways = []
    if suggest_preset:
        ways.append("--recipe finetune-cpu (150 steps of 16 images at 160 px)")
    if train_flops >= eval_flops:
        ways.append("fewer --steps, a smaller --img-size or --batch-size")
    else:  # the evaluation set costs more than the training
        ways.append("a smaller evaluation set (--val-data, or --set holdout=N to evaluate on N held-out training "
                    "images)")
    return True, f"{line}; for a CPU-sized run use " + ", or ".join(ways)


def _evaluations(run: Run) -> int:
    """How many times the run evaluates its evaluation set (each eval_every_epochs, and at the end)."""
    if run.eval_set is None or not hasattr(run.eval_set, "__len__"):  # streamed shards: count unknown
        return 0
    epochs = run.total_steps / run.steps_per_epoch
    every = run.config.eval_every_epochs
    return 1 + (math.floor(epochs / every) if every > 0 else 0)


def _describe(run: Run, train_flops: float) -> None:
    cfg, log, mc = run.config, run.log, run.model_cfg
    n_params = sum(p.numel() for p in run.model.parameters())
    log.info(f"run folder: {run.run_dir}")
    classes = f", {len(run.class_names)} classes" if run.class_names else ""  # none: captions, self-supervision
    log.info(f"data: {cfg.data} ({len(run.train_set):,} train images{classes}"
             + (f", {len(run.eval_set):,} evaluation images" if run.eval_set is not None else "") + ")")
    if has_tokens(mc):
        shape = (f"patch {mc.patch_size[0]}, {mc.num_patches + mc.num_prefix_tokens} tokens, width "
                 f"{mc.embed_dim}, depth {mc.depth}")
    else:  # a convolutional baseline (BiT ResNet-v2)
        shape = f"ResNet-v2 stages {tuple(mc.layers)}, width x{mc.width_factor}"
    # what is really trained: the registered name, or for fine-tuning the checkpoint and its architecture
    name = f"{cfg.init_from} ({type(mc).__name__.removesuffix('Config') or 'model'})" if cfg.init_from else cfg.model
    log.info(f"model: {name} {mc.img_size[0]}x{mc.img_size[1]}, {shape}, {n_params:,} parameters, "
             f"{run.macs / 1e6:.1f} M MACs per image forward")
    log.info(f"training: {run.total_steps} steps ({run.total_steps / run.steps_per_epoch:.2f} epochs) of "
             f"{cfg.batch_size} images, {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule} warmup {run.warmup_steps}"
             f", {train_flops / 1e12:.1f} TFLOPs in total (6 x MACs x images"
             + (", + 2 x the teacher's" if run.teacher_macs else "") + f"); {run.info.world_size} process(es) on "
             f"{run.device}, {run.precision}, {torch.get_num_threads()} threads")
    if run.device.type == "cpu" and run.info.is_main:
        evaluations = _evaluations(run)
        eval_flops = 2.0 * run.macs * len(run.eval_set) * evaluations if evaluations else 0.0
        rate = measure_gemm_rate(run.device, size=1024, repeats=3)["peak"] * run.info.world_size
        larger_than_preset = cfg.steps is None or cfg.steps * cfg.batch_size > 2400 or max(mc.img_size) > 160
        # the estimate counts the work done: checkpointing runs the student's forward again (6 -> 8 x MACs)
        work = train_flops + (2.0 * run.train_macs * run.total_steps * cfg.batch_size if cfg.grad_checkpointing else 0)
        warn, line = cpu_cost(work, eval_flops, rate, bool(cfg.init_from) and larger_than_preset)
        (log.warning if warn else log.info)(line)


AUTO = "auto"  # resume="auto": continue the run's folder when it has a checkpoint, start fresh otherwise


@dataclass
class _Start:
    """What :func:`_start` settles before the run is built."""

    config: TrainConfig
    info: D.DistInfo
    run_dir: Path | None
    state: dict | None = None
    state_path: Path | None = None
    created: bool = False            # this call made the run folder (removed again if the run never takes a step)
    lock: RunLock | None = None
    length_changed: bool = False     # a resumed run told to train longer (config.json is rewritten)
    reuse: Path | None = None        # resume="auto" with no checkpoint yet: the folder to start fresh in
    stepped: bool = False            # set by the loop after the first step
    stop: StopSignals | None = None  # a scheduler's stop signals, recorded while the run trains


def _resolve(config: TrainConfig, resume: str | Path | None, epochs, steps):
    """(config, state, checkpoint path, its RunFolder, the folder to start fresh in, whether the length changed): a
    resumed run takes its stored config, with the runtime-only settings of this call and its new length."""
    state = path = reuse = folder = None
    changed = False
    if isinstance(resume, str) and resume == AUTO:
        resume, reuse, epochs, steps = _auto_resume(config, epochs, steps)
    if resume is not None:
        path = RunFolder.resume_checkpoint(resume)
        state = load_train_state(path)
        folder = RunFolder.of_checkpoint(path, state["train_config"])  # refuses a folder it cannot identify
        config = RunFolder.resumed_config(TrainConfig.from_dict(state["train_config"]), config)
        config, changed = folder.resume_length(config, state, epochs, steps)
    elif epochs is not None or steps is not None:
        raise VitlabError("epochs= and steps= of train() make a resumed run longer; set them in the config")
    if resume is None and config.init_from:  # the run folder and config.json name the model actually trained
        config = config.replace(model=source_model_name(config.init_from) or config.model)
    return config, state, path, folder, reuse, changed


def _agreed(info: D.DistInfo, config: TrainConfig, resume, epochs, steps):
    """:func:`_resolve` on every process; several processes compare what they found (each node reads the run folder
    itself) and all raise the same line naming the nodes that differ, instead of one failing and the rest hanging."""
    try:
        resolved, failure = _resolve(config, resume, epochs, steps), None
    except Exception as exc:
        resolved, failure = None, exc
    if info.distributed:
        if failure is not None:
            found = f"stops ({failure})" if isinstance(failure, VitlabError) else f"fails ({type(failure).__name__})"
        else:
            path, state, reuse = resolved[2], resolved[1], resolved[4]
            found = (f"resumes {path} at step {state['step']}" if path is not None else
                     f"starts the run in {reuse}" if reuse is not None else "starts a new run")
        message = disagreement(D.gather_object((found, D.node_name())))
        if message and (failure is None or isinstance(failure, VitlabError)):
            raise VitlabError(message, options=("out_dir",)) from None
    if failure is not None:
        raise failure
    return resolved


def _start(config: TrainConfig, resume: str | Path | None, epochs=None, steps=None) -> _Start:
    """The distributed setup and the run folder (made, or identified and checked for a resume) and its lock,
    checked to be the same folder on every node."""
    info = D.setup(config.device)  # first: the processes compare what they find before anything is written
    config, state, path, folder, reuse, changed = _agreed(info, config, resume, epochs, steps)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    start = _Start(config, info, None, state, path, length_changed=changed, reuse=reuse)
    outcome = None
    if info.is_main:
        try:
            if path is not None:
                start.run_dir = folder.path
            elif reuse is not None:  # the fixed name (or this launch's folder) with no checkpoint yet
                start.created = not reuse.exists()
                start.run_dir = reuse
                try:
                    reuse.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise VitlabError(f"out_dir={config.out_dir}: cannot create the run folder {reuse} "
                                      f"({exc.strerror or exc})", options=("out_dir",)) from None
            else:
                start.run_dir = new_run_dir(config.out_dir,
                                            config.run_name or default_run_name(config.data, config.model))
                start.created = True
            start.lock = RunLock(start.run_dir).acquire()
            if path is None:  # what identifies the folder as a run folder; written before anything else
                with RunLog(start.run_dir, enabled=True, console=False) as first:
                    first.write_json(RunFolder.CONFIG, config.to_dict())
                    if launch_ids():  # how a restarted or requeued launch finds this folder again
                        first.write_json(RunFolder.LAUNCH, launch_ids())
            outcome = ("ok", start.run_dir, RunFolder(start.run_dir).write_token() if info.distributed else None)
        except VitlabError as exc:
            _abandon(start)
            if info.world_size == 1:
                raise
            outcome = ("error", str(exc))
    outcome = D.broadcast_object(outcome)
    if outcome[0] == "error":
        raise VitlabError(outcome[1])
    start.run_dir = outcome[1]
    if info.distributed:
        _check_shared(start, outcome[2])
    return start


def _check_shared(start: _Start, token: str) -> None:
    """Every process reads back the token rank 0 wrote into the run folder; when a node cannot see the folder, every
    process raises the same line naming it (rank 0 writes all checkpoints there, so it must be shared)."""
    folder = RunFolder(start.run_dir)
    views = D.gather_object((folder.sees_token(token, shared_wait()), D.node_name()))
    if start.info.is_main:
        folder.remove_token()
    if message := unseen_folder(folder.path, views):
        _abandon(start)
        raise VitlabError(message, options=("out_dir",))


def _auto_resume(config: TrainConfig, epochs, steps):
    """``resume="auto"``: (the checkpoint to resume from or None, the folder to start fresh in or None, epochs,
    steps). The run's length comes from ``config`` (a longer one makes a resumed run longer)."""
    if epochs is not None or steps is not None:
        raise VitlabError("resume='auto' takes the run's length from the config; epochs= and steps= are for a named "
                          "resume")
    folder = RunFolder.auto(config.out_dir, config.run_name, config.to_dict())
    last = folder.last if folder is not None else None
    if last is None or not last.is_file():
        return None, folder.path if folder is not None else None, None, None
    if config.steps:
        return last, None, None, config.steps
    return last, None, config.epochs, None


def _abandon(start: _Start) -> None:
    """Release the run folder's lock; remove the folder this call made when the run never took a step."""
    if start.lock is not None:
        start.lock.release()
        start.lock = None
    if start.created and not start.stepped and start.run_dir is not None:
        shutil.rmtree(start.run_dir, ignore_errors=True)
        start.created = False


def _train(start: _Start, log: RunLog, objective, t_start: float) -> TrainResult:
    info, state = start.info, start.state
    run = build_run(start.config, info, start.run_dir, log, objective)
    cfg = run.config
    skipped = _Skipped(log)
    step, best = restore_run_state(run, state, start.state_path) if state is not None else (0, None)
    if state is None and start.reuse is not None and not start.created:
        log.truncate_metrics(0)  # rows of an earlier start that ended before its first checkpoint
    before = dict((state or {}).get("times") or {})
    earlier_train, earlier_total = float(before.get("train_seconds", 0.0)), float(before.get("total_seconds", 0.0))
    earlier_data = float(before.get("data_seconds", 0.0))
    if start.length_changed:
        for factor in run.scheduler.lr_lambdas:  # the schedule runs over the new length from here on
            factor.total = run.total_steps
        for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
            group["lr"] = base * run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
        log.write_json(RunFolder.CONFIG, cfg.to_dict())
        log.info(f"the run goes on to step {run.total_steps} ({run.total_steps / run.steps_per_epoch:.2f} epochs); "
                 "the learning-rate schedule is stretched to the new length")
    # the student's forward and backward, and the teacher's forward when distilling
    train_flops = (6.0 * run.train_macs + 2.0 * run.teacher_macs) * run.total_steps * cfg.batch_size
    _describe(run, train_flops)
    if state is None:
        _evaluate_teacher(run, skipped)
    train_seconds, data_seconds = 0.0, 0.0

    def times() -> dict:
        return {"train_seconds": earlier_train + train_seconds,
                "total_seconds": earlier_total + time.perf_counter() - t_start,
                "data_seconds": earlier_data + data_seconds}

    save_interval = max(1, int(round(cfg.save_every_epochs * run.steps_per_epoch))) if cfg.save_every_epochs else 0
    last_save = time.monotonic()
    step_log = StepLog(run, step)
    if start.stop is not None:  # only while steps run: a process stuck elsewhere still ends on SIGTERM
        start.stop.install()
    stopped_early, last_eval = False, None
    while step < run.total_steps and not stopped_early:
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        micro_batches = run.loader.epoch(epoch, in_epoch * cfg.accum_steps)
        for _ in range(in_epoch, min(run.steps_per_epoch, in_epoch + run.total_steps - step)):
            t0 = time.perf_counter()
            out = train_step(run, micro_batches, step)
            train_seconds += time.perf_counter() - t0
            data_seconds += out.data_seconds
            start.stepped = True
            if out.skipped:
                skipped(out.skipped)
            step += 1
            step_log.update(step, out)  # logs skipped steps and stops a diverged run (read back when it logs)
            if step == run.total_steps:
                break  # the end: checkpoint and model first, then the final evaluation (below)
            if start.stop is not None and (signum := start.stop.agreed()):
                _stop(run, signum, step, best, times())
            if step % run.eval_interval == 0:
                last_eval, best = _evaluate_and_save(run, step, best, times(), skipped)
                last_save = time.monotonic()
                step_log.restart_clock()
                if early_stop_due(cfg, run.eval_interval, step, best):
                    stopped_early = True
                    shown = (f"top-1 {100 * best['top1']:.2f}%" if "top1" in best else
                             f"loss {best.get('loss', float('nan')):.4f}")  # (MAE pre-training keeps the lowest loss)
                    log.info(f"early stop at step {step}/{run.total_steps} (epoch {step / run.steps_per_epoch:.2f}):"
                             f" no evaluation has beaten the best for {cfg.early_stop} evaluations; the best, {shown} "
                             f"at step {best['step']}, is in checkpoints/best.pt")
                    break
            elif _save_due(run, step, save_interval, last_save):
                save_run_state(run, RunFolder.LAST, step, best, times())
                last_save = time.monotonic()
    if start.stop is not None:
        start.stop.restore()
    step_log.close()
    if not stopped_early:  # (an early stop has just evaluated and saved this step)
        # an error or a kill in the final evaluation loses nothing: the final state and model are on disk first
        save_run_state(run, RunFolder.LAST, step, best, times())
        _save_final(run, None)
        last_eval, best = _evaluate_and_save(run, step, best, times(), skipped)
    model_path, module = _save_final(run, last_eval)
    elapsed = times()
    result = TrainResult(
        run_dir=run.run_dir, metrics=last_eval or {}, best=best, steps=step, epochs=step / run.steps_per_epoch,
        train_seconds=elapsed["train_seconds"], total_seconds=elapsed["total_seconds"], train_flops=train_flops,
        model_path=model_path, model=module, skipped_files=skipped.total, data_seconds=elapsed["data_seconds"],
        stopped_early=stopped_early)
    log.result({
        "metrics": result.metrics, "best": result.best, "steps": result.steps, "epochs": result.epochs,
        "stopped_early": stopped_early,
        "train_seconds": result.train_seconds, "total_seconds": result.total_seconds,
        "data_seconds": result.data_seconds,
        "train_flops": train_flops, "forward_macs_per_image": run.macs, "skipped_files": skipped.total,
        "teacher": _teacher_metrics(run),
        "world_size": info.world_size, "device": str(run.device), "precision": run.precision,
        "threads": torch.get_num_threads(), "model_path": str(model_path) if model_path else None})
    if skipped.total:
        log.warning(f"{skipped.total} image file(s) skipped in total (named above and in log.txt)")
    return result


def _stop(run: Run, signum: int, step: int, best: dict | None, times: dict) -> None:
    """A stop signal reached the run: write ``last.pt``, log one line and raise :class:`RunStopped`."""
    save_run_state(run, RunFolder.LAST, step, best, times)
    name = signal.Signals(signum).name
    message = (f"stopped by {name} at step {step}/{run.total_steps} (epoch {step / run.steps_per_epoch:.2f}): "
               f"{RunFolder(run.run_dir).last} written; the same command with --resume auto continues")
    run.log.warning(message)
    raise RunStopped(message, step, name)


def _peer_lost(start: _Start, log: RunLog | None, lost: list[int]) -> None:
    """Another process ended (killed, out of memory, its own error): one line from the lowest surviving rank in place
    of the failed collective's traceback on every survivor; raises :class:`~vitlab.errors.Stopped`."""
    me, world = start.info.rank, start.info.world_size
    message = (f"rank {', '.join(map(str, lost))} of {world} ended (killed, out of memory or its own error: its "
               f"output says which); rank {me} stops too")
    says_it = me == min(set(range(world)) - set(lost))
    logged = says_it and log is not None and log.enabled
    if logged:  # rank 0: on stderr and in log.txt
        log.warning(message)
    raise Stopped(message, shown=logged or not says_it) from None


def _save_due(run: Run, step: int, save_interval: int, last_save: float) -> bool:
    """Whether ``last.pt`` is due between evaluations: every ``save_every_steps`` steps, every
    ``save_every_epochs`` epochs, and when ``save_every_minutes`` have passed since the last save (decided by rank
    0: checked every step with one process, every ``log_every_steps`` steps with several)."""
    cfg = run.config
    if (cfg.save_every_steps and step % cfg.save_every_steps == 0) or (save_interval and step % save_interval == 0):
        return True
    if not cfg.save_every_minutes:
        return False
    if run.info.world_size == 1:
        return time.monotonic() - last_save >= 60.0 * cfg.save_every_minutes
    if step % cfg.log_every_steps:
        return False
    return bool(D.broadcast_object(time.monotonic() - last_save >= 60.0 * cfg.save_every_minutes))


def train(config: TrainConfig, *, resume: str | Path | None = None, objective=None, epochs: float | None = None,
          steps: int | None = None) -> TrainResult:
    """Train (or fine-tune, with ``config.init_from``) a ViT as ``config`` says and return the result.

    ``resume``: a run folder or a ``last.pt``/``best.pt`` file in its ``checkpoints/``; the run continues in its
    folder with its stored config (runtime settings such as device, threads and workers may change) and ends with
    the same weights as a run that was never interrupted (with the same number of processes). Only a folder that is
    positively a vitlab run folder is written to (:mod:`vitlab.train.runfolder`), one process at a time. A finished
    run raises :class:`RunFinished` and changes nothing, unless ``epochs`` or ``steps`` make it longer (the
    learning-rate schedule is then stretched to the new length).

    ``resume="auto"``: continue from the last checkpoint when there is one, start fresh otherwise, with the same
    ``config`` both times (what a job script that may be restarted or requeued runs). The folder is
    ``out_dir/run_name``, or without a fixed name the one this launch made (same torchrun rendezvous id or SLURM job
    id). Under torchrun's elastic restarts (``TORCHELASTIC_RESTART_COUNT`` > 0) every process resumes this way.

    ``objective`` replaces classification (:class:`~vitlab.train.objectives.Classification`) by another training
    objective, a :class:`~vitlab.train.objectives.Objective` such as self-supervised pre-training
    (:class:`vitlab.selfsup.MaskedPatchObjective`): ``wrap(model, preprocessing)`` gives the module to train,
    ``loss(output, labels)`` the loss from its output, ``evaluate(module, batches, device, ...)`` the evaluation
    metrics (with ``top1`` for choosing the best checkpoint) and ``export(module)`` the model saved at the end. A
    resumed run needs the same objective."""
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        resume = AUTO  # torchrun restarted the processes: every one joins the run (folder and step) it was in
    log = start = None
    peers_gone = False
    try:
        stop = StopSignals()
        start = _start(config, resume, epochs, steps)
        start.stop = stop
        log = RunLog(start.run_dir, enabled=start.info.is_main, config=start.config, info=start.info)
        return _train(start, log, objective, t_start)
    except RuntimeError as exc:
        if start is None or not start.info.distributed:
            raise
        with StopSignals():  # torchrun stops the survivors (SIGTERM) as soon as a process ends: say who first
            lost = D.lost_ranks(exc)
        if not lost:
            raise
        peers_gone = True
        _peer_lost(start, log, lost)
    finally:
        if start is not None and start.stop is not None:
            start.stop.restore()
        if log is not None:
            log.close()
        if start is not None:
            _abandon(start)  # a run folder made by this call and never stepped in goes again
        D.teardown(wait_for_peers=not peers_gone)
        torch.set_num_threads(threads)  # the thread count is process-wide; leave it as the caller had it
