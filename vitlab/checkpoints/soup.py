"""The weight maths of a model soup: the (weighted) average of several checkpoints of one architecture.

"Model soups" (Wortsman et al., ICML 2022) average the weights of models fine-tuned from the same pre-trained start
with different hyper-parameters; timm's ``avg_checkpoints.py`` averages one run's checkpoints. Both are the same
operation on :class:`~vitlab.checkpoints.Checkpoint` records, done here: the records must describe the same model
(architecture, config, tensor names, shapes, class names, loss) or the one that differs is refused in one line naming
its file.

The arithmetic is fixed so that a soup can be checked by hand: each floating-point tensor is the float64 sum of
``weight_i * tensor_i`` divided by the sum of the weights, rounded once to the first ingredient's dtype. Integer and
boolean tensors (counters, masks) are not averaged: they must be equal in every ingredient.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import VitlabError
from .loading import Checkpoint


def _loss_of(ckpt: Checkpoint) -> str | None:
    loss = ckpt.metadata.get("loss") if isinstance(ckpt.metadata, dict) else None
    return loss if loss in ("softmax", "sigmoid") else None


def check_ingredient(first: Checkpoint, other: Checkpoint, named: Checkpoint | None = None) -> None:
    """Refuse ``other`` (one line naming its file and what differs) unless it is the same model as ``first``: the
    same architecture and config, the same tensor names and shapes, the same class names as ``named`` (the first
    ingredient that has class names; default ``first``) when both have them, and the same head loss when both
    record it."""
    source, ref = other.path, first.path
    if other.architecture.name != first.architecture.name:
        raise VitlabError(f"{source}: a {other.architecture.name} model, but {ref} is a {first.architecture.name}; "
                          "a soup averages models of one architecture")
    mine, theirs = first.config.to_dict(), other.config.to_dict()
    differ = [f"{k} {theirs.get(k)!r} ({ref}: {mine.get(k)!r})" for k in sorted(set(mine) | set(theirs))
              if mine.get(k) != theirs.get(k)]
    if differ:
        raise VitlabError(f"{source}: not the same model as {ref}: " + ", ".join(differ[:6])
                          + (f", ... ({len(differ) - 6} more)" if len(differ) > 6 else ""))
    a, b = first.state_dict, other.state_dict
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes = [f"{k} {tuple(b[k].shape)} ({ref}: {tuple(a[k].shape)})" for k in a if k in b and a[k].shape != b[k].shape]
    if missing or extra or shapes:
        parts = [f"{label}: {', '.join(items[:5])}" + (" ..." if len(items) > 5 else "")
                 for label, items in (("missing", missing), ("extra", extra), ("shapes differ", shapes)) if items]
        raise VitlabError(f"{source}: the tensors differ from {ref}'s; " + "; ".join(parts))
    named = named or first
    if named.class_names and other.class_names and list(named.class_names) != list(other.class_names):
        diff = next(i for i, (x, y) in enumerate(zip(named.class_names, other.class_names, strict=True)) if x != y)
        raise VitlabError(f"{source}: other class names than {named.path} (class {diff}: {other.class_names[diff]!r} "
                          f"vs {named.class_names[diff]!r}); a soup averages heads trained on the same classes")
    if _loss_of(first) and _loss_of(other) and _loss_of(first) != _loss_of(other):
        raise VitlabError(f"{source}: a {_loss_of(other)} head, but {ref}'s is {_loss_of(first)}")


def check_weights(weights, count: int) -> list[float]:
    """``weights`` as floats: one per ingredient, none negative, not all zero (a soup interpolates, never
    extrapolates)."""
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise VitlabError(f"weights must be numbers, got {weights!r}", options=("weights",)) from None
    if len(values) != count:
        raise VitlabError(f"weights: {len(values)} given for {count} ingredients", options=("weights",))
    if any(not w >= 0 or w == float("inf") for w in values) or sum(values) <= 0:
        raise VitlabError(f"weights must be finite, non-negative and not all zero, got {values}",
                          options=("weights",))
    return values


class WeightSum:
    """A running weighted sum of checkpoints (float64 for floating-point tensors), started from ``first``; the soup
    is :meth:`average`. Holds one extra copy of the model, however many ingredients are added."""

    def __init__(self, first: Checkpoint, weight: float = 1.0):
        self.first = first
        self.dtypes = {k: v.dtype for k, v in first.state_dict.items()}
        self.sums: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}  # integer / bool tensors: equal in every ingredient
        self.total = 0.0
        self.count = 0
        self.mixed_dtypes: list[str] = []
        for key, value in first.state_dict.items():
            if value.is_floating_point():
                self.sums[key] = torch.zeros(value.shape, dtype=torch.float64)
            else:
                self.fixed[key] = value
        self.add(first, weight)

    def add(self, ckpt: Checkpoint, weight: float = 1.0) -> None:
        """Add ``weight`` x ``ckpt`` (already checked with :func:`check_ingredient` when it is not the first)."""
        for key, value in ckpt.state_dict.items():
            if key in self.fixed:
                if not torch.equal(value, self.fixed[key]):
                    raise VitlabError(f"{ckpt.path}: {key} ({str(value.dtype).removeprefix('torch.')}) differs from "
                                      f"{self.first.path}'s; integer tensors cannot be averaged, they must be equal")
                continue
            if not value.is_floating_point():
                raise VitlabError(f"{ckpt.path}: {key} is {str(value.dtype).removeprefix('torch.')}, but floating "
                                  f"point in {self.first.path}")
            if value.dtype != self.dtypes[key] and ckpt.path not in self.mixed_dtypes:
                self.mixed_dtypes.append(ckpt.path)
            self.sums[key].add_(value.to(torch.float64), alpha=weight)
        self.total += weight
        self.count += 1

    def copy(self) -> WeightSum:
        """An independent copy (to try one more ingredient and keep the sum as it was if it does not help)."""
        other = object.__new__(WeightSum)
        other.__dict__.update(self.__dict__)
        other.sums = {k: v.clone() for k, v in self.sums.items()}
        other.mixed_dtypes = list(self.mixed_dtypes)
        return other

    def average(self) -> dict[str, torch.Tensor]:
        """The soup's state dict: each sum divided by the total weight, in the first ingredient's dtype."""
        out = {k: (v / self.total).to(self.dtypes[k]) for k, v in self.sums.items()}
        out.update(self.fixed)
        return {k: out[k] for k in self.first.state_dict}  # the first's tensor order

    def checkpoint(self, metadata: dict | None = None) -> Checkpoint:
        """The soup as a :class:`Checkpoint`: the first ingredient's record (format, config, preprocessing, class
        names) with the averaged weights; ``metadata`` replaces the record's."""
        notes = [f"soup of {self.count} checkpoints"]
        if self.mixed_dtypes:
            notes.append(f"{', '.join(self.mixed_dtypes)}: other dtypes than {self.first.path}; the soup keeps the "
                         "first's")
        ckpt = dataclasses.replace(self.first, state_dict=self.average(), notes=notes, facts=dict(self.first.facts),
                                   metadata=dict(metadata if metadata is not None else self.first.metadata))
        ckpt.facts["zeroed_head"] = bool("head.weight" in ckpt.state_dict
                                         and not ckpt.state_dict["head.weight"].any().item())
        return ckpt
