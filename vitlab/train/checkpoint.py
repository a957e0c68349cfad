"""Training-state checkpoints written atomically and read back with ``torch.load(weights_only=True)``.

``last.pt`` and ``best.pt`` in the run's ``checkpoints/`` folder hold everything a resumed run needs: model, EMA,
optimiser and scheduler state, fp16's loss scale, the step, the data position, the RNG states and the config. They
are written to a temporary file in the same folder, flushed to disk (fsync) and moved over the old file with
``os.replace``, so a run killed during the write keeps its previous checkpoint intact. :func:`save_run_state` /
:func:`restore_run_state` write and read a run's state; :func:`full_model` is the one place the FSDP shards are
gathered into a plain model.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path, remove_stale_temporaries
from ..checkpoints.adapter import base_record, checkpoint_sha256
from ..checkpoints.files import read_torch, sniff
from ..errors import VitlabError
from ..factory import checkpoint_location
from ..models.lora import add_lora, has_lora
from . import distributed as D
from .runfolder import RunFolder

STATE_FORMAT = "vitlab-train-state"
STATE_VERSION = 1


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`vitlab.atomic.atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict:
    """The global RNG states (Python, numpy's legacy generator as a plain dict, torch CPU and CUDA)."""
    np_state = np.random.get_state(legacy=False)
    # numpy's MT19937 key as a tensor: weights_only loading accepts tensors and plain numbers, not numpy arrays
    numpy_state = {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                   "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                   "gauss": float(np_state["gauss"])}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_train_state(path: str | Path) -> dict:
    """Read a training-state file safely (``weights_only=True``) and check that it is one."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"{path}: no such checkpoint")
    try:
        kind = sniff(path)  # HTML pages, pickles, lying archives: refused from their bytes, before torch.load
        if kind not in ("torch-zip", "torch-legacy"):
            raise VitlabError(f"{path}: a {kind} file, not a torch.save file")
        state = read_torch(path)
    except VitlabError as exc:
        raise VitlabError(f"not a readable vitlab training checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise VitlabError(f"{path}: not a vitlab training checkpoint (use `vitlab finetune --from` for model files)")
    if state.get("version", 0) > STATE_VERSION:
        raise VitlabError(f"{path}: written by a newer vitlab (state version {state['version']})")
    return state


# ----- a run's state (the loop's checkpoints)
def state_module(run) -> nn.Module:
    """The module whose state dict is the model's own: FSDP's sharded module (its state-dict API gathers the
    shards), else the plain model (DDP and the patch-dropout wrapper share its parameters)."""
    return run.trainable if run.config.fsdp else run.model


def full_model(run, device: torch.device | str) -> nn.Module:
    """The trained model as one plain module on ``device``: the model itself, or for FSDP a copy built from the
    gathered full state dict (a collective: every rank calls this, and every rank gets the copy)."""
    if not run.config.fsdp:
        return run.model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # no cpu_offload: with it only rank 0 would receive the full state dict, and every rank evaluates its copy
    full = get_model_state_dict(run.trainable, options=StateDictOptions(full_state_dict=True))
    # the copy's initial weights are overwritten at once: drawing them must not move the run's random stream (a
    # one-process run draws nothing here, and the two must stay equal)
    with torch.random.fork_rng(devices=[]):
        module = type(run.model)(run.model.cfg)
        if has_lora(run.model):  # the same adapters, so that the adapted state dict fits and save_lora sees them
            add_lora(module, run.model.lora_settings)
            module.lora_trained = list(getattr(run.model, "lora_trained", []))
    module = module.to(device)
    module.load_state_dict(full, strict=True)
    for name, param in module.named_parameters():  # what trains, as in the run's model (the adapter file needs it)
        param.requires_grad_(run.model.get_parameter(name).requires_grad)
    return module


def _trained_part(model: nn.Module, state_dict: dict) -> dict:
    """The entries of ``state_dict`` that are trainable parameters of ``model`` or buffers (not frozen weights)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in state_dict.items() if k not in frozen}


def _own_full_state(run) -> dict:
    """The run's model state as one unsharded state dict on every rank (FSDP: a collective)."""
    if not run.config.fsdp:
        return dict(run.model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(run.trainable, options=StateDictOptions(full_state_dict=True))


def save_run_state(run, name: str, step: int, best: dict | None, times: dict | None = None) -> None:
    """Write ``checkpoints/<name>`` of the run folder: everything a resumed run needs (every rank calls this; rank 0
    writes). ``times``: the run's time so far (``train_seconds``, ``total_seconds``, ``data_seconds``), summed over
    resumed segments."""
    model_sd, optim_sd = D.full_state_dicts(state_module(run), run.optimizer)
    if not run.info.is_main:
        return
    lora_base = None
    if has_lora(run.model):  # only what trains: the frozen base is re-read from init_from (its hash checked)
        lora_base = base_record(run.config.init_from, checkpoint_location(run.config.init_from))
        model_sd = _trained_part(run.model, model_sd)
    state = {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "step": step, "epoch": step / run.steps_per_epoch,
        "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
        "model": model_sd,
        "optimizer": optim_sd,
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(),
        "train_config": run.config.to_dict(),
        "vit_config": run.model_cfg.to_dict(),
        "class_names": run.class_names,
        "preprocessing": run.preprocessing.to_dict(),
        "best": best,
        "world_size": run.info.world_size,
        "times": dict(times or {}),
    }
    if run.scaler is not None:  # plain numbers: the scale, its growth factors and the good steps since it changed
        state["scaler"] = run.scaler.state_dict()
    if run.ema is not None:
        state["model_ema"] = {k: v.detach().cpu() for k, v in run.ema.state_dict().items()}
        if lora_base is not None:  # the EMA of a frozen weight is that weight, bit for bit (lerp of equal values)
            state["model_ema"] = _trained_part(run.model, state["model_ema"])
    if lora_base is not None:
        state["lora_base"] = lora_base
    teacher = getattr(run.objective, "teacher_record", None)
    if teacher is not None:  # a distillation teacher is read again on resume: it must be the same file
        state["teacher"] = teacher
    settings = getattr(run.objective, "resume_record", None)
    if settings is not None:  # an objective's own settings (image-text locking): a resumed run must repeat them
        state["objective"] = settings
    atomic_torch_save(state, RunFolder(run.run_dir).checkpoint(name))


def restore_run_state(run, state: dict, path: Path) -> tuple[int, dict | None]:
    """Load a training state into the run's model, optimiser, schedule, EMA and RNGs; returns (step, best)."""
    if state.get("world_size", 1) != run.info.world_size:
        run.log.warning(f"resuming a {state.get('world_size')}-process run with {run.info.world_size} processes: "
                        "the data order differs from an uninterrupted run")
    model_sd, ema_sd = state["model"], state.get("model_ema")
    if "lora_base" in state:  # a LoRA run's state holds what trains; the rest is the base the run has just read
        base, base_path = state["lora_base"], checkpoint_location(run.config.init_from)
        if checkpoint_sha256(base_path) != base["sha256"]:
            raise VitlabError(f"{path}: the LoRA run was trained on {base['name']} (sha256 {base['sha256']}), but "
                              f"{base_path} now has sha256 {checkpoint_sha256(base_path)}; put that base back to "
                              "resume")
        model_sd = {**_own_full_state(run), **model_sd}
        if run.ema is not None:
            ema_sd = {**run.ema.state_dict(), **ema_sd}
    if "teacher" in state:
        want, have = state["teacher"], getattr(run.objective, "teacher_record", None)
        if have is None or have["sha256"] != want["sha256"]:
            now = f"{have['path']} has sha256 {have['sha256']}" if have else "this run has no teacher"
            raise VitlabError(f"{path}: the run was distilled from {want['name']} (sha256 {want['sha256']}), but "
                              f"{now}; put that teacher back to resume")
    want, have = state.get("objective"), getattr(run.objective, "resume_record", None)
    if want != have:
        raise VitlabError(f"{path}: the run was trained with {want or 'no objective settings'}, this resume asks "
                          f"for {have or 'none'}; resume with the same settings")
    D.load_full_state_dicts(state_module(run), run.optimizer, model_sd, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(ema_sd)
    set_rng_state(state["rng"])
    step = int(state["step"])
    run.log.truncate_metrics(step)
    if run.info.is_main:  # what a kill mid-write left: a checkpoint's or the final model's temporary
        remove_stale_temporaries(RunFolder(run.run_dir).checkpoints)
        remove_stale_temporaries(run.run_dir)
    run.log.info(f"resumed from {path} at step {step} (epoch {step / run.steps_per_epoch:.2f})")
    return step, state.get("best")
