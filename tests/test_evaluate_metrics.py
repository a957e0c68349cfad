"""Classification metrics against hand-computed values and scikit-learn."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_recall_fscore_support, recall_score, top_k_accuracy_score

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
    assert out["samples"] == 500 and out["num_classes"] == 12
    assert out["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


def test_class_without_samples_has_no_accuracy_and_is_left_out_of_the_mean():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    out = classification_metrics(logits, torch.tensor([0, 0, 2]), ks=(1,))
    assert out["per_class_accuracy"] == [0.5, None, 0.0]
    assert out["mean_class_accuracy"] == 0.25


def test_precision_f1_and_macro_f1_match_sklearn_also_with_classes_never_predicted_or_present():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 7, generator=gen)
    logits[:, 5] -= 100  # class 5: never predicted
    labels = torch.randint(0, 6, (300,), generator=gen)  # class 6: never present (but predicted)
    labels[:60] = logits[:60].argmax(1).clamp(max=5)  # some correct predictions (none of class 6)
    out = classification_metrics(logits, labels, ks=(1,))
    y, pred = labels.numpy(), logits.argmax(1).numpy()
    precision, _, f1, _ = precision_recall_fscore_support(y, pred, labels=range(7), zero_division=0)
    assert out["per_class_precision"][5] is None and out["per_class_precision"][6] == 0.0
    np.testing.assert_allclose([p or 0.0 for p in out["per_class_precision"]], precision, atol=1e-12)
    np.testing.assert_allclose(out["per_class_f1"], f1, atol=1e-12)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    # a class neither present nor predicted has no F1 and is left out of the macro mean, as scikit-learn leaves it
    out = classification_metrics(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 0]), ks=(1,))
    assert out["per_class_f1"] == [pytest.approx(2 / 3), 0.0, None]
    assert out["macro_f1"] == pytest.approx(f1_score([0, 0], [0, 1], average="macro", zero_division=0))


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
    assert "top5" not in classification_metrics(logits[:, :4], torch.tensor([3, 2, 1, 1]))  # 4 classes


def test_label_files_as_list_or_by_file_name(tmp_path):
    as_list = tmp_path / "real.json"
    as_list.write_text(json.dumps([[1], [], [2, 3]]))
    assert load_label_sets(as_list) == [[1], [], [2, 3]]
    by_name = tmp_path / "by_name.json"
    by_name.write_text(json.dumps({"a.png": [0], "b.png": [4, 5]}))
    assert load_label_sets(by_name, ["dir/b.png", "dir/a.png"]) == [[4, 5], [0]]
    # a list with file names follows sorted base names (ReaL: entry i is ILSVRC2012_val_{i+1:08d}), not folder order
    assert load_label_sets(as_list, ["dog/c.png", "cat/b.png", "ant/a.png"]) == [[2, 3], [], [1]]
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


class _WithUnreadable(torch.utils.data.Dataset):
    """Five samples; sample 2 stands in for a file that could not be decoded."""

    class Bad:
        reason = "img2.png: truncated"

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return (self.Bad() if i == 2 else torch.full((1, 4, 4), float(i))), i % 2


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(7):
            yield torch.full((1, 4, 4), float(i)), i % 2


def _mean_pixel_model():
    """A stand-in classifier: logits (x, -x) from the mean pixel, with the config fields evaluation reads."""

    class Model(torch.nn.Module):
        cfg = type("Cfg", (), {"in_chans": 1, "img_size": (4, 4), "num_classes": 2})()

        def forward(self, x):
            m = x.mean(dim=(1, 2, 3)) - 2.5
            return torch.stack([-m, m], dim=1)

    return Model()


def test_unreadable_samples_are_skipped_counted_and_left_out_of_real_scores():
    from vitlab.evaluate.classification import evaluate_classifier

    reasons = []
    out = evaluate_classifier(_mean_pixel_model(), _WithUnreadable(), batch_size=2, ks=(1,),
                              label_sets=[[0], [1], [1], [0], [1]], on_skipped=reasons.extend)
    # samples 0, 1, 3, 4 with labels 0, 1, 1, 0: predictions 0, 0, 1, 1 -> two right
    assert out["samples"] == 4 and out["skipped"] == 1 and out["top1"] == 0.5
    assert reasons == ["img2.png: truncated"]
    assert out["real"] == {"accuracy": 0.5, "counted": 4, "skipped": 0}  # sample 2's label set is dropped too


def test_iterable_datasets_are_read_as_a_stream():
    from vitlab.evaluate.features import model_outputs

    outputs, labels, indices = model_outputs(_mean_pixel_model(), _Stream(), batch_size=3)
    assert indices.tolist() == list(range(7)) and labels.tolist() == [i % 2 for i in range(7)]
    assert outputs[:, 1].tolist() == [i - 2.5 for i in range(7)]
