"""The paper's few-shot linear evaluation on frozen features: shots per class, several seeds, tuned on held-out data.

For each seed every class's training samples are shuffled once; the held-out set, which picks the probe's
hyper-parameter (l2 strength, k, weight decay), takes the first ``holdout_per_class`` samples of each class, and the
n-shot training set the n that follow (so the 5-shot set contains the 1-shot set, as in big_vision, and never overlaps
the held-out set). Neither depends on which other shot counts are asked for: a seed and a shot count give the same
result in every run. The chosen probe, fitted on the shots only, is scored on the test set.

Multi-label data (multi-hot targets (N, K)): "n shots" means n images for each label. For each seed the samples are
shuffled once and taken greedily in that order: an image joins the held-out set while one of its labels has fewer
than ``holdout_per_class`` held-out images, then the n-shot set while one of its labels has fewer than n (so the sets
stay nested and disjoint; an image with several labels counts for each). The probes fit the multi-hot targets (least
squares regresses onto their {-1, 1}^K form, as for one-hot ones), the hyper-parameter is picked by macro mAP on the
held-out set and the test set is scored by mean average precision, macro and micro, instead of accuracy.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from ..errors import VitlabError
from .features import extract_features, model_outputs
from .probes import accuracy, make_probe, map_scores, select

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = (0, 1, 2)


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of a list of accuracies."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def fewshot_splits(labels: torch.Tensor, num_classes: int, shots: Sequence[int], holdout_per_class: int,
                   seed: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Indices into ``labels`` for each shot count (nested) and for the held-out set, for one seed.

    Returns ``({shots: indices}, holdout_indices)``. Every class needs ``max(shots) + holdout_per_class`` samples.
    Multi-hot ``labels`` (N, K) are drawn greedily per label (module docstring)."""
    if labels.ndim == 2:
        return _multilabel_splits(labels, shots, holdout_per_class, seed)
    labels_np = labels.cpu().numpy()
    need = max(shots) + holdout_per_class
    counts = np.bincount(labels_np, minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < need]
    if short:
        listed = ", ".join(f"{c} ({counts[c]})" for c in short[:5])
        raise VitlabError(f"{max(shots)} shots + {holdout_per_class} held out per class need {need} training samples "
                          f"per class; too few in class {listed}{' ...' if len(short) > 5 else ''}")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels_np == c)) for c in range(num_classes)]
    h = holdout_per_class
    holdout = torch.from_numpy(np.concatenate([p[:h] for p in per_class]))
    shot_sets = {n: torch.from_numpy(np.concatenate([p[h : h + n] for p in per_class])) for n in shots}
    return shot_sets, holdout


