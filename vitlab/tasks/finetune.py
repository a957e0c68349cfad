"""Fine-tuning one suite task with the training package's loop and the paper's VTAB recipe.

The task's images are written as an image folder (class folders named by zero-padded class index, so that the
order of classes is kept; in-memory images become PNG files, files of an image folder are linked), and
:func:`vitlab.train.train` fine-tunes the checkpoint on it with the ``finetune-vtab`` recipe (SGD momentum 0.9,
cosine, clip 1, new zero head) at the task's steps, batch size, learning rate and resolution. A class with no
training image gets no folder, so the fine-tuned head may have fewer outputs than the task has classes; scores map
its outputs back to the task's class indices and count images of missing classes as wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from ..atomic import atomic_directory
from ..errors import VitlabError
from ..evaluate.data import with_transform
from ..evaluate.features import model_outputs
from ..evaluate.fewshot import labels_of
from ..evaluate.metrics import classification_metrics
from ..factory import load
from ..models import metadata_of
from ..train import get_recipe, train
from ..train.runfolder import RunFolder
from .suite_config import TaskConfig


def _image_of(item) -> object:
    """A PIL image from a raw sample's image (PIL image, or uint8 tensor (C, H, W)); None for unreadable ones."""
    from PIL import Image

    image = item[0]
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise VitlabError(f"cannot write a training image from a {image.dtype} tensor of shape "
                              f"{tuple(image.shape)}; expected uint8 (1 or 3, H, W)")
        array = image.permute(1, 2, 0).numpy()
        return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return None  # a data set's stand-in for a file that could not be decoded


def export_image_folder(dataset: Dataset, indices: list[int], root: Path, labels: torch.Tensor,
                        num_classes: int) -> int:
    """Write the samples ``indices`` of a raw data set as ``root/<class index>/<sample index>.<ext>``; returns the
    number of images written (unreadable samples are left out).

    Image-folder data sets (with ``samples`` file paths) are linked (copied where links are not possible);
    everything else is written as PNG. The folder is built under a temporary name and swapped in when complete
    (:func:`vitlab.atomic.atomic_directory`)."""
    width = len(str(max(num_classes - 1, 0)))
    written = 0
    samples = getattr(dataset, "samples", None)
    with atomic_directory(root) as tmp:
        for i in indices:
            folder = tmp / str(int(labels[i])).zfill(width)
            folder.mkdir(parents=True, exist_ok=True)
            if samples is not None:
                source = Path(samples[i][0]).resolve()
                target = folder / f"{i}{source.suffix.lower()}"
                try:
                    os.symlink(source, target)
                except OSError:
                    shutil.copyfile(source, target)
            else:
                image = _image_of(dataset[i])
                if image is None:
                    continue
                image.save(folder / f"{i}.png")
            written += 1
    return written


def score_with_class_map(model, dataset: Dataset, num_classes: int, batch_size: int = 256, **kwargs) -> dict:
    """Classification metrics of a fine-tuned model whose class names are task class indices (a subset of
    ``range(num_classes)``): its logits are placed in the task's class columns, missing classes at -inf."""
    names = metadata_of(model).class_names
    try:
        columns = [int(n) for n in names]
    except (TypeError, ValueError):
        raise VitlabError("the fine-tuned model does not carry its class indices as class names") from None
    logits, labels, _ = model_outputs(model, dataset, "logits", batch_size, **kwargs)
    full = torch.full((logits.shape[0], num_classes), float("-inf"))
    full[:, torch.tensor(columns)] = logits
    # -inf columns would make the loss and calibration infinite; a very low finite logit keeps them meaningful
    full = torch.where(torch.isinf(full), torch.full_like(full, -1e4), full)
    return classification_metrics(full, labels, ks=(1,))


