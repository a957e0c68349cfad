"""Evaluation as the paper does it: classification accuracy, few-shot linear probes, reports.

Entry points (each returns plain data):

- :func:`evaluate_classifier`, :func:`fewshot_model`: a loaded model and data sets in.
- :func:`evaluate_retrieval`: an image-text model and captioned images in (image <-> text recall@K).
- :func:`fewshot_evaluate`, :func:`classification_metrics`, :func:`retrieval_metrics` and the probes: tensors in.

Every function returns plain data (dicts of numbers, lists and strings) that the report writers turn into JSON,
Markdown and PNG files. What takes a checkpoint by name (``vitlab eval / fewshot / suite``) and the VTAB-1k-style
suite, which fine-tunes, are in :mod:`vitlab.tasks`: this package never imports training.
"""

from .classification import evaluate_classifier, load_label_sets
from .features import REPRESENTATIONS, extract_features, model_outputs
from .fewshot import fewshot_evaluate, fewshot_model, tuned_probe
from .metrics import classification_metrics, expected_calibration_error, multilabel_accuracy, topk_accuracy
from .probes import KNNClassifier, LeastSquaresClassifier, LogisticProbe, make_probe
from .retrieval import evaluate_retrieval, retrieval_metrics

__all__ = [
    "REPRESENTATIONS",
    "KNNClassifier",
    "LeastSquaresClassifier",
    "LogisticProbe",
    "classification_metrics",
    "evaluate_classifier",
    "evaluate_retrieval",
    "expected_calibration_error",
    "extract_features",
    "fewshot_evaluate",
    "fewshot_model",
    "load_label_sets",
    "make_probe",
    "model_outputs",
    "multilabel_accuracy",
    "retrieval_metrics",
    "topk_accuracy",
    "tuned_probe",
]
