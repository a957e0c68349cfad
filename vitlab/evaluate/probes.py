"""Classifiers on frozen features: closed-form least squares (the paper's few-shot linear), kNN, logistic probe.

All three share one small interface so that the few-shot protocol and the suite treat them alike: ``fit`` on
training features once, then ``scores`` for any value of the classifier's hyper-parameter (the l2 strength, the
number of neighbours, the weight decay). :func:`select` picks the value that scores best on held-out features.
Labels are class indices (N,), or multi-hot rows (N, K) for multi-label data: least squares regresses onto their
{-1, 1}^K form, kNN scores each label by its neighbours' votes, the logistic probe uses sigmoid cross-entropy, and
the selection uses macro mAP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError, VitlabError
from .metrics import average_precision

# big_vision's choice: a large constant bias feature is barely shrunk by the l2 penalty, so the bias is close to free
DEFAULT_BIAS_CONSTANT = 100.0
DEFAULT_L2_GRID = tuple(2.0**i for i in range(-10, 20))
DEFAULT_K_GRID = (1, 3, 5, 10, 20, 50)
DEFAULT_WD_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _check_fit_inputs(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """Features (N, D) and labels: class indices (N,), or multi-hot rows (N, K) of 0 / 1 (multi-label)."""
    if x.ndim != 2 or y.ndim not in (1, 2) or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need features (N, D) and labels (N,) or multi-hot targets (N, K) with N > 0, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if y.ndim == 2:
        if y.shape[1] != num_classes or not ((y == 0) | (y == 1)).all():
            raise ValueError(f"multi-hot targets must be (N, {num_classes}) of 0 / 1")
    elif y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")


def signed_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets in {-1, 1}^K: +1 for the sample's class, -1 elsewhere. (N,) -> (N, K) float64."""
    return 2.0 * F.one_hot(labels.long(), num_classes).double() - 1.0


def signed_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """{-1, 1}^K regression targets (N, K) float64: :func:`signed_one_hot` of class indices (N,), or multi-hot rows
    (N, K) mapped to -1 / +1 (multi-label: every present label +1)."""
    return 2.0 * labels.double() - 1.0 if labels.ndim == 2 else signed_one_hot(labels, num_classes)


def ridge_solution(x: torch.Tensor, targets: torch.Tensor, l2: float) -> torch.Tensor:
    """The minimiser W of ||x W - targets||^2 + l2 ||W||^2, by a direct solve. x (N, D), targets (N, K) -> (D, K).

    Solves the D x D normal equations when N >= D, else the N x N dual ``x^T (x x^T + l2 I)^-1 targets``; float64."""
    x, targets = x.double(), targets.double()
    n, d = x.shape
    if n >= d:
        return torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=x.dtype), x.T @ targets)
    return x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(n, dtype=x.dtype), targets)


class LeastSquaresClassifier:
    """Regularised least squares from features to {-1, 1}^K targets, the paper's few-shot linear classifier.

    Features are standardised with the training set's per-dimension mean and standard deviation (``standardize``),
    a constant feature ``bias_constant`` is appended for the bias, and W(l2) = argmin ||X W - Y||^2 + l2 ||W||^2 is
    available for every l2 at the cost of one eigendecomposition (of X^T X or X X^T, whichever is smaller), float64.
    The predicted class is the argmax of X W."""

    name = "lsr"
    param_name = "l2"

    def __init__(self, bias_constant: float = DEFAULT_BIAS_CONSTANT, standardize: bool = True,
                 grid: Sequence[float] = DEFAULT_L2_GRID):
        self.bias_constant = bias_constant
        self.standardize = standardize
        self.grid = tuple(float(v) for v in grid)

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.standardize:
            x = (x - self.mean) / self.std
        return torch.cat([x, torch.full((x.shape[0], 1), self.bias_constant, dtype=x.dtype)], dim=1)

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> LeastSquaresClassifier:
        _check_fit_inputs(x, y, num_classes)
        x = x.double()
        self.mean = x.mean(dim=0, keepdim=True)
        self.std = x.std(dim=0, unbiased=False, keepdim=True) + 1e-5
        design = self._design(x)  # (N, D+1)
        targets = signed_targets(y, num_classes)
        n, d = design.shape
        # W(l2) = lhs diag(1 / (eigs + l2)) rhs for both the primal (N >= D) and the dual (N < D) form
        if n >= d:
            self.eigs, q = torch.linalg.eigh(design.T @ design)
            self.lhs, self.rhs = q, q.T @ (design.T @ targets)
        else:
            self.eigs, q = torch.linalg.eigh(design @ design.T)
            self.lhs, self.rhs = design.T @ q, q.T @ targets
        self.eigs = self.eigs.clamp_min(0.0)  # tiny negative round-off of a positive semi-definite matrix
        return self

    def weights(self, l2: float) -> torch.Tensor:
        """(D+1, K) weights for one l2 strength; the last row multiplies the constant bias feature."""
        if l2 <= 0:
            raise ValueError(f"l2 must be positive, got {l2}")
        return (self.lhs / (self.eigs + l2)) @ self.rhs

    def scores(self, x: torch.Tensor, l2: float) -> torch.Tensor:
        """(M, K) class scores of features x (M, D)."""
        return self._design(x) @ self.weights(l2)