def _train_run(config, run_dir: Path, log) -> Path:
    """Run (or resume, or reuse) one fine-tuning run in ``run_dir``; returns the saved model's path."""
    folder = RunFolder(run_dir)
    if folder.result.is_file():
        path = json.loads(folder.result.read_text()).get("model_path")
        if path and Path(path).is_file():
            log(f"  {run_dir.name}: finished before, reused")
            return Path(path)
    if folder.last.is_file():
        log(f"  {run_dir.name}: resuming the interrupted run")
        result = train(config, resume=run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run that never saved a checkpoint starts again
        result = train(config)
    if result.model_path is None:
        raise VitlabError(f"{run_dir}: the fine-tuning run saved no model")
    return Path(result.model_path)


def finetune_task(
    task: TaskConfig,
    checkpoint: str | os.PathLike,
    raw_train: Dataset,
    train_idx: list[int],
    val_idx: list[int],
    raw_test: Dataset,
    test_idx: list[int] | None,
    num_classes: int,
    work_dir: str | os.PathLike,
    in_chans: int,
    img_size: tuple[int, int],
    seed: int = 0,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = False,
    log=print,
) -> dict:
    """VTAB-1k fine-tuning of one task: with several learning rates, each is trained on ``train_idx`` and scored
    on ``val_idx`` (800 / 200), then the best is trained on both (1000); with one, that run happens directly.
    Returns ``accuracy`` (test top-1), ``chosen`` (lr), ``param_name``, ``val_accuracy`` (per lr), ``steps``,
    ``resolution`` and ``train_accuracy`` (the final run's accuracy on its own training images)."""
    options = task.finetune
    work_dir = Path(work_dir)
    labels = labels_of(raw_train)
    resolution = (options["resolution"],) * 2 if options["resolution"] else tuple(img_size)
    device_name = str(device) if device is not None else "auto"

    def config_for(data_folder: Path, lr: float, name: str, n_train: int):
        if options["batch_size"] > n_train:
            raise VitlabError(f"task {task.name!r}: finetune batch_size {options['batch_size']} is larger than its "
                              f"{n_train} training images")
        values = dict(data=str(data_folder), train_split="train", val_data=str(data_folder), eval_split="train",
                      init_from=str(checkpoint), model_args={"in_chans": in_chans}, img_size=resolution[0], lr=lr,
                      steps=options["steps"], batch_size=options["batch_size"], eval_every_epochs=0.0,
                      out_dir=str(work_dir / "runs"), run_name=name, seed=seed, device=device_name,
                      num_workers=num_workers, progress=progress)
        if resolution[0] != resolution[1]:
            raise VitlabError(f"task {task.name!r}: fine-tuning needs a square resolution")
        recipe = get_recipe("finetune-vtab")
        warmup = options["warmup_steps"]
        if warmup is None:  # the recipe's share of warmup (200 of 2,500 steps) for any step count
            base = recipe.config()
            warmup = round(options["steps"] * base.warmup_steps / base.steps)
        values["warmup_steps"] = warmup
        return recipe.config(**values)

    kwargs = {"device": device, "num_workers": num_workers}
    lrs = [float(v) for v in options["lr"]]
    val_accuracy: dict[str, float] = {}
    if len(lrs) > 1:
        tune_folder = work_dir / "data" / "tune"
        n = export_image_folder(raw_train, train_idx, tune_folder / "train", labels, num_classes)
        for lr in lrs:
            log(f"  lr {lr:g}: {options['steps']} steps on {n} images, scored on {len(val_idx)}")
            model_path = _train_run(config_for(tune_folder, lr, f"tune-lr{lr:g}", n), work_dir / "runs" /
                                    f"tune-lr{lr:g}", log)
            model = load(model_path).to(device or "cpu")
            val = Subset(with_transform(raw_train, model.preprocessing), val_idx)
            val_accuracy[f"{lr:g}"] = score_with_class_map(model, val, num_classes, **kwargs)["top1"]
        best = max(lrs, key=lambda v: val_accuracy[f"{v:g}"])  # ties: the first in the config's order
    else:
        best = lrs[0]
    full_folder = work_dir / "data" / "full"
    n = export_image_folder(raw_train, train_idx + val_idx, full_folder / "train", labels, num_classes)
    log(f"  final: lr {best:g}, {options['steps']} steps on {n} images")
    model_path = _train_run(config_for(full_folder, best, "final", n), work_dir / "runs" / "final", log)
    model = load(model_path).to(device or "cpu")
    test = with_transform(raw_test, model.preprocessing)
    scores = score_with_class_map(model, Subset(test, test_idx) if test_idx is not None else test, num_classes,
                                  **kwargs)
    train_metrics = json.loads(RunFolder(work_dir / "runs" / "final").result.read_text()).get("metrics", {})
    shutil.rmtree(work_dir / "data", ignore_errors=True)  # the exported images; the runs keep their models
    for run in (work_dir / "runs").iterdir():
        # optimiser states only serve to resume an unfinished run, tuning models only to pick the lr
        shutil.rmtree(RunFolder(run).checkpoints, ignore_errors=True)
        if run.name != "final":
            RunFolder(run).model.unlink(missing_ok=True)
    return {"accuracy": scores["top1"], "chosen": best, "param_name": "lr", "val_accuracy": val_accuracy,
            "steps": options["steps"], "resolution": list(resolution), "train_accuracy": train_metrics.get("top1"),
            "model_path": str(model_path)}
