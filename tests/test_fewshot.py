"""Few-shot probes and protocol: the closed-form solver against direct solutions, kNN and the logistic probe against
scikit-learn, the shot / held-out splits, separable data, reproducibility."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier

from vitlab.errors import VitlabError
from vitlab.evaluate.fewshot import fewshot_evaluate, fewshot_splits, tuned_probe
from vitlab.evaluate.probes import (
    KNNClassifier,
    LeastSquaresClassifier,
    LogisticProbe,
    map_scores,
    ridge_solution,
    select,
    signed_one_hot,
)


def _random_problem(n, d, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3 + 1
    y = torch.arange(n) % k
    return x, y


@pytest.mark.parametrize("n,d", [(200, 16), (12, 40)])  # primal (N >= D) and dual (N < D) forms
@pytest.mark.parametrize("l2", [1e-3, 1.0, 300.0])
def test_closed_form_matches_lstsq_and_sklearn_ridge(n, d, l2):
    x, y = _random_problem(n, d, 5)
    clf = LeastSquaresClassifier(bias_constant=100.0).fit(x, y, 5)
    design = clf._design(x)  # standardised features + constant 100 column
    targets = signed_one_hot(y, 5)
    # ridge as an ordinary least-squares problem on the stacked system [X; sqrt(l2) I] W = [Y; 0]
    stacked_x = torch.cat([design, l2**0.5 * torch.eye(design.shape[1], dtype=torch.float64)])
    stacked_y = torch.cat([targets, torch.zeros(design.shape[1], 5, dtype=torch.float64)])
    direct = torch.linalg.lstsq(stacked_x, stacked_y, driver="gelsd").solution
    sk = Ridge(alpha=l2, fit_intercept=False, solver="svd").fit(design.numpy(), targets.numpy()).coef_.T
    w = clf.weights(l2)
    torch.testing.assert_close(w, direct, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(w.numpy(), sk, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ridge_solution(design, targets, l2), direct, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(clf.scores(x, l2), design @ direct, rtol=1e-6, atol=1e-7)


def test_closed_form_without_standardisation_uses_raw_features_plus_constant():
    x, y = _random_problem(50, 8, 3, seed=1)
    clf = LeastSquaresClassifier(bias_constant=1.0, standardize=False).fit(x, y, 3)
    design = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    sk = Ridge(alpha=0.5, fit_intercept=False).fit(design.numpy(), signed_one_hot(y, 3).numpy()).coef_.T
    np.testing.assert_allclose(clf.weights(0.5).numpy(), sk, rtol=1e-6, atol=1e-9)


def _separable(num_classes=10, per_class=60, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 10
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=gen)
    return x, y


@pytest.mark.parametrize("method", ["lsr", "knn", "linear"])
def test_separable_features_score_100_percent_at_every_shot_count(method):
    x, y = _separable()
    xt, yt = _separable(seed=0)  # same centres (same generator start), fresh noise below
    xt = xt + torch.randn(xt.shape, generator=torch.Generator().manual_seed(5)) * 0.5
    out = fewshot_evaluate(x, y, xt, yt, shots=(1, 5, 25), seeds=(0, 1), methods=(method,), holdout_per_class=5)
    for n in ("1", "5", "25"):
        assert out["methods"][method]["results"][n]["accuracy"] == [1.0, 1.0]


def test_splits_are_nested_balanced_and_disjoint_from_the_holdout():
    y = torch.arange(7).repeat(40)
    sets, holdout = fewshot_splits(y, 7, (1, 5, 10), 8, seed=3)
    assert set(sets[1].tolist()) <= set(sets[5].tolist()) <= set(sets[10].tolist())
    for n, idx in sets.items():
        assert torch.bincount(y[idx], minlength=7).tolist() == [n] * 7
    assert torch.bincount(y[holdout], minlength=7).tolist() == [8] * 7
    assert not set(holdout.tolist()) & set(sets[10].tolist())
    again, holdout_again = fewshot_splits(y, 7, (1, 5, 10), 8, seed=3)
    assert torch.equal(again[5], sets[5]) and torch.equal(holdout_again, holdout)
    other, _ = fewshot_splits(y, 7, (1, 5, 10), 8, seed=4)
    assert not torch.equal(other[10], sets[10])
    # asking for fewer shot counts draws the same sets and the same held-out images
    fewer, holdout_fewer = fewshot_splits(y, 7, (5,), 8, seed=3)
    assert torch.equal(fewer[5], sets[5]) and torch.equal(holdout_fewer, holdout)
    with pytest.raises(VitlabError, match="need 48 training samples per class"):
        fewshot_splits(y, 7, (1, 40), 8, seed=0)


def test_fewshot_is_reproducible_and_more_shots_help_on_noisy_data():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 20, generator=gen)
    y = torch.arange(5).repeat(100)
    x = centres[y] + torch.randn(500, 20, generator=gen) * 0.8
    yt = torch.arange(5).repeat(60)
    xt = centres[yt] + torch.randn(300, 20, generator=gen) * 0.8
    a = fewshot_evaluate(x, y, xt, yt, shots=(1, 5, 25), seeds=(0, 1, 2), methods=("lsr", "knn"))
    b = fewshot_evaluate(x, y, xt, yt, shots=(1, 5, 25), seeds=(0, 1, 2), methods=("lsr", "knn"))
    assert a == b
    alone = fewshot_evaluate(x, y, xt, yt, shots=(5,), seeds=(0, 1, 2), methods=("lsr",))
    assert alone["methods"]["lsr"]["results"]["5"] == a["methods"]["lsr"]["results"]["5"]
    lsr = a["methods"]["lsr"]["results"]
    assert lsr["1"]["mean"] < lsr["25"]["mean"]
    assert lsr["25"]["mean"] > 0.9
    assert a["methods"]["lsr"]["param_name"] == "l2" and len(lsr["5"]["chosen"]) == 3


def test_knn_matches_sklearn_cosine_neighbours_of_centred_features():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(80, 6, generator=gen) + 3.0  # the offset makes centring matter
    y = (x[:, 0] > 3.0).long()  # two classes, odd k: no ties
    xt = torch.randn(50, 6, generator=gen) + 3.0
    for k in (1, 5):
        ours = KNNClassifier().fit(x, y, 2).scores(xt, k).argmax(1)
        centre = x.mean(0)
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit((x - centre).numpy(), y)
        assert ours.tolist() == ref.predict((xt - centre).numpy()).tolist()


def test_knn_breaks_vote_ties_by_similarity():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # already centred
    probe = KNNClassifier().fit(x, torch.tensor([0, 1]), 2)
    assert probe.scores(torch.tensor([[-0.2, 1.0]]), 2).argmax().item() == 1  # one vote each, class 1 is closer
    assert probe.scores(torch.tensor([[0.2, 1.0]]), 2).argmax().item() == 0


def test_logistic_probe_matches_sklearn_logistic_regression():
    x, y = _random_problem(120, 5, 3, seed=4)
    wd = 0.05
    probe = LogisticProbe(grid=(wd,)).fit(x, y, 3)
    standardised = ((x - probe.mean) / probe.std).numpy()
    # mean cross-entropy + wd/2 |W|^2  ==  (1 / (wd N)) * (sum of cross-entropies) + 1/2 |W|^2
    ref = LogisticRegression(C=1.0 / (wd * len(y)), tol=1e-10, max_iter=10000).fit(standardised, y.numpy())
    probs = probe.scores(x, wd).softmax(1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(standardised), atol=1e-5)


def test_selection_prefers_the_strongest_regularisation_among_ties():
    x, y = _separable(num_classes=3, per_class=10)
    probe = LeastSquaresClassifier(grid=(0.1, 1.0, 10.0)).fit(x, y, 3)
    chosen, accs = select(probe, x, y)
    assert accs == {0.1: 1.0, 1.0: 1.0, 10.0: 1.0} and chosen == 10.0


def test_tuned_probe_refits_on_train_plus_val():
    x, y = _separable(num_classes=4, per_class=30)
    out = tuned_probe("lsr", (x[::2], y[::2]), (x[1::2], y[1::2]), (x, y), 4, grid=(1.0, 4.0))
    assert out["accuracy"] == 1.0 and out["chosen"] == 4.0 and out["param_name"] == "l2"


def test_bad_method_and_shots_are_clear_errors():
    x, y = _separable(num_classes=2, per_class=40)
    with pytest.raises(ValueError, match="unknown probe 'svm'"):
        fewshot_evaluate(x, y, x, y, methods=("svm",))
    with pytest.raises(VitlabError, match="shots must be positive"):
        fewshot_evaluate(x, y, x, y, shots=(0, 5))


def test_fewshot_model_embeds_only_the_drawn_images_and_matches_full_features():
    from torch.utils.data import TensorDataset

    from tests.conftest import randomize_
    from vitlab.evaluate.features import extract_features
    from vitlab.evaluate.fewshot import fewshot_model
    from vitlab.models import VisionTransformer, ViTConfig

    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2,
                    mlp_dim=32)
    model = randomize_(VisionTransformer(cfg), std=0.2).eval()
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(40)
    images = torch.randn(120, 1, 8, 8, generator=gen) + y.float()[:, None, None, None]
    train, test = TensorDataset(images[:90], y[:90]), TensorDataset(images[90:], y[90:])
    out = fewshot_model(model, train, test, shots=(1, 5), seeds=(0, 1), holdout_per_class=4, batch_size=16,
                        methods=("lsr",), representation="cls_token")
    x, _ = extract_features(model, train, representation="cls_token")
    xt, _ = extract_features(model, test, representation="cls_token")
    ref = fewshot_evaluate(x, y[:90], xt, y[90:], shots=(1, 5), seeds=(0, 1), holdout_per_class=4, methods=("lsr",))
    assert out["methods"] == ref["methods"]
    assert out["representation"] == "cls_token" and out["num_images_embedded"] < 90


def _multilabel_problem(n, d=12, k=4, seed=0):
    """Features whose first k dimensions carry the labels (+2 where present) plus noise; multi-hot targets (n, k)."""
    gen = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, k, generator=gen) < 0.4).float()
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, :k] += 2.0 * targets.double()
    return x, targets


def test_multi_hot_targets_regress_onto_signed_labels_and_are_scored_by_map():
    from sklearn.metrics import average_precision_score

    x, y = _multilabel_problem(60)
    clf = LeastSquaresClassifier().fit(x, y, 4)
    design = clf._design(x)
    sk = Ridge(alpha=3.0, fit_intercept=False, solver="svd").fit(design.numpy(), (2 * y - 1).double().numpy())
    np.testing.assert_allclose(clf.weights(3.0).numpy(), sk.coef_.T, rtol=1e-7, atol=1e-9)
    xt, yt = _multilabel_problem(40, seed=1)
    scores = clf.scores(xt, 3.0)
    macro, micro = map_scores(scores, yt)
    assert macro == pytest.approx(average_precision_score(yt.numpy(), scores.numpy(), average="macro"), abs=1e-12)
    assert micro == pytest.approx(average_precision_score(yt.numpy(), scores.numpy(), average="micro"), abs=1e-12)
    # the other probes take multi-hot targets too
    for probe in (KNNClassifier(), LogisticProbe(grid=(1e-2,), max_iter=50)):
        fitted = probe.fit(x, y, 4)
        assert map_scores(fitted.scores(xt, fitted.grid[-1]), yt)[0] > 0.7


def test_multi_label_fewshot_draws_shots_per_label_and_reports_map():
    from sklearn.metrics import average_precision_score

    x, y = _multilabel_problem(200)
    xt, yt = _multilabel_problem(80, seed=1)
    shot_sets, holdout = fewshot_splits(y, 4, (1, 3, 5), 4, seed=2)
    assert set(shot_sets[1].tolist()) <= set(shot_sets[3].tolist()) <= set(shot_sets[5].tolist())
    assert not set(holdout.tolist()) & set(shot_sets[5].tolist())
    assert (y[holdout].sum(0) >= 4).all()
    for n, idx in shot_sets.items():
        assert (y[idx].sum(0) >= n).all() and (y[idx].sum(1) > 0).all()
    out = fewshot_evaluate(x, y, xt, yt, shots=(1, 5), seeds=(0, 1), methods=("lsr", "knn"), holdout_per_class=4)
    assert out["multi_label"] and out["num_classes"] == 4
    five = out["methods"]["lsr"]["results"]["5"]
    assert "accuracy" not in five and five["mean"] == pytest.approx(np.mean(five["map_macro"]))
    # the chosen probe of seed 0, refitted on its shots, scored by scikit-learn
    shot_sets, _ = fewshot_splits(y, 4, (1, 5), 4, seed=0)
    probe = LeastSquaresClassifier().fit(x[shot_sets[5]], y[shot_sets[5]], 4)
    scores = probe.scores(xt, five["chosen"][0]).numpy()
    assert five["map_macro"][0] == pytest.approx(average_precision_score(yt.numpy(), scores, average="macro"))
    assert five["map_micro"][0] == pytest.approx(average_precision_score(yt.numpy(), scores, average="micro"))
    assert five["mean"] > float(yt.mean()) + 0.2  # a constant score's mAP is the positive rate (~0.4)
    with pytest.raises(VitlabError, match=r"too few with label 3 \(0\)"):
        fewshot_splits(torch.cat([y[:, :3], torch.zeros(200, 1)], 1), 4, (1,), 2, seed=0)
