"""``vitlab eval``: a hand-computed top-1 on a small fixed image folder, the report files, ReaL labels, and a
two-process torchrun run that gives the one-process numbers exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import randomize_
from vitlab.cli import main
from vitlab.models import VisionTransformer, ViTConfig

pytest.importorskip("vitlab.data")
pytest.importorskip("vitlab.train")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fixed_set(tmp_path):
    """A tiny 3-class checkpoint and an image folder with a test split: 9 readable 8x8 grey PNGs and one truncated
    file."""
    from vitlab import save

    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2,
                    mlp_dim=32)
    model = randomize_(VisionTransformer(cfg), std=0.5).eval()
    ckpt = save(model, tmp_path / "tiny.safetensors", class_names=["ant", "bee", "cat"])
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    files = []
    split = root / "test"
    for i in range(9):
        cls = ["ant", "bee", "cat"][i % 3]
        (split / cls).mkdir(parents=True, exist_ok=True)
        path = split / cls / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
        files.append((path, i % 3))
    (split / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return str(ckpt), str(root), model, files


def _hand_top1(model, files):
    from vitlab.preprocessing import Preprocessing

    transform = Preprocessing.for_model(8, 1).transform()
    with torch.no_grad():
        preds = [model(transform(Image.open(p).convert("L"))[None]).argmax(1).item() for p, _ in files]
    return sum(int(p == y) for p, (_, y) in zip(preds, files)) / len(files), preds


def test_eval_matches_hand_computed_top1_and_writes_the_report(fixed_set, tmp_path, capsys):
    ckpt, root, model, files = fixed_set
    expected, preds = _hand_top1(model, files)
    out = tmp_path / "report"
    assert main(["eval", ckpt, "--data", root, "--split", "test", "--out", str(out), "--device", "cpu",
                 "--batch-size", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["samples"] == 9 and results["skipped"] == 1
    assert results["top1"] == pytest.approx(expected, abs=1e-12)
    confusion = np.zeros((3, 3), dtype=int)
    for p, (_, y) in zip(preds, files):
        confusion[y, p] += 1
    assert results["confusion_matrix"] == confusion.tolist()
    assert results["class_names"] == ["ant", "bee", "cat"]
    assert json.loads((out / "results.json").read_text())["top1"] == results["top1"]
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "confusion.png", "reliability.png"}


def test_eval_real_labels_accept_any_listed_class(fixed_set, tmp_path, capsys):
    ckpt, root, model, files = fixed_set
    _, preds = _hand_top1(model, files)
    # every image also accepts what the model predicts, except img0 (no valid label: left out)
    labels = {Path(p).name: sorted({y, pred}) for (p, y), pred in zip(files, preds)}
    labels["img0.png"] = []
    labels["broken.png"] = [1]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(labels))
    assert main(["eval", ckpt, "--data", root, "--labels", str(path), "--device", "cpu", "--json"]) == 0
    real = json.loads(capsys.readouterr().out)["real"]
    assert real == {"accuracy": 1.0, "counted": 8, "skipped": 1}


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(fixed_set, tmp_path):
    ckpt, root, _, _ = fixed_set
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["-m", "vitlab", "eval", ckpt, "--data", root, "--device", "cpu", "--batch-size", "3", "--json"]

    def run(prefix):
        done = subprocess.run([sys.executable, *prefix, *args], env=env, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout[done.stdout.index("{"):])

    single = run([])
    double = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert double["samples"] == single["samples"] == 9 and double["skipped"] == 1
    for key in ("top1", "confusion_matrix", "per_class_accuracy", "mean_class_accuracy"):
        assert double[key] == single[key], key
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert double["calibration"]["ece"] == pytest.approx(single["calibration"]["ece"], abs=1e-6)


def test_a_labels_file_of_the_wrong_length_is_refused_before_the_model_runs(monkeypatch):
    """`vitlab eval --data fashion-mnist --labels L` with a list of another length computed every logit first (an
    hour on ImageNet's 50,000 validation images) and only then said so."""
    from torch.utils.data import TensorDataset

    from vitlab.errors import VitlabError
    from vitlab.evaluate import classification

    monkeypatch.setattr(classification, "model_outputs", lambda *a, **k: pytest.fail("the model ran first"))
    data = TensorDataset(torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(VitlabError, match="the labels file has 3 entries but the data set has 5 samples"):
        classification.evaluate_classifier(None, data, label_sets=[[0]] * 3)
