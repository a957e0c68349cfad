"""Report writers: JSON round trip, Markdown content, valid PNGs, atomic writes."""

import json

import pytest
import torch
from PIL import Image

from vitlab.evaluate.fewshot import fewshot_evaluate
from vitlab.evaluate.metrics import classification_metrics
from vitlab.evaluate.report import (
    fewshot_markdown,
    fewshot_summary,
    suite_markdown,
    write_classification_report,
    write_fewshot_report,
    write_json,
)


def _classification_results():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    out = classification_metrics(logits, torch.tensor([0, 1, 1, 1]), ks=(1, 2))
    out["class_names"] = ["cat", "dog", "bird|x"]
    return out


def test_classification_report_files(tmp_path):
    results = _classification_results()
    paths = write_classification_report(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == results
    md = paths["markdown"].read_text()
    assert "| top1 (%) | 75.00 |" in md and "| dog | 3 | 66.67 | 100.00 | 80.00 | bird\\|x (1) |" in md
    for key in ("confusion", "reliability"):
        with Image.open(paths[key]) as img:
            assert img.format == "PNG" and img.size[0] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion.png", "reliability.png", "report.md",
                                                                    "results.json"]


def test_fewshot_report_shows_mean_and_spread(tmp_path):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(30)
    x = torch.nn.functional.one_hot(y, 3).float() * 2 + torch.randn(90, 3, generator=gen)
    results = fewshot_evaluate(x, y, x, y, shots=(1, 5), seeds=(0, 1), methods=("lsr", "knn"), holdout_per_class=5)
    paths = write_fewshot_report(results, tmp_path)
    md = paths["markdown"].read_text()
    r = results["methods"]["lsr"]["results"]["5"]
    assert f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" in md
    assert "| method | 1-shot | 5-shot |" in md
    assert fewshot_summary(results).startswith("lsr: 1-shot ")
    with Image.open(paths["plot"]) as img:
        assert img.format == "PNG"
    assert fewshot_markdown(results).count("\n| knn | ") == 2


def test_suite_markdown_has_groups_and_means():
    results = {"name": "s", "tasks": [
        {"name": "a", "group": "natural", "mode": "fewshot", "accuracy": 0.5, "chosen": 4.0, "param_name": "l2",
         "seconds": 3.0, "num_train": 1000, "num_test": 10},
        {"name": "b", "group": "structured", "mode": "finetune", "accuracy": 0.75, "chosen": 0.01, "param_name": "lr",
         "seconds": 10.0, "num_train": 1000, "num_test": 10}],
        "groups": {"natural": 0.5, "structured": 0.75}, "mean": 0.625, "mean_of_groups": 0.625}
    md = suite_markdown(results)
    assert "| a | natural | fewshot | 1000 | 10 | l2 = 4 | 50.00 | 3 |" in md
    assert "| structured | 75.00 |" in md and "**62.50%**" in md


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        write_json(target, {"a": float("nan")})  # fails before anything is written
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
