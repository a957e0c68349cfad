"""Training and fine-tuning: recipes, the loop, checkpoints, distributed runs, evaluation and prediction.

Python API (the CLI commands ``vitlab train / finetune / predict`` call these; ``vitlab eval`` is
:func:`vitlab.tasks.eval_checkpoint`, on the same evaluator as :func:`evaluate`):

- ``train(config, resume=None) -> TrainResult``: run a :class:`TrainConfig` (``config.init_from`` fine-tunes).
- ``finetune(checkpoint, config) -> TrainResult``: the same with ``init_from`` set.
- ``evaluate(model, data, split="test", ...) -> dict``: top-1 / top-5 of a model on a data set.
- ``predict(model, images, topk=5) -> list[Prediction]``: top-k classes (or ``features=True``: pooled features) for
  image files, or ``data=`` any data source, in batches (``vitlab/train/predict.py``: folders, streaming;
  ``predict_files.py``: CSV / JSONL / parquet tables, safetensors / npz / parquet features).
- ``get_recipe(name).config(**overrides)``, ``list_recipes()``: the named recipes.

The names are imported on first use (PEP 562): ``vitlab.train.config`` and ``vitlab.train.recipes``, from which the
command line builds ``vitlab train``'s flags, load without torch.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

# public name -> the module of this package that defines it
_EXPORTS = {
    "Prediction": ".predict",
    "Recipe": ".recipes",
    "TrainConfig": ".config",
    "TrainResult": ".loop",
    "apply_overrides": ".config",
    "evaluate": ".api",
    "finetune": ".api",
    "get_recipe": ".recipes",
    "list_recipes": ".recipes",
    "predict": ".predict",
    "register_recipe": ".recipes",
    "train": ".loop",
}

__all__ = ["Prediction", "Recipe", "TrainConfig", "TrainResult", "apply_overrides", "evaluate", "finetune",
           "get_recipe", "list_recipes", "predict", "register_recipe", "train"]

if TYPE_CHECKING:
    from .api import evaluate, finetune
    from .config import TrainConfig, apply_overrides
    from .loop import TrainResult, train
    from .predict import Prediction, predict
    from .recipes import Recipe, get_recipe, list_recipes, register_recipe


__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)


class _Package(types.ModuleType):
    """This package's module type: when the submodule ``predict`` is imported, Python binds it as the package's
    attribute ``predict``, where the function of that name belongs (``from vitlab.train import predict``)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == "." + name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