class KNNClassifier:
    """k nearest neighbours by cosine similarity of centred features (the training mean subtracted, then L2
    normalised, SimpleShot's "CL2N"); majority vote, ties to the class with the larger summed similarity.

    ``k`` is capped at the number of training samples (after ``fit`` the grid holds the distinct capped values)."""

    name = "knn"
    param_name = "k"

    def __init__(self, grid: Sequence[int] = DEFAULT_K_GRID, chunk: int = 4096):
        self.requested_grid = self.grid = tuple(int(v) for v in grid)
        self.chunk = chunk

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> KNNClassifier:
        _check_fit_inputs(x, y, num_classes)
        self.mean = x.float().mean(dim=0, keepdim=True)
        self.train = F.normalize(x.float() - self.mean, dim=1)
        # every k >= N gives the same classifier: keep the distinct effective values so that the chosen k is real
        self.grid = tuple(sorted({min(k, x.shape[0]) for k in self.requested_grid}))
        self.labels = y.float() if y.ndim == 2 else y.long()  # multi-hot rows or class indices
        self.num_classes = num_classes
        return self

    def scores(self, x: torch.Tensor, k: int) -> torch.Tensor:
        k = max(1, min(int(k), self.train.shape[0]))
        out = []
        for part in F.normalize(x.float() - self.mean, dim=1).split(self.chunk):
            sims, idx = (part @ self.train.T).topk(k, dim=1)  # (m, k)
            weight = 1.0 + sims / (2.0 * k + 1.0)
            if self.labels.ndim == 2:  # multi-label: each label scored by its neighbours' (weighted) votes
                votes = torch.einsum("mk,mkc->mc", weight, self.labels[idx])
                out.append(votes)
                continue
            votes = torch.zeros(part.shape[0], self.num_classes)
            # a vote counts 1; similarity (|s| <= 1, at most k of them) only breaks ties between equal counts
            votes.scatter_add_(1, self.labels[idx], weight)
            out.append(votes)
        return torch.cat(out)


class LogisticProbe:
    """A trained linear probe: softmax regression on standardised features, full batch, L-BFGS, float64.

    Minimises mean cross-entropy + ``wd / 2 * ||W||^2`` (bias not decayed); ``wd`` is the hyper-parameter.
    Deterministic for given inputs; each ``wd`` is trained once and cached."""

    name = "linear"
    param_name = "weight_decay"

    def __init__(self, grid: Sequence[float] = DEFAULT_WD_GRID, max_iter: int = 200):
        self.grid = tuple(float(v) for v in grid)
        self.max_iter = max_iter

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> LogisticProbe:
        _check_fit_inputs(x, y, num_classes)
        x = x.double()
        self.mean = x.mean(dim=0, keepdim=True)
        self.std = x.std(dim=0, unbiased=False, keepdim=True) + 1e-5
        self.x = (x - self.mean) / self.std
        self.y = y.double() if y.ndim == 2 else y.long()  # multi-hot rows: sigmoid cross-entropy per label
        self.num_classes = num_classes
        self._trained: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        return self

    def _train(self, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
        if wd in self._trained:
            return self._trained[wd]
        weight = torch.zeros(self.x.shape[1], self.num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-7,
                                      tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = self.x @ weight + bias
            data = (F.binary_cross_entropy_with_logits(logits, self.y, reduction="sum") / len(self.y)
                    if self.y.ndim == 2 else F.cross_entropy(logits, self.y))
            loss = data + 0.5 * wd * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self._trained[wd] = (weight.detach(), bias.detach())
        return self._trained[wd]

    def scores(self, x: torch.Tensor, weight_decay: float) -> torch.Tensor:
        weight, bias = self._train(float(weight_decay))
        return ((x.double() - self.mean) / self.std) @ weight + bias


PROBES = {"lsr": LeastSquaresClassifier, "knn": KNNClassifier, "linear": LogisticProbe}


def make_probe(name: str, grid: Sequence[float] | None = None, **options):
    """A probe by name (``lsr``, ``knn``, ``linear``), optionally with its own hyper-parameter grid."""
    if name not in PROBES:
        raise InvalidValueError(f"unknown probe {name!r}; choose one of {', '.join(PROBES)}")
    if grid is not None:
        if not len(grid):
            raise InvalidValueError(f"the {name} grid is empty")
        options["grid"] = grid
    return PROBES[name](**options)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of scores (N, K) against labels (N,)."""
    return (scores.argmax(dim=1) == labels.long()).double().mean().item()


def map_scores(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Mean average precision (macro over the labels with a positive, micro over all pairs pooled) of scores (N, K)
    against multi-hot targets (N, K), as :func:`vitlab.evaluate.metrics.multilabel_metrics` computes them."""
    per_label = [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    present = [ap for ap in per_label if ap is not None]
    if not present:
        raise VitlabError("no label has a positive sample: mean average precision is undefined")
    return sum(present) / len(present), average_precision(scores.flatten(), targets.flatten())


def score(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy for class indices (N,); macro mAP for multi-hot targets (N, K)."""
    return map_scores(scores, labels)[0] if labels.ndim == 2 else accuracy(scores, labels)


def select(probe, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[float, dict[float, float]]:
    """The hyper-parameter of a fitted probe that scores best on held-out features (accuracy; macro mAP for
    multi-hot targets), and every value's score.

    Ties go to the strongest regularisation: the largest l2 or weight decay, the largest k."""
    results = {value: score(probe.scores(x_val, value), y_val) for value in probe.grid}
    best = max(results.values())
    return max(v for v, acc in results.items() if acc == best), results
