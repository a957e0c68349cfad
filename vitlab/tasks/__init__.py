"""Tasks: what composes training and evaluation, or starts from a checkpoint by name.

- :func:`eval_checkpoint` (``vitlab eval``), :func:`fewshot_checkpoint` (``vitlab fewshot``),
  :func:`suite_checkpoint` (``vitlab suite``), :func:`retrieval_checkpoint` (``vitlab eval --retrieval``):
  checkpoint and data names in, results (and a report folder) out.
- :func:`soup_checkpoints` (``vitlab soup``): a uniform, weighted or greedy model soup of checkpoints, scored on
  held-out data (:func:`vitlab.soup` with top-1 accuracy as its score).
- :func:`run_suite`: a VTAB-1k-style suite of tasks (fine-tuned or few-shot) on a loaded model;
  :func:`load_suite_config` / :func:`parse_suite_config` read its TOML / JSON description.

The evaluators themselves (:mod:`vitlab.evaluate`) and the training loop (:mod:`vitlab.train`) sit below this layer
and never import it.
"""

from .runs import eval_checkpoint, fewshot_checkpoint, load_for_eval, retrieval_checkpoint, suite_checkpoint
from .soup import heldout_dataset, soup_checkpoints, top1_scorer
from .suite import run_suite
from .suite_config import SuiteConfig, TaskConfig, load_suite_config, parse_suite_config

__all__ = [
    "SuiteConfig",
    "TaskConfig",
    "eval_checkpoint",
    "fewshot_checkpoint",
    "heldout_dataset",
    "load_for_eval",
    "load_suite_config",
    "parse_suite_config",
    "retrieval_checkpoint",
    "run_suite",
    "soup_checkpoints",
    "suite_checkpoint",
    "top1_scorer",
]
