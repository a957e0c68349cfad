"""Multi-label data: the sigmoid loss against torch's binary cross-entropy, mAP / F1 against scikit-learn, mixing
multi-hot targets, training on a manifest with a ``labels`` column (head bias -10, the loss recorded in the model),
evaluation reports, and sigmoid probabilities from ``predict``."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitlab
from vitlab.cli import main as cli_main
from vitlab.data import build_dataset
from vitlab.data.folder import collate_skipping
from vitlab.errors import VitlabError
from vitlab.evaluate.metrics import average_precision, multilabel_metrics
from vitlab.train import TrainConfig, get_recipe, train
from vitlab.train.objectives import Classification, MultiHotMixer, sigmoid_loss
from vitlab.train.predict import predict

TINY_MODEL = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "pool": "token",
              "class_token": True, "pos_embed": "learned"}
LABELS = ["north", "east", "south", "west"]


def quadrant_set(root, n_train=48, n_test=32, seed=0):
    """8x8 RGB images whose quadrant k is bright when label k is present (each with probability 0.4), noise
    elsewhere; a manifest ``data.csv`` with a ``labels`` column and a ``split`` column."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = ["path,labels,split"]
    corners = [(0, 0), (0, 4), (4, 4), (4, 0)]
    for i in range(n_train + n_test):
        present = rng.random(4) < 0.4
        pixels = rng.integers(0, 90, (8, 8, 3))
        for k, (r, c) in enumerate(corners):
            if present[k]:
                pixels[r:r + 4, c:c + 4] += 150
        Image.fromarray(pixels.astype(np.uint8)).save(root / "img" / f"{i}.png")
        names = "|".join(LABELS[k] for k in range(4) if present[k])
        rows.append(f"img/{i}.png,{names},{'train' if i < n_train else 'test'}")
    (root / "classes.txt").write_text("\n".join(LABELS) + "\n")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"


def run_config(tmp_path, data, **changes) -> TrainConfig:
    base = dict(data=str(data), model="vit_fmnist", img_size=8, model_args=dict(TINY_MODEL), steps=4, batch_size=8,
                lr=3e-3, augment="none", out_dir=str(tmp_path / "runs"), threads=1, num_workers=0, progress=False,
                eval_every_epochs=0, warmup_steps=0)
    base.update(changes)
    return TrainConfig().replace(**base)


def test_sigmoid_loss_is_binary_cross_entropy_summed_over_labels():
    logits, targets = torch.randn(6, 5), (torch.rand(6, 5) < 0.3).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()
    torch.testing.assert_close(sigmoid_loss(logits, targets), expected)
    torch.testing.assert_close(sigmoid_loss(logits, targets), 5 * F.binary_cross_entropy_with_logits(logits, targets))
    labels = torch.tensor([0, 4, 2, 1, 1, 3])  # class indices are one-hot targets
    torch.testing.assert_close(sigmoid_loss(logits, labels), sigmoid_loss(logits, F.one_hot(labels, 5).float()))


def test_map_and_f1_match_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(1)
    targets = (rng.random((60, 6)) < 0.3).astype(np.float32)
    targets[:, 5] = 0  # a label without positives is left out of the macro mean
    scores = np.round(rng.normal(size=(60, 6)) + 1.5 * targets, 1)  # rounded: many tied scores
    out = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    per_label = [average_precision_score(targets[:, k], scores[:, k]) for k in range(5)]
    assert out["per_class_ap"][:5] == pytest.approx(per_label, abs=1e-12) and out["per_class_ap"][5] is None
    assert out["map_macro"] == pytest.approx(average_precision_score(targets[:, :5], scores[:, :5], average="macro"))
    assert out["map_micro"] == pytest.approx(average_precision_score(targets, scores, average="micro"))
    predicted = (1 / (1 + np.exp(-scores)) >= 0.5).astype(int)
    assert out["f1_micro"] == pytest.approx(f1_score(targets, predicted, average="micro", zero_division=0))
    assert out["f1_macro"] == pytest.approx(f1_score(targets, predicted, average="macro", zero_division=0))
    bce = F.binary_cross_entropy_with_logits(torch.from_numpy(scores).double(), torch.from_numpy(targets).double(),
                                             reduction="none")
    assert out["loss"] == pytest.approx(bce.sum(1).mean().item())  # the training loss's scale
    labelled = targets.sum(1) > 0  # top-1 "any correct label", over images that have one
    hits = targets[labelled, scores[labelled].argmax(1)]
    assert out["top1"] == pytest.approx(hits.mean()) and out["top1_counted"] == labelled.sum()
    assert average_precision(torch.zeros(4), torch.zeros(4)) is None


