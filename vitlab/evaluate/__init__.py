"""Evaluation as the paper does it: classification accuracy, few-shot linear probes, VTAB-1k-style suites, reports.

Every function returns plain data (dicts of numbers, lists and strings) that the report writers turn into JSON,
Markdown and PNG files.
"""

from .classification import evaluate_classifier, load_label_sets
from .features import REPRESENTATIONS, extract_features, model_outputs
from .fewshot import fewshot_evaluate, tuned_probe
from .metrics import classification_metrics, expected_calibration_error, multilabel_accuracy, topk_accuracy
from .probes import KNNClassifier, LeastSquaresClassifier, LogisticProbe, make_probe

__all__ = [
    "REPRESENTATIONS",
    "KNNClassifier",
    "LeastSquaresClassifier",
    "LogisticProbe",
    "classification_metrics",
    "evaluate_classifier",
    "expected_calibration_error",
    "extract_features",
    "fewshot_evaluate",
    "load_label_sets",
    "make_probe",
    "model_outputs",
    "multilabel_accuracy",
    "topk_accuracy",
    "tuned_probe",
]
