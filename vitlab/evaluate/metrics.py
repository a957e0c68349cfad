"""Classification metrics over a whole evaluation set, from logits and labels.

Everything here works on complete, already-gathered tensors (one row per sample, no duplicates), so the numbers are
the same however the samples were spread over processes. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidValueError


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (N,) with N = {logits.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise InvalidValueError(f"labels must lie in [0, {logits.shape[1] - 1}], got [{labels.min()}, {labels.max()}]")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose label is among the k highest logits, for each k (k is capped at the class count).

    logits (N, K), labels (N,) int. Ties are broken by ``torch.topk`` (lowest index first on CPU)."""
    _check(logits, labels)
    if logits.shape[0] == 0:
        raise ValueError("cannot compute accuracy of an empty evaluation set")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hits = top == labels[:, None]
    return {k: hits[:, : min(k, kmax)].any(dim=1).double().mean().item() for k in ks}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; row = true class, column = predicted class."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class (diagonal / row sum) from a confusion matrix; None for classes without samples."""
    totals = confusion.sum(dim=1)
    return [(confusion[i, i] / totals[i]).item() if totals[i] else None for i in range(confusion.shape[0])]


def per_class_precision_f1(confusion: torch.Tensor) -> tuple[list[float | None], list[float | None]]:
    """(precision of each class: diagonal / column sum, None for a class never predicted; F1 of each class: the
    harmonic mean of its precision and recall, 0 where either is 0 or undefined, None for a class neither present
    nor predicted), from a confusion matrix (rows = true class). scikit-learn's ``precision_recall_fscore_support``
    with ``zero_division=0`` gives the same numbers (with 0 where these are None)."""
    tp = confusion.diagonal().double()
    predicted, actual = confusion.sum(dim=0).double(), confusion.sum(dim=1).double()
    precision, f1 = [], []
    for c in range(confusion.shape[0]):
        precision.append((tp[c] / predicted[c]).item() if predicted[c] else None)
        if not predicted[c] and not actual[c]:
            f1.append(None)
        else:
            f1.append((2 * tp[c] / (predicted[c] + actual[c])).item())  # = 2PR / (P + R); 0 when tp = 0
    return precision, f1


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict:
    """Expected calibration error of the top-1 confidence with ``num_bins`` equal-width bins over (0, 1].

    ECE = sum over bins b of (n_b / N) * |accuracy_b - mean confidence_b|. A confidence c falls into bin
    ceil(c * num_bins) - 1 (bins are closed on the right). Returns ``ece`` plus per-bin ``count``, ``accuracy`` and
    ``confidence`` (None for empty bins) for a reliability diagram."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    bins = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    count = torch.bincount(bins, minlength=num_bins)
    sum_conf = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    sum_correct = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct)
    n = max(labels.numel(), 1)
    ece = (sum_correct - sum_conf).abs().sum().item() / n
    acc = [(sum_correct[b] / count[b]).item() if count[b] else None for b in range(num_bins)]
    conf = [(sum_conf[b] / count[b]).item() if count[b] else None for b in range(num_bins)]
    return {"ece": ece, "num_bins": num_bins, "count": count.tolist(), "accuracy": acc, "confidence": conf}


def multilabel_accuracy(predictions: torch.Tensor, label_sets: Sequence[Sequence[int]]) -> dict:
    """ReaL-style accuracy: a prediction is correct if it is any of the image's labels.

    predictions (N,) int; ``label_sets[i]`` are the acceptable classes of sample i. Samples with an empty label set
    (no valid label, as some ImageNet validation images in ReaL) are left out of the score. Returns ``accuracy``,
    ``counted`` (samples scored) and ``skipped``."""
    if len(label_sets) != predictions.shape[0]:
        raise InvalidValueError(f"the labels file has {len(label_sets)} entries but there are "
                                f"{predictions.shape[0]} samples")
    hits = counted = 0
    for pred, allowed in zip(predictions.tolist(), label_sets):
        if len(allowed):
            counted += 1
            hits += int(pred in set(int(a) for a in allowed))
    if not counted:
        raise InvalidValueError("no sample has a label in the multi-label file")
    return {"accuracy": hits / counted, "counted": counted, "skipped": len(label_sets) - counted}


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    num_bins: int = 15,
    label_sets: Sequence[Sequence[int]] | None = None,
) -> dict:
    """All metrics of ``vitlab eval`` from logits (N, K) and labels (N,), as plain JSON-ready data.

    Keys: ``samples``, ``num_classes``, ``top{k}`` for each k up to the class count, ``loss`` (mean
    cross-entropy, nats), ``per_class_accuracy`` (list), ``mean_class_accuracy`` (over classes with samples),
    ``per_class_precision`` and ``per_class_f1`` (lists, :func:`per_class_precision_f1`), ``macro_f1`` (over the
    classes present or predicted, as scikit-learn's ``f1_score(average="macro")``), ``confusion_matrix`` (K x K
    list, rows = true), ``calibration`` (see :func:`expected_calibration_error`) and,
    when ``label_sets`` is given, ``real`` (see :func:`multilabel_accuracy`)."""
    logits = logits.float()
    labels = labels.long()
    _check(logits, labels)
    num_classes = logits.shape[1]
    out: dict = {"samples": int(labels.numel()), "num_classes": num_classes}
    ks = [k for k in ks if k == 1 or k <= num_classes]  # top-5 of a 3-class problem says nothing
    for k, value in topk_accuracy(logits, labels, ks).items():
        out[f"top{k}"] = value
    out["loss"] = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(predictions, labels, num_classes)
    per_class = per_class_accuracy(confusion)
    present = [a for a in per_class if a is not None]
    out["per_class_accuracy"] = per_class
    out["mean_class_accuracy"] = sum(present) / len(present)
    out["per_class_precision"], out["per_class_f1"] = per_class_precision_f1(confusion)
    scored = [f for f in out["per_class_f1"] if f is not None]
    out["macro_f1"] = sum(scored) / len(scored)
    out["confusion_matrix"] = confusion.tolist()
    out["calibration"] = expected_calibration_error(logits.double().softmax(dim=1), labels, num_bins)
    if label_sets is not None:
        out["real"] = multilabel_accuracy(predictions, label_sets)
    return out


# ----- multi-label (multi-hot targets, sigmoid scores)
def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Average precision of one label: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds from the
    highest down (tied scores form one threshold), the step-wise area under the precision-recall curve that
    scikit-learn's ``average_precision_score`` computes. None when the label has no positive sample."""
    positives = targets.double().sum()
    if positives == 0:
        return None
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, t = scores.double()[order], targets.double()[order]
    tp, fp = t.cumsum(0), (1 - t).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)  # the last sample of each run of tied scores is a threshold
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / positives
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * precision).sum())


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict:
    """The metrics of a multi-label evaluation from logits (N, K) and multi-hot targets (N, K), JSON-ready.

    Keys: ``samples``, ``num_classes``, ``multi_label`` (True), ``loss`` (sigmoid cross-entropy summed over the
    labels, mean over the images, nats: the training loss), ``map_macro`` (mean over labels with at least one
    positive of each label's average precision, see :func:`average_precision`; ``map_labels`` says how many),
    ``map_micro`` (the average precision of all (sample, label) pairs pooled), ``f1_micro`` / ``f1_macro`` /
    ``precision_micro`` / ``recall_micro`` with a label predicted where its sigmoid probability is at least
    ``threshold``, ``top1`` (ReaL-style: the highest-scoring label is one of the image's labels, over the
    ``top1_counted`` images that have a label), ``per_class_ap`` (list, None for labels without positives) and
    ``positives`` per label."""
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(f"logits and targets must both be (N, K), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("cannot compute metrics of an empty evaluation set")
    if not 0 < threshold < 1:
        raise InvalidValueError(f"threshold must be in (0, 1), got {threshold}")
    logits, targets = logits.double(), targets.double()
    per_class = [average_precision(logits[:, k], targets[:, k]) for k in range(logits.shape[1])]
    present = [ap for ap in per_class if ap is not None]
    if not present:
        raise InvalidValueError("no label has a positive sample: mean average precision is undefined")
    predicted = (logits.sigmoid() >= threshold).double()
    tp = (predicted * targets).sum(0)
    fp = (predicted * (1 - targets)).sum(0)
    fn = ((1 - predicted) * targets).sum(0)
    f1_per = 2 * tp / (2 * tp + fp + fn).clamp_min(1)  # 0 for a label never present nor predicted (scikit-learn)
    has_label = targets.sum(1) > 0
    out = {"samples": int(logits.shape[0]), "num_classes": int(logits.shape[1]), "multi_label": True,
           "loss": torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
           .sum(1).mean().item(),
           "map_macro": sum(present) / len(present), "map_labels": len(present),
           "map_micro": average_precision(logits.flatten(), targets.flatten()),
           "threshold": threshold,
           "f1_micro": (2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1)).item(),
           "f1_macro": f1_per.mean().item(),
           "precision_micro": (tp.sum() / (tp.sum() + fp.sum()).clamp_min(1)).item(),
           "recall_micro": (tp.sum() / (tp.sum() + fn.sum()).clamp_min(1)).item()}
    if has_label.any():
        best = logits[has_label].argmax(dim=1)
        out["top1"] = targets[has_label].gather(1, best[:, None]).mean().item()
    out["top1_counted"] = int(has_label.sum())
    out["per_class_ap"] = per_class
    out["positives"] = [int(p) for p in targets.sum(0).tolist()]
    return out