def test_multi_hot_mixing_weighs_targets_as_the_images():
    images = torch.rand(4, 3, 8, 8)
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]])
    torch.manual_seed(0)
    x, y = MultiHotMixer(mixup=0.8)(images, targets)
    lam = float((y[1, 1] - 0) / 1)  # image 1's own label 'b'
    torch.testing.assert_close(x, lam * images + (1 - lam) * images.roll(1, 0))
    torch.testing.assert_close(y, lam * targets + (1 - lam) * targets.roll(1, 0))
    torch.manual_seed(1)
    x, y = MultiHotMixer(cutmix=1.0)(images, targets)
    own = (x == images).all(dim=1).float().mean(dim=(1, 2))  # share of each image's own pixels
    torch.testing.assert_close(y, own[:, None] * targets + (1 - own[:, None]) * targets.roll(1, 0))


def test_manifest_labels_column_gives_multi_hot_targets(tmp_path):
    path = quadrant_set(tmp_path, n_train=6, n_test=2)
    ds = build_dataset(path, "train")
    assert ds.multi_label and ds.class_names == LABELS and len(ds) == 6
    targets = torch.stack([ds[i][1] for i in range(len(ds))])
    assert targets.dtype == torch.float32 and targets.shape == (6, 4)
    ds.transform = vitlab.Preprocessing.for_model(8).transform()
    images, labels, bad = collate_skipping([ds[0], ds[1]])
    assert images.shape == (2, 3, 8, 8) and labels.shape == (2, 4) and not bad
    jsonl = tmp_path / "tags.jsonl"
    jsonl.write_text(json.dumps({"path": "img/0.png", "labels": ["west", "north"]}) + "\n"
                     + json.dumps({"path": "img/1.png", "labels": []}) + "\n")
    tags = build_dataset(jsonl)  # classes.txt beside the manifest fixes the label order
    assert tags[0][1].tolist() == [1, 0, 0, 1] and tags[1][1].tolist() == [0, 0, 0, 0]


def test_multi_label_settings_are_checked(tmp_path):
    data = quadrant_set(tmp_path, n_train=8, n_test=2)
    with pytest.raises(VitlabError, match="multi-label data need loss=sigmoid"):
        train(run_config(tmp_path, data, loss="softmax"))
    with pytest.raises(VitlabError, match="label_smoothing is for the softmax loss"):
        train(run_config(tmp_path, data, label_smoothing=0.1))
    assert get_recipe("pretrain-i21k").config().loss == "sigmoid"
    assert Classification(TrainConfig(loss="sigmoid"), 3).head_bias == -10.0
    assert Classification(TrainConfig(), 3).head_bias is None


