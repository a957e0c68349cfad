"""A VTAB-1k-style suite: one protocol over a list of tasks, resumable, with per-task, group and mean scores.

Per task: a seeded random sample of ``train_examples`` (1000) training images, split into ``train_examples -
val_examples`` (800) for training and ``val_examples`` (200) for picking the hyper-parameter; then the chosen setting
is trained on all 1000 and scored on the test split (optionally a seeded subset of it). ``fewshot`` mode fits a probe
on frozen features (the l2 strength, k or weight decay is the tuned value); ``finetune`` mode fine-tunes the whole
model with the VTAB recipe (the learning rate is the tuned value when several are given; with one, the 800 / 200
round is skipped, as the paper fixes lr 0.01).

Each finished task is written to ``<out>/tasks/<name>/result.json`` with a fingerprint of its settings and of the
checkpoint; a rerun skips tasks whose fingerprint matches, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..atomic import write_text_atomic
from ..checkpoints import save
from ..data import build_dataset
from ..errors import VitlabError
from ..evaluate.classification import evaluate_classifier
from ..evaluate.data import class_names_of, with_transform
from ..evaluate.features import extract_features
from ..evaluate.fewshot import labels_of, tuned_probe
from ..evaluate.report import write_json, write_suite_report
from ..models import metadata_of
from ..zeroshot import zero_shot_classifier
from .finetune import finetune_task
from .suite_config import SuiteConfig, TaskConfig

DatasetBuilder = Callable[[str, str, int], Dataset]


def checkpoint_identity(path: str | os.PathLike | None) -> str | None:
    """A string that changes when the checkpoint file changes: resolved path, size and modification time."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return str(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def task_fingerprint(task: TaskConfig, seed: int, model_id: str | None) -> str:
    """sha256 of everything that determines a task's result (its settings, the suite seed, the model)."""
    settings = task.to_dict()
    if task.mode != "zero-shot":  # the prompts change nothing else (and older suites' fingerprints stay valid)
        settings.pop("zero_shot", None)
    blob = json.dumps({"task": settings, "seed": seed, "model": model_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def vtab_split(num_available: int, train_examples: int, val_examples: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the (train_examples - val_examples) training and val_examples validation images, disjoint, drawn
    at random (seeded) from a training split of ``num_available`` images."""
    if num_available < train_examples:
        raise VitlabError(f"the training split has {num_available} images, fewer than train_examples = "
                          f"{train_examples}")
    order = np.random.default_rng(seed).permutation(num_available)[:train_examples]
    cut = train_examples - val_examples
    return order[:cut].tolist(), order[cut:].tolist()


def sample_test_indices(num_available: int, test_examples: int | None, seed: int) -> list[int] | None:
    """A seeded random subset (in increasing order) of ``test_examples`` test images; None means all of them."""
    if test_examples is None or test_examples >= num_available:
        return None
    return sorted(np.random.default_rng(seed + 1).permutation(num_available)[:test_examples].tolist())


def num_classes_of(*datasets: Dataset) -> int:
    """Class count: the class names a data set carries where there are some, else the largest label + 1."""
    for ds in datasets:
        names = class_names_of(ds)
        if names:
            return len(names)
    return int(max(labels_of(ds).max() for ds in datasets)) + 1


def run_fewshot_task(task: TaskConfig, model: nn.Module, train: Dataset, val: Dataset, test: Dataset,
                     num_classes: int, **kwargs) -> dict:
    """Frozen features of the task's images, then the probe tuned on train / val and refitted on both."""
    options = task.fewshot
    extract = lambda ds: extract_features(model, ds, representation=options["representation"],  # noqa: E731
                                          batch_size=options["batch_size"], **kwargs)
    out = tuned_probe(options["method"], extract(train), extract(val), extract(test), num_classes,
                      grid=options["grid"])
    return {"accuracy": out["accuracy"], "chosen": out["chosen"], "param_name": out["param_name"],
            "val_accuracy": out["val_accuracy"], "method": options["method"],
            "representation": options["representation"]}


def run_zero_shot_task(task: TaskConfig, image_text: nn.Module, test: Dataset, test_idx: list[int] | None,
                       **kwargs) -> dict:
    """The image-text model's zero-shot classifier of the test data's class names (:mod:`vitlab.zeroshot`), scored
    on the test images (the ``test_examples`` subset when set); nothing is trained."""
    names = class_names_of(test)
    if not names:
        raise VitlabError(f"{task.data}: a zero-shot task needs data that name their classes")
    templates = task.zero_shot["templates"]
    classifier = zero_shot_classifier(image_text, names, templates).to(kwargs["device"])
    view = with_transform(test, metadata_of(classifier).preprocessing)
    results = evaluate_classifier(classifier, Subset(view, test_idx) if test_idx is not None else view,
                                  batch_size=task.zero_shot["batch_size"], class_names=list(names), **kwargs)
    return {"accuracy": results["top1"], "chosen": len(templates), "param_name": "templates",
            "templates": list(templates)}


def aggregate(config: SuiteConfig, task_results: list[dict], checkpoint: str | None = None) -> dict:
    """The suite's result: tasks in config order, mean accuracy, and group means when the config asks for them."""
    scores = [t["accuracy"] for t in task_results]
    out = {"name": config.name, "checkpoint": checkpoint, "seed": config.seed, "tasks": task_results,
           "mean": statistics.fmean(scores) if scores else None}
    if config.groups:
        groups: dict[str, list[float]] = {}
        for t in task_results:
            groups.setdefault(t["group"], []).append(t["accuracy"])
        out["groups"] = {g: statistics.fmean(v) for g, v in groups.items()}
        out["mean_of_groups"] = statistics.fmean(out["groups"].values()) if groups else None
    return out


def _read_finished(path: Path, fingerprint: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("fingerprint") == fingerprint else None


def run_suite(
    config: SuiteConfig,
    model: nn.Module,
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    dataset_builder: DatasetBuilder | None = None,
    model_id: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    image_text: nn.Module | None = None,
) -> dict:
    """Run (or resume) every task of a suite and write the report into ``out_dir``.

    ``model`` (loaded, with its preprocessing) serves the few-shot tasks; fine-tune tasks start from ``checkpoint``,
    its file (without one the model is saved to ``out_dir/pretrained.safetensors`` first).
    ``dataset_builder(data, split, channels) -> Dataset`` gives raw images (uint8 tensors or PIL images) with labels;
    the default reads named data sets, image folders and shards through :mod:`vitlab.data`. ``model_id`` identifies
    the model for resuming (default: :func:`checkpoint_identity` of ``checkpoint``). Returns the suite result (see
    :func:`aggregate`); per-task results carry ``accuracy``, ``chosen`` (tuned value), ``param_name``,
    ``num_train``, ``num_test``, ``seconds`` and ``resumed``. ``zero-shot`` tasks need ``image_text``, the
    checkpoint's image-text model (:func:`vitlab.load_image_text`): they score its zero-shot classifier of the test
    data's class names, with no training split."""
    out_dir = Path(out_dir)
    builder = dataset_builder or _default_builder
    preprocessing = _preprocessing_of(model)
    if device is None:  # where the model is; fine-tuning runs and scoring use the same device
        device = next(model.parameters()).device
    if model_id is None and checkpoint is not None:
        model_id = checkpoint_identity(checkpoint)
    results = []
    for task in config.tasks:
        fingerprint = task_fingerprint(task, config.seed, model_id)
        task_dir = out_dir / "tasks" / task.name
        finished = _read_finished(task_dir / "result.json", fingerprint)
        if finished is not None:
            log(f"[{task.name}] done before: {100 * finished['accuracy']:.2f}% (skipped)")
            results.append({**finished, "resumed": True})
            continue
        _claim_task_dir(task_dir, fingerprint)
        log(f"[{task.name}] {task.mode} on {task.data} ...")
        start = time.perf_counter()
        zero_shot = task.mode == "zero-shot"  # no training split: the classes' names are the only supervision
        if zero_shot and image_text is None:
            raise VitlabError(f"task {task.name!r}: zero-shot tasks need the checkpoint's image-text model (CLIP, "
                              "SigLIP)")
        raw_train = None if zero_shot else builder(task.data, task.train_split, model.cfg.in_chans)
        raw_test = builder(task.data, task.test_split, model.cfg.in_chans)
        test_idx = sample_test_indices(len(raw_test), task.test_examples, config.seed)
        kwargs = {"device": device, "num_workers": config.num_workers}
        num_train = 0 if zero_shot else task.train_examples
        if zero_shot:
            num_classes = num_classes_of(raw_test)
            outcome = run_zero_shot_task(task, image_text, raw_test, test_idx, **kwargs)
        else:
            train_idx, val_idx = vtab_split(len(raw_train), task.train_examples, task.val_examples, config.seed)
            num_classes = num_classes_of(raw_train, raw_test)
        if task.mode == "fewshot":
            train_view = with_transform(raw_train, preprocessing)
            test_view = with_transform(raw_test, preprocessing)
            outcome = run_fewshot_task(task, model, Subset(train_view, train_idx), Subset(train_view, val_idx),
                                       Subset(test_view, test_idx) if test_idx is not None else test_view,
                                       num_classes, **kwargs)
        elif task.mode == "finetune":
            if checkpoint is None:
                checkpoint = _save_pretrained(model, out_dir)
            outcome = finetune_task(task, checkpoint, raw_train, train_idx, val_idx, raw_test, test_idx,
                                    num_classes, task_dir, in_chans=model.cfg.in_chans, img_size=model.cfg.img_size,
                                    seed=config.seed, progress=progress, log=log, **kwargs)
        num_test = len(test_idx) if test_idx is not None else len(raw_test)
        result = {"name": task.name, "group": task.group, "mode": task.mode, "data": task.data,
                  "num_classes": num_classes, "num_train": num_train, "num_test": num_test, **outcome,
                  "seconds": time.perf_counter() - start, "fingerprint": fingerprint}
        write_json(task_dir / "result.json", result)
        log(f"[{task.name}] {100 * result['accuracy']:.2f}% ({result['param_name']} = {result['chosen']:g}, "
            f"{result['seconds']:.0f} s)")
        results.append({**result, "resumed": False})
    suite = aggregate(config, results, str(checkpoint) if checkpoint is not None else None)
    write_suite_report(suite, out_dir)
    return suite


def _claim_task_dir(task_dir: Path, fingerprint: str) -> None:
    """Mark ``task_dir`` as working on ``fingerprint``; leftovers of a task with other settings are removed, those
    of an interrupted run of the same task are kept (its fine-tuning runs resume)."""
    marker = task_dir / "fingerprint"
    if task_dir.exists():
        try:
            same = marker.read_text().strip() == fingerprint
        except OSError:
            same = False
        if not same:
            shutil.rmtree(task_dir)
    write_text_atomic(marker, fingerprint + "\n")


def _save_pretrained(model: nn.Module, out_dir: Path) -> Path:
    path = out_dir / "pretrained.safetensors"
    if not path.is_file():
        save(model, path)
    return path


def _preprocessing_of(model: nn.Module):
    return metadata_of(model).preprocessing


def _default_builder(data: str, split: str, channels: int) -> Dataset:
    return build_dataset(data, split, channels=channels)
