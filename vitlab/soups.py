"""Model soups: one model whose weights are the average of several fine-tuned models (``vitlab.soup``).

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time" (ICML 2022): models fine-tuned from one pre-trained start with different hyper-parameters often lie
in one basin of the loss, and their average is as good as the best of them or better, at the cost of one model.

- the **uniform soup** averages every ingredient (optionally weighted: timm's ``avg_checkpoints.py`` over a run's
  checkpoints is the same operation);
- the **greedy soup** (the paper's Recipe 1) sorts the ingredients by a held-out score, starts from the best and
  adds each of the others in turn only if the soup's held-out score does not drop.

An ingredient is anything :func:`vitlab.load` reads: a file, a training run folder (its final model), a run's
``checkpoints/last.pt`` / ``best.pt`` (``prefer_ema`` takes their EMA weights), a catalog name or an ``hf-hub:``
repo. The weight maths is :mod:`vitlab.checkpoints.soup`. The held-out score is a callable here (this layer knows no
data); :func:`vitlab.tasks.soup_checkpoints` (``vitlab soup --greedy``) scores the top-1 accuracy on a data split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .atomic import check_new_file
from .checkpoints import Checkpoint, model_from_checkpoint
from .checkpoints.soup import WeightSum, check_ingredient, check_weights
from .checkpoints.vitlab_format import save
from .compute.onednn import set_onednn_linear
from .errors import VitlabError
from .factory import read_checkpoint

__all__ = ["Ingredient", "Soup", "check_soup_out", "soup"]


@dataclass
class Ingredient:
    """One model of a soup: what was given, its weight, its held-out score (when scored), whether the soup kept it
    and, in a greedy soup, the score of the soup with it when it was tried (``soup_score``)."""

    checkpoint: str
    weight: float = 1.0
    score: float | None = None
    kept: bool = True
    soup_score: float | None = None

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "weight": self.weight, "score": self.score, "kept": self.kept,
                "soup_score": self.soup_score}


@dataclass
class Soup:
    """What :func:`soup` made: the model (eval mode, with the first ingredient's preprocessing and class names), its
    ingredients in the order given, the method (``uniform``, ``weighted`` or ``greedy``), the soup's own score
    (when scored), the file written (or None) and notes."""

    model: nn.Module
    ingredients: list[Ingredient]
    method: str
    score: float | None = None
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> list[str]:
        """The checkpoints the soup averages."""
        return [i.checkpoint for i in self.ingredients if i.kept]

    def to_dict(self) -> dict:
        """Everything but the model, as plain data (what ``vitlab soup --json`` prints and the file records)."""
        return {"method": self.method, "ingredients": [i.to_dict() for i in self.ingredients],
                "kept": self.kept, "score": self.score, "path": None if self.path is None else str(self.path),
                "notes": list(self.notes)}


def check_soup_out(out: str | os.PathLike) -> Path:
    """Refuse, before any ingredient is read, an output that is not a ``.safetensors`` name or that exists (a soup
    never replaces a file: remove it or choose another name)."""
    return check_new_file(out, ".safetensors", "a soup")


def _reader(prefer_ema: bool, model_name: str | None) -> Callable[[str], Checkpoint]:
    def read(spec: str) -> Checkpoint:
        return read_checkpoint(spec, model_name=model_name, prefer_ema=prefer_ema)
    return read


def _build(ckpt: Checkpoint) -> nn.Module:
    return set_onednn_linear(model_from_checkpoint(ckpt))  # this machine's CPU fast path, as vitlab.load


class _Pot:
    """The ingredients read one at a time (a soup of N models holds two in memory, not N), each checked against the
    first, with the first that names its classes kept as the reference for the others' names."""

    def __init__(self, specs: list[str], read: Callable[[str], Checkpoint]):
        self.specs, self.read = specs, read
        self.first: Checkpoint | None = None
        self.named: Checkpoint | None = None
        self.notes: list[str] = []

    def get(self, index: int) -> Checkpoint:
        ckpt = self.read(self.specs[index])
        if self.first is None:
            self.first = ckpt
        else:
            check_ingredient(self.first, ckpt, self.named)
            if ckpt.preprocessing != self.first.preprocessing and not any(ckpt.path in n for n in self.notes):
                self.notes.append(f"{ckpt.path}: other preprocessing than {self.first.path}; the soup keeps the "
                                  "first's")
        if self.named is None and ckpt.class_names:
            self.named = ckpt
        return ckpt

    def finish(self, total: WeightSum, record: dict) -> Checkpoint:
        """The soup's record: the first ingredient's, its class names those of the first that has them, its
        metadata the head's loss plus ``record``."""
        meta = {k: v for k, v in self.first.metadata.items() if k in ("loss", "multi_label")} \
            if isinstance(self.first.metadata, dict) else {}
        ckpt = total.checkpoint({**meta, "soup": record})  # (a greedy soup's sum starts from its best ingredient)
        ckpt.preprocessing = self.first.preprocessing
        ckpt.class_names = list(self.named.class_names) if self.named is not None else None
        self.notes += ckpt.notes[1:]  # ingredients stored in other dtypes
        return ckpt


def soup(ingredients: Sequence[str | os.PathLike], *, weights: Sequence[float] | None = None,
         score: Callable[[nn.Module], float] | None = None, greedy: bool = False,
         out: str | os.PathLike | None = None, prefer_ema: bool = False, model_name: str | None = None,
         log: Callable[[str], None] | None = None) -> Soup:
    """Average the weights of ``ingredients`` (two or more checkpoints of the same model, anything
    :func:`vitlab.load` reads) into one model.

    - ``weights``: one non-negative number per ingredient (default: all equal, the uniform soup).
    - ``score``: a callable ``model -> float`` (higher is better, e.g. held-out top-1); each ingredient and the soup
      are scored and the scores reported.
    - ``greedy``: the greedy soup (needs ``score``, no ``weights``): ingredients sorted by score (ties in the given
      order), the best first, each next one kept only if the soup's score with it is at least the score without it.
    - ``out``: write the soup there as a vitlab ``.safetensors`` file (refused if it exists), with the first
      ingredient's preprocessing and class names and the soup's record (ingredients, weights, scores, kept) in its
      metadata (``"soup"``).
    - ``prefer_ema``, ``model_name``: as :func:`vitlab.load`, for every ingredient.
    - ``log``: called with a line as each ingredient is scored.

    Ingredients whose architecture, config, tensors, class names or head loss differ are refused in one line naming
    the file. Floating-point tensors are averaged in float64 and rounded once to the first ingredient's dtype;
    integer tensors must be equal. Returns a :class:`Soup`."""
    specs = [os.fspath(s) for s in ingredients]
    if len(specs) < 2:
        raise VitlabError(f"a soup needs at least 2 ingredients, got {len(specs)}")
    if greedy and score is None:
        raise VitlabError("greedy: the greedy soup needs a held-out score (score=...)", options=("greedy", "score"))
    if greedy and weights is not None:
        raise VitlabError("weights: the greedy soup averages the models it keeps uniformly; drop the weights",
                          options=("weights", "greedy"))
    values = check_weights(weights, len(specs)) if weights is not None else [1.0] * len(specs)
    out = check_soup_out(out) if out is not None else None
    say = log or (lambda line: None)
    pot = _Pot(specs, _reader(prefer_ema, model_name))
    items = [Ingredient(spec, weight) for spec, weight in zip(specs, values, strict=True)]
    if greedy:
        total, soup_score = _greedy(pot, items, score, say)
        method = "greedy"
    else:
        total = None
        for i, item in enumerate(items):
            ckpt = pot.get(i)
            if score is not None:
                item.score = float(score(_build(ckpt)))
                say(f"{item.checkpoint}: {item.score:.4f}")
            if total is None:
                total = WeightSum(ckpt, item.weight)
            else:
                total.add(ckpt, item.weight)
            del ckpt  # one ingredient in memory at a time
        method = "uniform" if len(set(values)) == 1 else "weighted"
        soup_score = None
    ckpt = pot.finish(total, {"method": method, "ingredients": [i.to_dict() for i in items]})
    model = _build(ckpt)
    if score is not None and soup_score is None:
        soup_score = float(score(model))
        say(f"soup: {soup_score:.4f}")
    ckpt.metadata["soup"]["score"] = soup_score
    if out is not None:
        save(model, out, metadata=ckpt.metadata)
    return Soup(model, items, method, soup_score, out, pot.notes)


def _greedy(pot: _Pot, items: list[Ingredient], score, say) -> tuple[WeightSum, float]:
    """Recipe 1 of the paper: (the sum of the kept ingredients, the soup's score)."""
    for i, item in enumerate(items):
        item.score = float(score(_build(pot.get(i))))
        say(f"{item.checkpoint}: {item.score:.4f}")
    order = sorted(range(len(items)), key=lambda i: -items[i].score)  # stable: ties keep the given order
    best = order[0]
    total, current = WeightSum(pot.get(best)), items[best].score
    items[best].soup_score = current
    say(f"greedy: start from {items[best].checkpoint} ({current:.4f})")
    for i in order[1:]:
        trial = total.copy()
        trial.add(pot.get(i))
        trial_score = items[i].soup_score = float(score(_build(trial.checkpoint())))
        items[i].kept = trial_score >= current
        say(f"greedy: + {items[i].checkpoint}: {trial_score:.4f} "
            + ("kept" if items[i].kept else f"left out (below {current:.4f})"))
        if items[i].kept:
            total, current = trial, trial_score
    return total, current