def test_train_eval_and_predict_a_multi_label_model(tmp_path, capsys):
    data = quadrant_set(tmp_path, n_train=16, n_test=8)
    result = train(run_config(tmp_path, data, mixup=0.5, steps=3))
    log = (result.run_dir / "log.txt").read_text()
    assert "new head: bias initialised to -10" in log
    metrics = result.metrics
    assert set(metrics) >= {"map_macro", "map_micro", "f1_micro", "top1", "loss", "samples"}
    model = vitlab.load(result.model_path)
    assert model.loss == "sigmoid" and model.class_names == LABELS
    assert model.head.bias.mean().item() == pytest.approx(-10.0, abs=0.1)  # a few small steps from -10
    files = [str(tmp_path / "img" / f"{i}.png") for i in (16, 17)]
    preds = predict(model, files, topk=4)
    with torch.no_grad():
        x = torch.stack([model.preprocessing.transform()(Image.open(f).convert("RGB")) for f in files])
        expected = model(x).sigmoid()
    for pred, row in zip(preds, expected):
        assert [i for i, _, _ in pred.top] == row.argsort(descending=True).tolist()
        assert [p for *_, p in pred.top] == pytest.approx(row.sort(descending=True).values.tolist(), abs=1e-6)
        assert sum(p for *_, p in pred.top) < 0.5  # independent probabilities near sigmoid(-10), not a softmax
    pytest.importorskip("fastapi")
    from vitlab.serve import Engine

    engine = Engine(model)  # what `vitlab serve` answers: the same per-label sigmoid probabilities
    torch.testing.assert_close(engine.classify(x), expected)
    assert engine.card()["probabilities"] == "sigmoid"
    out = tmp_path / "report"
    assert cli_main(["eval", str(result.model_path), "--data", str(data), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "8 images, 4 labels, mAP " in line and "F1@0.5" in line and "top-1 (any label)" in line
    saved = json.loads((out / "results.json").read_text())
    assert saved["map_macro"] == pytest.approx(metrics["map_macro"])
    assert "## Per label" in (out / "report.md").read_text()
    assert cli_main(["eval", str(result.model_path), "--data", str(data), "--map-classes-by-name"]) != 0
    # eval_checkpoint names its arguments, the command its flags
    assert "multi-label data are scored on their own labels; drop --map-classes-by-name and --labels" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_a_multi_label_model_learns_the_structure(tmp_path):
    data = quadrant_set(tmp_path, n_train=96, n_test=64)
    test = build_dataset(data, "test")
    targets = torch.stack([test[i][1] for i in range(len(test))])
    constant = multilabel_metrics(torch.zeros_like(targets), targets)  # the same score for every image
    # the paper's -10 bias suits thousands of rare labels; on 4 frequent ones Adam needs many steps to lift it
    for head_bias, margin in ((0.0, 0.4), (None, 0.15)):
        result = train(run_config(tmp_path, data, steps=300, batch_size=16, lr=3e-3, warmup_steps=20, seed=1,
                                  head_bias=head_bias, run_name=f"bias{head_bias}"))
        m = result.metrics
        print(f"head bias {head_bias if head_bias is not None else -10}: mAP macro {m['map_macro']:.3f} (constant "
              f"{constant['map_macro']:.3f}), micro {m['map_micro']:.3f} (constant {constant['map_micro']:.3f}), "
              f"F1 micro {m['f1_micro']:.3f}, top-1 {m['top1']:.3f}")
        assert m["map_macro"] > constant["map_macro"] + margin
        assert m["map_micro"] > constant["map_micro"] + margin


@pytest.mark.slow  # two exports, an int8 quantisation and two evaluations (about 35 s on 2 cores)
def test_onnx_exports_of_a_multi_label_model_answer_sigmoid_probabilities(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.compute.deploy import read_metadata
    from vitlab.compute.onnx_classifier import OnnxClassifier

    data = quadrant_set(tmp_path, n_train=16, n_test=8)
    result = train(run_config(tmp_path, data, steps=2))
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model_int8.onnx"
    assert cli_main(["export-onnx", str(result.model_path), str(fp32), "--int8", str(int8)]) == 0
    assert read_metadata(fp32)["loss"] == "sigmoid" and read_metadata(int8)["loss"] == "sigmoid"
    files = [str(tmp_path / "img" / f"{i}.png") for i in (16, 17, 18)]
    model = vitlab.load(result.model_path)
    want = predict(model, files, topk=4)
    got = predict(OnnxClassifier(fp32), files, topk=4)
    for g, w in zip(got, want):
        assert [i for i, _, _ in g.top] == [i for i, _, _ in w.top]
        assert [p for *_, p in g.top] == pytest.approx([p for *_, p in w.top], abs=1e-5)
        assert sum(p for *_, p in g.top) < 0.5  # per-label sigmoids near sigmoid(-10), not a softmax summing to 1
    capsys.readouterr()
    assert cli_main(["predict", str(int8), *files, "--json", "--topk", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    x = torch.stack([model.preprocessing.transform()(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        expected = OnnxClassifier(int8)(x).sigmoid()  # the int8 model's own logits, as per-label sigmoids
    for line, row in zip(lines, expected):
        probs = torch.zeros(4, dtype=torch.float64)
        probs[[t["index"] for t in line["top"]]] = torch.tensor([t["probability"] for t in line["top"]],
                                                                 dtype=torch.float64)
        torch.testing.assert_close(probs, row.double(), atol=1e-7, rtol=1e-5)
    # eval on the .onnx file scores as on the checkpoint (mAP of the same logits)
    scores = {}
    for source in (result.model_path, fp32):
        assert cli_main(["eval", str(source), "--data", str(data), "--json"]) == 0
        scores[source] = json.loads(capsys.readouterr().out)
    assert scores[fp32]["map_macro"] == pytest.approx(scores[result.model_path]["map_macro"], abs=1e-6)
    assert scores[fp32]["loss"] == pytest.approx(scores[result.model_path]["loss"], abs=1e-4)
    pytest.importorskip("fastapi")
    from vitlab.serve import load_engine

    engine = load_engine(str(int8), backend="onnx-int8")
    assert engine.card()["probabilities"] == "sigmoid" and engine.loss == "sigmoid"


def test_fewshot_command_on_multi_label_data_reports_map(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = quadrant_set(tmp_path, n_train=40, n_test=16)
    model = vitlab.create_model("vit_fmnist", num_classes=4, img_size=8, **TINY_MODEL)
    ckpt = vitlab.save(model, tmp_path / "tiny.safetensors", class_names=LABELS)
    args = ["fewshot", str(ckpt), "--data", str(data), "--shots", "1", "2", "--seeds", "0", "--methods", "lsr",
            "knn", "--holdout-per-class", "2", "--device", "cpu", "--out", str(tmp_path / "fs")]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "lsr: 1-shot " in printed and "mAP, % over 1 seeds" in printed
    saved = json.loads((tmp_path / "fs" / "results.json").read_text())
    assert saved["multi_label"] and saved["num_classes"] == 4 and saved["num_test"] == 16
    two = saved["methods"]["lsr"]["results"]["2"]
    assert 0 < two["map_macro"][0] <= 1 and 0 < two["map_micro"][0] <= 1 and two["mean"] == two["map_macro"][0]
    assert "Test mAP (macro) (%)" in (tmp_path / "fs" / "report.md").read_text()
