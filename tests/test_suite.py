"""The suite runner: VTAB-style splits, few-shot tasks, group means, resuming after an interruption."""

import json

import pytest
import torch
from torch.utils.data import Dataset

from tests.conftest import randomize_
from vitlab.errors import VitlabError
from vitlab.models import VisionTransformer, ViTConfig
from vitlab.tasks.suite import run_suite, sample_test_indices, vtab_split
from vitlab.tasks.suite_config import parse_suite_config


class PatternDataset(Dataset):
    """Raw uint8 8x8 grey images: each class lights up its own 2x2 block, plus noise."""

    def __init__(self, n: int, num_classes: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.targets = torch.arange(n) % num_classes
        self.classes = [str(i) for i in range(num_classes)]
        images = 60 + torch.randn(n, 1, 8, 8, generator=gen) * 20
        for i, c in enumerate(self.targets.tolist()):
            r, col = divmod(c, 4)
            images[i, 0, 2 * r : 2 * r + 2, 2 * col : 2 * col + 2] += 150
        self.images = images.clamp(0, 255).to(torch.uint8)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


class Builder:
    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on

    def __call__(self, data, split, channels):
        if data == self.fail_on:
            raise KeyboardInterrupt
        self.calls.append((data, split))
        classes = {"four": 4, "eight": 8}[data]
        return PatternDataset(300 if split == "train" else 120, classes, seed=0 if split == "train" else 1)


def _model():
    cfg = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=32, depth=1, num_heads=2,
                    mlp_dim=64)
    return randomize_(VisionTransformer(cfg), std=0.2).eval()


CONFIG = {
    "name": "tiny", "train_examples": 200, "val_examples": 50, "test_examples": 100, "groups": True,
    "fewshot": {"grid": [0.1, 10.0, 1000.0]},
    "task": [{"name": "a", "data": "four", "group": "natural"},
             {"name": "b", "data": "eight", "group": "structured",
              "fewshot": {"method": "linear", "grid": [1e-4, 1e-2]}}],
}


def test_vtab_split_and_test_subset_are_seeded_and_disjoint():
    train, val = vtab_split(5000, 1000, 200, seed=3)
    assert len(train) == 800 and len(val) == 200 and not set(train) & set(val)
    assert vtab_split(5000, 1000, 200, seed=3) == (train, val) and vtab_split(5000, 1000, 200, seed=4) != (train, val)
    assert sample_test_indices(100, None, 0) is None and sample_test_indices(100, 500, 0) is None
    sub = sample_test_indices(100, 30, 0)
    assert len(set(sub)) == 30 and sub == sorted(sub)
    with pytest.raises(VitlabError, match="fewer than train_examples"):
        vtab_split(999, 1000, 200, 0)


def test_fewshot_suite_scores_groups_and_resumes(tmp_path):
    config = parse_suite_config(CONFIG)
    model = _model()
    logs = []
    # interrupted while building task b: task a is finished and saved
    with pytest.raises(KeyboardInterrupt):
        run_suite(config, model, tmp_path, dataset_builder=Builder(fail_on="eight"), model_id="m1", log=logs.append)
    saved = json.loads((tmp_path / "tasks" / "a" / "result.json").read_text())
    assert not (tmp_path / "results.json").exists()
    builder = Builder()
    suite = run_suite(config, model, tmp_path, dataset_builder=builder, model_id="m1", log=logs.append)
    assert builder.calls == [("eight", "train"), ("eight", "test")]  # task a is not run again
    a, b = suite["tasks"]
    assert a["resumed"] and not b["resumed"] and a["accuracy"] == saved["accuracy"]
    assert a["param_name"] == "l2" and b["param_name"] == "weight_decay" and b["chosen"] in (1e-4, 1e-2)
    assert a["num_train"] == 200 and a["num_test"] == 100
    assert a["accuracy"] > 0.85 and b["accuracy"] > 0.6  # far above chance (0.25, 0.125) even with random features
    assert suite["groups"] == {"natural": a["accuracy"], "structured": b["accuracy"]}
    assert suite["mean"] == pytest.approx((a["accuracy"] + b["accuracy"]) / 2)
    assert json.loads((tmp_path / "results.json").read_text())["mean"] == suite["mean"]
    assert "| a | natural | fewshot |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "suite.png").stat().st_size > 1000
    # a different model (or changed task settings) invalidates the saved result
    rerun = Builder()
    run_suite(config, model, tmp_path, dataset_builder=rerun, model_id="m2", log=logs.append)
    assert len(rerun.calls) == 4
    # same settings, same data, same seed: same numbers
    assert json.loads((tmp_path / "tasks" / "a" / "result.json").read_text())["accuracy"] == saved["accuracy"]
