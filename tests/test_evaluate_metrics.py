"""Classification metrics against hand-computed values and scikit-learn."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import recall_score, top_k_accuracy_score

from vitlab.errors import VitlabError
from vitlab.evaluate.classification import load_label_sets
from vitlab.evaluate.metrics import (
    classification_metrics,
    expected_calibration_error,
    multilabel_accuracy,
    topk_accuracy,
)


def test_top1_and_top2_by_hand():
    logits = torch.tensor([
        [0.1, 0.7, 0.2],   # pred 1, second 2
        [0.9, 0.05, 0.05],  # pred 0, second 1 (tie 1/2 -> lower index)
        [0.2, 0.3, 0.5],   # pred 2, second 1
        [0.6, 0.1, 0.3],   # pred 0, second 2
    ])
    labels = torch.tensor([1, 2, 1, 2])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc[1] == 0.25  # only sample 0
    assert acc[2] == 0.75  # samples 0, 2, 3
    assert acc[5] == 1.0  # k capped at the class count


def test_topk_per_class_and_confusion_match_sklearn():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 12, generator=gen)
    labels = torch.randint(0, 12, (500,), generator=gen)
    labels[:40] = logits[:40].argmax(1)  # some correct predictions
    out = classification_metrics(logits, labels, ks=(1, 5))
    y, scores = labels.numpy(), logits.numpy()
    assert out["top1"] == pytest.approx(top_k_accuracy_score(y, scores, k=1, labels=range(12)), abs=1e-12)
    assert out["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(12)), abs=1e-12)
    pred = scores.argmax(1)
    assert out["confusion_matrix"] == sk_confusion(y, pred, labels=range(12)).tolist()
    np.testing.assert_allclose(out["per_class_accuracy"], recall_score(y, pred, average=None, labels=range(12)))
    assert out["num_samples"] == 500 and out["num_classes"] == 12


def test_class_without_samples_has_no_accuracy_and_is_left_out_of_the_mean():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    out = classification_metrics(logits, torch.tensor([0, 0, 2]), ks=(1,))
    assert out["per_class_accuracy"] == [0.5, None, 0.0]
    assert out["mean_class_accuracy"] == 0.25


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.4 (correct)
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.2, 0.6, 0.2], [0.4, 0.25, 0.35]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    # 10 bins closed on the right: 0.9 -> bin 8 (0.8, 0.9]; 0.6 -> bin 5 (0.5, 0.6]; 0.4 -> bin 3 (0.3, 0.4]
    out = expected_calibration_error(probs, labels, num_bins=10)
    expected = (2 / 4) * abs(0.5 - 0.9) + (1 / 4) * abs(1.0 - 0.6) + (1 / 4) * abs(1.0 - 0.4)
    assert out["ece"] == pytest.approx(expected, abs=1e-12)
    assert out["count"] == [0, 0, 0, 1, 0, 1, 0, 0, 2, 0]
    assert out["accuracy"][8] == 0.5 and out["confidence"][8] == pytest.approx(0.9)
    perfect = expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert perfect["ece"] == 0.0


def test_real_style_multilabel_counts_any_label_and_skips_empty_sets():
    preds = torch.tensor([3, 1, 4, 0])
    out = multilabel_accuracy(preds, [[3, 5], [2], [], [0]])
    assert out == {"accuracy": 2 / 3, "counted": 3, "skipped": 1}
    logits = torch.nn.functional.one_hot(preds, 6).float()
    full = classification_metrics(logits, torch.tensor([3, 2, 4, 1]), ks=(1,), label_sets=[[3, 5], [2], [], [0]])
    assert full["top1"] == 0.5 and full["real"]["accuracy"] == 2 / 3


def test_label_files_as_list_or_by_file_name(tmp_path):
    as_list = tmp_path / "real.json"
    as_list.write_text(json.dumps([[1], [], [2, 3]]))
    assert load_label_sets(as_list) == [[1], [], [2, 3]]
    by_name = tmp_path / "by_name.json"
    by_name.write_text(json.dumps({"a.png": [0], "b.png": [4, 5]}))
    assert load_label_sets(by_name, ["dir/b.png", "dir/a.png"]) == [[4, 5], [0]]
    with pytest.raises(VitlabError, match="no entry for 1 images"):
        load_label_sets(by_name, ["c.png"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(VitlabError, match="cannot read it as JSON"):
        load_label_sets(bad)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="labels must lie in"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels file has 1 entries"):
        multilabel_accuracy(torch.tensor([0, 1]), [[0]])
