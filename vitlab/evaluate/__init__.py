"""Evaluation as the paper does it: classification accuracy, few-shot linear probes, VTAB-1k-style suites, reports.

Entry points (each returns plain data and, given an output folder, writes the report):

- :func:`eval_checkpoint` (``vitlab eval``), :func:`fewshot_checkpoint` (``vitlab fewshot``),
  :func:`suite_checkpoint` (``vitlab suite``): checkpoint and data names in.
- :func:`evaluate_classifier`, :func:`fewshot_model`, :func:`run_suite`: a loaded model and data sets in.
- :func:`fewshot_evaluate`, :func:`classification_metrics` and the probes: tensors in.

Every function returns plain data (dicts of numbers, lists and strings) that the report writers turn into JSON,
Markdown and PNG files.
"""

from .classification import evaluate_classifier, load_label_sets
from .features import REPRESENTATIONS, extract_features, model_outputs
from .fewshot import fewshot_evaluate, fewshot_model, tuned_probe
from .metrics import classification_metrics, expected_calibration_error, multilabel_accuracy, topk_accuracy
from .probes import KNNClassifier, LeastSquaresClassifier, LogisticProbe, make_probe
from .runs import eval_checkpoint, fewshot_checkpoint, suite_checkpoint
from .suite import run_suite
from .suite_config import SuiteConfig, TaskConfig, load_suite_config, parse_suite_config

__all__ = [
    "REPRESENTATIONS",
    "SuiteConfig",
    "TaskConfig",
    "KNNClassifier",
    "LeastSquaresClassifier",
    "LogisticProbe",
    "classification_metrics",
    "eval_checkpoint",
    "evaluate_classifier",
    "expected_calibration_error",
    "extract_features",
    "fewshot_checkpoint",
    "fewshot_evaluate",
    "fewshot_model",
    "load_label_sets",
    "load_suite_config",
    "make_probe",
    "model_outputs",
    "multilabel_accuracy",
    "parse_suite_config",
    "run_suite",
    "suite_checkpoint",
    "topk_accuracy",
    "tuned_probe",
]
