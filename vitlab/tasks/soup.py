"""``vitlab soup``: a model soup of checkpoints, scored on held-out data (:func:`vitlab.soup` with top-1 accuracy).

The greedy soup chooses its ingredients on held-out data, never on the test set the soup is then reported on. For a
named in-memory set that is typically the training split minus what the runs trained on: ``holdout=N, seed=S``
selects exactly the images that runs trained with ``holdout=N`` and ``seed=S`` held out (the same class-balanced
choice, :func:`vitlab.train.run.split_training_set`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..data import ArrayDataset, build_dataset
from ..devices import resolve_device
from ..errors import VitlabError
from ..evaluate.classification import evaluate_classifier
from ..evaluate.classmap import check_classes
from ..evaluate.data import class_names_of, limit_dataset, with_transform
from ..models import metadata_of
from ..preprocessing import Preprocessing
from ..soups import Soup, soup
from ..train.run import split_training_set


def heldout_dataset(data: str, split: str, preprocessing: Preprocessing, *, holdout: int = 0, seed: int = 0,
                    data_dir: str | None = None, max_samples: int | None = None):
    """The held-out images to score a soup on: ``split`` of ``data`` prepared with ``preprocessing``; with
    ``holdout=N`` only the N images a training run with ``holdout=N`` and ``seed`` held out of that split (in-memory
    named sets); ``max_samples``: a seeded random subset."""
    raw = build_dataset(data, split, data_dir=data_dir, channels=preprocessing.channels, on_error="fail")
    if holdout:
        if not isinstance(raw, ArrayDataset):
            raise VitlabError(f"holdout={holdout}: {data} is not an in-memory named set; give a held-out split or "
                              "folder instead", options=("holdout",))
        raw = split_training_set(raw, None, holdout, seed)[1]
    return limit_dataset(with_transform(raw, preprocessing), max_samples)


def top1_scorer(data: str, split: str = "train", *, holdout: int = 0, seed: int = 0, data_dir: str | None = None,
                max_samples: int | None = None, batch_size: int = 256, device: str = "auto",
                num_workers: int = 0) -> Callable[[nn.Module], float]:
    """A ``score`` for :func:`vitlab.soup`: top-1 accuracy on the held-out images (:func:`heldout_dataset`),
    measured by the evaluator of ``vitlab eval``. The images are read once, with the preprocessing of the first
    model scored (the soup keeps the first ingredient's)."""
    dev = resolve_device(device)
    cache: dict = {}

    def score(model: nn.Module) -> float:
        meta = metadata_of(model)
        if "data" not in cache:
            cache["data"] = heldout_dataset(data, split, meta.preprocessing, holdout=holdout, seed=seed,
                                            data_dir=data_dir, max_samples=max_samples)
            check_classes(model.cfg.num_classes, meta.class_names, class_names_of(cache["data"]), "the soup", data)
        with torch.inference_mode():
            results = evaluate_classifier(model.to(dev).eval(), cache["data"], batch_size=batch_size, ks=(1,),
                                          device=dev, num_workers=num_workers)
        model.to("cpu")
        return float(results["top1"])

    return score


def soup_checkpoints(ingredients: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
                     weights: Sequence[float] | None = None, greedy: bool = False, data: str | None = None,
                     split: str = "train", holdout: int = 0, seed: int = 0, data_dir: str | None = None,
                     max_samples: int | None = None, prefer_ema: bool = False, model_name: str | None = None,
                     batch_size: int = 256, device: str = "auto", num_workers: int = 0,
                     log: Callable[[str], None] | None = None) -> Soup:
    """``vitlab soup``: :func:`vitlab.soup` of ``ingredients`` into ``out``; with ``data`` every ingredient and the
    soup are scored by top-1 on the held-out images (:func:`heldout_dataset` of ``split``, ``holdout``, ``seed``),
    and ``greedy`` keeps an ingredient only if that score does not drop (the greedy soup needs ``data``)."""
    if greedy and data is None:
        raise VitlabError("greedy: the greedy soup chooses on held-out data; give data=... (and split=...)",
                          options=("greedy", "data"))
    if data is None and (holdout or max_samples):
        raise VitlabError("holdout / max_samples select held-out images; give data=... too",
                          options=("holdout", "max_samples", "data"))
    score = None
    if data is not None:
        score = top1_scorer(data, split, holdout=holdout, seed=seed, data_dir=data_dir, max_samples=max_samples,
                            batch_size=batch_size, device=device, num_workers=num_workers)
    return soup(ingredients, weights=weights, score=score, greedy=greedy, out=out, prefer_ema=prefer_ema,
                model_name=model_name, log=log)
