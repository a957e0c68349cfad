"""Imbalanced classes and early stopping: loss weights equal scikit-learn's "balanced" class weights, the sampled
class shares follow 1 / n_c (or its root) over many epochs, the counts come from every random-access source without
reading an image, sources read in order are refused in one line, and early stopping ends a run that stopped
improving, keeps its best model and leaves it finished on resume."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitlab
from vitlab.cli import main as cli_main
from vitlab.data import ArrayDataset, build_dataset
from vitlab.data.balance import class_counts, loss_weights, sample_classes, sampling_weights
from vitlab.data.loaders import Augment, FolderTrainLoader, InMemoryTrainLoader, _showings, epoch_order
from vitlab.errors import VitlabError
from vitlab.train import train
from vitlab.train.objectives import Classification, sigmoid_loss
from vitlab.train.runfolder import early_stop_due

from .test_train import tiny_config


def test_balanced_loss_weights_are_scikit_learns_and_keep_the_mean_weight_at_one():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.repeat([0, 1, 2, 3], [5, 20, 60, 15])
    counts = torch.bincount(torch.from_numpy(labels))
    weights = loss_weights(counts, len(labels), "balanced")
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    root = loss_weights(counts, len(labels), "sqrt")
    assert float((counts * root).sum()) == pytest.approx(len(labels), rel=1e-6)  # the average image weighs 1
    assert float(root[0] / root[2]) == pytest.approx(np.sqrt(60 / 5), rel=1e-6)
    # a class without images weighs nothing and does not move the others
    with_empty = loss_weights(torch.tensor([5, 0, 20]), 25, "balanced")
    np.testing.assert_allclose(with_empty.numpy(), [25 / (2 * 5), 0.0, 25 / (2 * 20)], rtol=1e-6)
    # multi-label: each label's positives weigh negatives / positives (torch's pos_weight convention)
    pos = loss_weights(torch.tensor([10, 50, 0]), 100, "balanced", multi_label=True)
    np.testing.assert_allclose(pos.numpy(), [9.0, 1.0, 1.0], rtol=1e-6)


def test_the_weighted_losses_are_the_weighted_means():
    config = tiny_config(Path("."))
    logits, labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 1, 2, 2, 2])
    weights = torch.tensor([2.0, 0.5, 1.0])
    objective = Classification(config, 3)
    objective.set_class_weights(weights)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    expected = (weights[labels] * per_image).sum() / weights[labels].sum()
    torch.testing.assert_close(objective.loss(logits, labels), expected)
    torch.testing.assert_close(expected, F.cross_entropy(logits, labels, weight=weights))  # torch's, unsmoothed
    # with label smoothing each image keeps its class's weight (torch's weight= would also weigh the smoothing
    # mass by class); a mixup row weighs as its mixture
    smoothed = Classification(config.replace(label_smoothing=0.2), 3)
    smoothed.set_class_weights(weights)
    per_image = F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.2)
    expected = (weights[labels] * per_image).sum() / weights[labels].sum()
    torch.testing.assert_close(smoothed.loss(logits, labels), expected)
    mixed = 0.7 * F.one_hot(labels, 3).float() + 0.3 * F.one_hot(labels.roll(1), 3).float()
    row_weight = 0.7 * weights[labels] + 0.3 * weights[labels.roll(1)]
    per_image = F.cross_entropy(logits, mixed, reduction="none")
    torch.testing.assert_close(objective.loss(logits, mixed), (row_weight * per_image).sum() / row_weight.sum())
    hot = F.one_hot(labels, 3).float()
    terms = -(weights * hot * F.logsigmoid(logits) + (1 - hot) * F.logsigmoid(-logits))
    torch.testing.assert_close(sigmoid_loss(logits, hot, pos_weight=weights), terms.sum(1).mean())


def test_balanced_sampling_draws_classes_in_the_asked_shares():
    classes = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    for mode, expected in [("balanced", [1 / 3, 1 / 3, 1 / 3]),
                           ("sqrt", np.sqrt([900, 90, 10]) / np.sqrt([900, 90, 10]).sum())]:
        weights = sampling_weights(classes, 3, mode)
        drawn = torch.cat([epoch_order(len(classes), seed=1, epoch=e, weights=weights)[0] for e in range(30)])
        share = torch.bincount(classes[drawn], minlength=3).double() / len(drawn)
        np.testing.assert_allclose(share.numpy(), expected, atol=0.012)
    # an epoch keeps its length; a sample drawn again counts its showings; unlabelled samples are never drawn
    weights = sampling_weights(torch.tensor([0, 0, 0, 1, -1]), 2, "balanced")
    assert weights[-1] == 0
    indices, copies = epoch_order(5, seed=0, epoch=0, weights=weights)
    assert len(indices) == 5 and 4 not in indices.tolist()
    assert _showings(torch.tensor([3, 1, 3, 3, 0, 1])).tolist() == [0, 0, 1, 2, 0, 1]
    assert torch.equal(copies, _showings(indices))
    # with repeated augmentation the draws come in runs of the repeat count
    indices, copies = epoch_order(12, seed=0, epoch=0, repeats=3, weights=torch.ones(12))
    assert (indices.view(4, 3) == indices.view(4, 3)[:, :1]).all()


def test_a_balanced_in_memory_epoch_is_the_same_split_over_processes():
    labels = torch.tensor([0] * 30 + [1] * 6)
    images = torch.randint(0, 256, (36, 1, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ds = ArrayDataset(images, labels, ["many", "few"], "toy")
    weights = sampling_weights(labels, 2, "balanced")
    aug = Augment(policy="inception")
    whole = list(InMemoryTrainLoader(ds, 12, (6, 6), aug, seed=3, weights=weights).epoch(0))
    assert len(whole) == 3 and 0.3 < float(torch.cat([b.labels for b in whole]).float().mean()) < 0.7
    halves = [list(InMemoryTrainLoader(ds, 12, (6, 6), aug, seed=3, rank=r, world_size=2, weights=weights).epoch(0))
              for r in range(2)]
    for step, batch in enumerate(whole):
        torch.testing.assert_close(torch.cat([h[step].images for h in halves]), batch.images, rtol=0, atol=1e-6)


def _imbalanced_folder(root, counts=(8, 2)):
    rng = np.random.default_rng(0)
    for cls, n in zip(("common", "rare"), counts):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_a_rare_image_drawn_twice_from_a_folder_is_augmented_its_own_way_each_time(tmp_path):
    ds = build_dataset(_imbalanced_folder(tmp_path / "d"))
    weights = sampling_weights(sample_classes(ds), 2, "balanced")
    loader = FolderTrainLoader(ds, 10, (8, 8), Augment(policy="inception", crop_scale=(0.2, 1.0)), seed=0,
                               weights=weights)
    (batch,) = list(loader.epoch(0))
    indices, copies = epoch_order(10, 0, 0, weights=weights)
    assert int((batch.labels == 1).sum()) == int((indices >= 8).sum()) >= 3  # 2 rare images, drawn ~5 times
    seen = {}
    for image, index in zip(batch.images, indices.tolist()):
        for other in seen.get(index, []):
            assert not torch.equal(image, other)
        seen.setdefault(index, []).append(image)
    assert max(copies.tolist()) >= 1


def test_counts_come_from_every_random_access_source(tmp_path):
    folder = _imbalanced_folder(tmp_path / "d")
    counts, total = class_counts(build_dataset(folder))
    assert counts.tolist() == [8, 2] and total == 10
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels"])
        for i in range(8):
            w.writerow([str(folder / "common" / f"{i}.png"), "common|rare" if i < 3 else "common"])
    ds = build_dataset(manifest)
    counts, total = class_counts(ds)
    assert counts.tolist() == [8, 3] and total == 8
    with pytest.raises(VitlabError, match="sampling draws images by their one class; multi-label"):
        sample_classes(ds)
    datasets = pytest.importorskip("datasets")
    files = sorted(folder.rglob("*.png"))
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": None} for p in files],
         "label": [p.parent.name for p in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "t.parquet"))
    hf = build_dataset(tmp_path / "t.parquet")
    assert class_counts(hf)[0].tolist() == [8, 2] and sample_classes(hf).tolist() == [0] * 8 + [1] * 2


def test_sources_read_in_order_are_refused_in_one_line(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        class_names = ["a", "b"]

        def __iter__(self):
            return iter(())

    with pytest.raises(VitlabError, match="class_weights needs the training labels before the run, which tar shards"):
        class_counts(Stream())
    with pytest.raises(VitlabError, match="balanced sampling needs random access"):
        FolderTrainLoader(Stream(), 6, (8, 8), Augment(), weights=torch.ones(4))


def test_a_weighted_balanced_run_logs_its_counts_and_balanced_accuracy(tmp_path):
    result = train(tiny_config(tmp_path, epochs=2, class_weights="balanced", sampling="sqrt"))
    log = (result.run_dir / "log.txt").read_text()
    assert "class weights (balanced): rarest class" in log and "sqrt sampling: rarest class" in log
    assert "mean_class_accuracy" in log
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert evals and all(0 <= r["mean_class_accuracy"] <= 1 for r in evals)
    # the logged balanced accuracy is the mean of the per-class recalls of the saved model
    model = vitlab.load(result.model_path)
    report = vitlab.evaluate.evaluate_classifier(model, _digits_test(model), batch_size=500)
    assert evals[-1]["mean_class_accuracy"] == pytest.approx(report["mean_class_accuracy"], abs=1e-6)


def _digits_test(model):
    from vitlab.data import load_arrays
    from vitlab.data.loaders import in_memory_eval_batches

    return list(in_memory_eval_batches(load_arrays("digits", "test"), vitlab.models.metadata_of(model).preprocessing))


def test_early_stop_counts_evaluations_since_the_best():
    config = tiny_config(Path("."), early_stop=2)
    assert not early_stop_due(config, 10, 20, {"top1": 0.5, "step": 10})
    assert early_stop_due(config, 10, 30, {"top1": 0.5, "step": 10})
    assert not early_stop_due(config.replace(early_stop=0), 10, 90, {"top1": 0.5, "step": 10})
    assert not early_stop_due(config, 10, 30, None)


def test_a_run_that_stops_improving_stops_early_and_stays_finished(tmp_path, capsys):
    # a learning rate too small to move the top-1: the first evaluation is the best, two more end the run
    config = tiny_config(tmp_path, epochs=10, eval_every_epochs=1, lr=1e-9, warmup_steps=0, early_stop=2,
                         run_name="flat")
    result = train(config)
    assert result.stopped_early and result.steps == 3 * (1438 // 64) and result.best["step"] == 1438 // 64
    stored = json.loads((result.run_dir / "result.json").read_text())
    assert stored["stopped_early"] and stored["steps"] == result.steps
    assert "early stop at step 66/220" in (result.run_dir / "log.txt").read_text()
    assert vitlab.load(result.run_dir / "checkpoints" / "best.pt") is not None and result.model_path.is_file()
    capsys.readouterr()
    rc = cli_main(["train", "--resume", str(result.run_dir), "--device", "cpu", "--threads", "1", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0 and "the run stopped early at step 66" in out.out + out.err
    with pytest.raises(VitlabError, match="early_stop needs evaluations during the run"):
        train(tiny_config(tmp_path, early_stop=2, eval_every_epochs=0, run_name="never"))


def test_early_stop_of_mae_pre_training_follows_the_held_out_loss(tmp_path):
    # MAE keeps the lowest reconstruction loss as its best (no top-1); here no later evaluation counts as better
    from vitlab.selfsup import MaskedAutoencoderObjective, pretrain_mae

    from .test_mae import _digits_config

    class FirstIsBest(MaskedAutoencoderObjective):
        def better(self, metrics, best):
            return False

    config = _digits_config(tmp_path, run_name="mae", steps=None, epochs=8, eval_every_epochs=1, early_stop=2)
    result = pretrain_mae(config, objective=FirstIsBest(decoder_width=32, decoder_depth=1, decoder_heads=2))
    spe = 1438 // 64
    assert result.stopped_early and result.steps == 3 * spe and result.best["step"] == spe
    assert "top1" not in result.best
    log = (result.run_dir / "log.txt").read_text()
    assert f"no evaluation has beaten the best for 2 evaluations; the best, loss {result.best['loss']:.4f} at step " \
           f"{spe}" in log