def _greedy(order: np.ndarray, hot: np.ndarray, per_label: int, taken: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Walk ``order``; take each image not yet ``taken`` that has a label with fewer than ``per_label`` taken."""
    counts = np.zeros(hot.shape[1], dtype=np.int64)
    chosen = []
    for i in order:
        if taken[i]:
            continue
        labels = hot[i]
        if (labels & (counts < per_label)).any():
            chosen.append(int(i))
            counts += labels
    return chosen, counts


def _multilabel_splits(targets: torch.Tensor, shots: Sequence[int], holdout_per_class: int,
                       seed: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    hot = targets.cpu().numpy() > 0.5
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(hot))
    taken = np.zeros(len(hot), dtype=bool)
    holdout, held = _greedy(order, hot, holdout_per_class, taken)
    taken[holdout] = True
    shot_sets = {}
    for n in sorted(shots):
        chosen, counts = _greedy(order, hot, n, taken)
        short = np.flatnonzero((counts < n) | (held < holdout_per_class))
        if len(short):
            listed = ", ".join(f"{c} ({int(hot[:, c].sum())})" for c in short[:5])
            raise VitlabError(f"{n} shots + {holdout_per_class} held out per label need {n + holdout_per_class} "
                              f"training images with each label; too few with label {listed}"
                              f"{' ...' if len(short) > 5 else ''}")
        shot_sets[n] = torch.tensor(chosen, dtype=torch.long)
    return shot_sets, torch.tensor(holdout, dtype=torch.long)


def fewshot_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    methods: Sequence[str] = ("lsr",),
    holdout_per_class: int = 10,
    num_classes: int | None = None,
    grids: dict[str, Sequence[float]] | None = None,
) -> dict:
    """Few-shot accuracy of each probe in ``methods`` (``lsr``, ``knn``, ``linear``) by shots, over seeds.

    Features (N, D) / labels (N,) of the training pool and of the test set. ``grids`` overrides a probe's
    hyper-parameter grid, e.g. ``{"lsr": [1, 10, 100]}``. Returns plain data::

        {"shots": [...], "seeds": [...], "holdout_per_class": h, "num_classes": K, "feature_dim": D,
         "num_test": M, "methods": {name: {"param_name": "l2", "results": {"5": {
             "accuracy": [per seed], "chosen": [per seed], "mean", "std", "min", "max"}}}}}

    Accuracies are fractions; ``std`` is the sample standard deviation over seeds. Multi-hot labels (N, K)
    (multi-label data) give ``"multi_label": True`` and, per shot count, ``map_macro`` and ``map_micro`` (per seed)
    instead of ``accuracy``; ``mean`` / ``std`` / ``min`` / ``max`` then summarise ``map_macro``."""
    shots = sorted({int(s) for s in shots})
    seeds = [int(s) for s in seeds]
    if not shots or shots[0] < 1:
        raise VitlabError(f"shots must be positive integers, got {shots}")
    if not seeds:
        raise VitlabError("give at least one seed")
    if holdout_per_class < 1:
        raise VitlabError(f"holdout_per_class must be >= 1, got {holdout_per_class}")
    if train_features.shape[1] != test_features.shape[1]:
        raise VitlabError(f"train features have {train_features.shape[1]} dimensions, test {test_features.shape[1]}")
    multi_label = train_labels.ndim == 2
    if multi_label and test_labels.shape[1:] != train_labels.shape[1:]:
        raise VitlabError(f"train targets have {train_labels.shape[1]} labels, test {tuple(test_labels.shape)[1:]}")
    if num_classes is None:
        num_classes = (train_labels.shape[1] if multi_label
                       else int(max(train_labels.max(), test_labels.max())) + 1)
    grids = grids or {}
    metric = "map_macro" if multi_label else "accuracy"
    results: dict = {
        "shots": shots, "seeds": seeds, "holdout_per_class": holdout_per_class, "num_classes": num_classes,
        "feature_dim": int(train_features.shape[1]), "num_test": int(test_features.shape[0]), "methods": {},
    }
    if multi_label:
        results["multi_label"] = True
    keys = ("map_macro", "map_micro") if multi_label else ("accuracy",)
    per_method = {m: {n: {**{k: [] for k in keys}, "chosen": []} for n in shots} for m in methods}
    probes = {m: make_probe(m, grids.get(m)) for m in methods}  # validates the names before any work
    for seed in seeds:
        shot_sets, holdout = fewshot_splits(train_labels, num_classes, shots, holdout_per_class, seed)
        x_val, y_val = train_features[holdout], train_labels[holdout]
        for n, idx in shot_sets.items():
            for name, probe in probes.items():
                probe.fit(train_features[idx], train_labels[idx], num_classes)
                chosen, _ = select(probe, x_val, y_val)
                test_scores = probe.scores(test_features, chosen)
                if multi_label:
                    macro, micro = map_scores(test_scores, test_labels)
                    per_method[name][n]["map_macro"].append(macro)
                    per_method[name][n]["map_micro"].append(micro)
                else:
                    per_method[name][n]["accuracy"].append(accuracy(test_scores, test_labels))
                per_method[name][n]["chosen"].append(chosen)
    for name, by_shots in per_method.items():
        results["methods"][name] = {
            "param_name": probes[name].param_name,
            "results": {str(n): {**r, **summarize(r[metric])} for n, r in by_shots.items()},
        }
    return results


def tuned_probe(
    method: str,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    grid: Sequence[float] | None = None,
) -> dict:
    """VTAB-style probe: pick the hyper-parameter on (train, val), refit on train + val with it, score on test.

    Each argument pair is (features (N, D), labels (N,)). Returns ``{"accuracy", "chosen", "param_name",
    "val_accuracy": {value: accuracy}}``."""
    probe = make_probe(method, grid)
    probe.fit(*train, num_classes)
    chosen, val_acc = select(probe, *val)
    probe.fit(torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]), num_classes)
    test_acc = (probe.scores(test[0], chosen).argmax(1) == test[1]).double().mean().item()
    return {"accuracy": test_acc, "chosen": chosen, "param_name": probe.param_name,
            "val_accuracy": {str(k): v for k, v in val_acc.items()}}


def labels_of(dataset) -> torch.Tensor:
    """All labels of a map-style data set (N,) int64, read without decoding images where the data set keeps them
    (``labels`` / ``targets`` attributes, folder ``samples``), looking through ``Subset``. A multi-label data set
    (``multi_label``; a manifest's ``targets`` are tuples of label indices) gives multi-hot rows (N, K) float32."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if getattr(dataset, "multi_label", False):
        targets, classes = getattr(dataset, "targets", None), getattr(dataset, "classes", None)
        if targets is not None and classes is not None:
            hot = torch.zeros(len(targets), len(classes))
            for i, ids in enumerate(targets):
                hot[i, list(ids)] = 1.0
            return hot
        return torch.stack([torch.as_tensor(dataset[i][1]).float() for i in range(len(dataset))])
    for attr in ("labels", "targets"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return torch.as_tensor(values).long()
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def fewshot_model(
    model,
    train_dataset,
    test_dataset,
    representation: str = "pre_logits",
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    holdout_per_class: int = 10,
    batch_size: int = 256,
    num_classes: int | None = None,
    **kwargs,
) -> dict:
    """:func:`fewshot_evaluate` on a model's frozen representations of two data sets of ``(image, label)``.

    Only the training images some seed draws (shots and held-out ones) go through the model, so a large training
    split costs little. ``kwargs`` go to :func:`fewshot_evaluate` (methods, grids) and to
    :func:`features.model_outputs` (device, num_workers, progress). Adds ``representation`` and ``num_images_embedded``
    to the result."""
    eval_keys = {"methods", "grids"}
    probe_kwargs = {k: v for k, v in kwargs.items() if k in eval_keys}
    feature_kwargs = {k: v for k, v in kwargs.items() if k not in eval_keys}
    train_labels = labels_of(train_dataset)
    if num_classes is None:
        num_classes = train_labels.shape[1] if train_labels.ndim == 2 else int(train_labels.max()) + 1
    needed: set[int] = set()
    for seed in seeds:
        shot_sets, holdout = fewshot_splits(train_labels, num_classes, shots, holdout_per_class, seed)
        needed.update(shot_sets[max(shot_sets)].tolist(), holdout.tolist())
    needed_idx = sorted(needed)
    feats, _, present = model_outputs(model, Subset(train_dataset, needed_idx), representation, batch_size,
                                      **feature_kwargs)
    if len(present) != len(needed_idx):
        raise VitlabError(f"{len(needed_idx) - len(present)} training images drawn for few-shot could not be read")
    # scatter back to the full training pool's indexing; rows no seed drew stay zero and are never used
    train_features = torch.zeros(len(train_labels), feats.shape[1])
    train_features[torch.tensor(needed_idx)] = feats
    test_features, test_labels = extract_features(model, test_dataset, representation=representation,
                                                  batch_size=batch_size, **feature_kwargs)
    out = fewshot_evaluate(train_features, train_labels, test_features, test_labels, shots=shots, seeds=seeds,
                           holdout_per_class=holdout_per_class, num_classes=num_classes, **probe_kwargs)
    return {"representation": representation, "num_images_embedded": len(needed_idx), **out}

