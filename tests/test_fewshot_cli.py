"""``vitlab fewshot`` end to end on scikit-learn's digits: report files, agreement with the Python API, same seed
same numbers, one-line errors."""

import json

import pytest

from tests.conftest import randomize_
from vitlab.cli import main
from vitlab.models import VisionTransformer, ViTConfig

pytest.importorskip("vitlab.data")
pytest.importorskip("sklearn")


@pytest.fixture()
def checkpoint(tmp_path):
    from vitlab import save

    cfg = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                    mlp_dim=64)
    return str(save(randomize_(VisionTransformer(cfg), std=0.2), tmp_path / "tiny.safetensors"))


ARGS = ["--data", "digits", "--shots", "1", "5", "--seeds", "0", "1", "--methods", "lsr", "knn",
        "--max-test", "150", "--batch-size", "64", "--device", "cpu"]


@pytest.mark.slow
def test_fewshot_command_writes_the_report_and_matches_the_python_api(checkpoint, tmp_path, capsys):
    from vitlab.tasks.runs import fewshot_checkpoint

    assert main(["fewshot", checkpoint, "--out", str(tmp_path / "a"), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "lsr: 1-shot " in printed and "wrote results.json, report.md, fewshot.png" in printed
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["shots"] == [1, 5] and saved["seeds"] == [0, 1] and saved["num_test"] == 150
    api = fewshot_checkpoint(checkpoint, "digits", shots=(1, 5), seeds=(0, 1), methods=("lsr", "knn"), max_test=150,
                             batch_size=64, device="cpu")
    assert api["methods"] == saved["methods"]
    assert 0.3 < saved["methods"]["lsr"]["results"]["5"]["mean"] <= 1.0  # chance is 0.1
    # same seeds, same data: the same file
    assert main(["fewshot", checkpoint, "--out", str(tmp_path / "b"), *ARGS]) == 0
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert (tmp_path / "a" / "fewshot.png").stat().st_size > 1000


def test_fewshot_command_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["fewshot", checkpoint, "--out", str(tmp_path), "--data", "no-such-set"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitlab fewshot: error: no-such-set") and "\n" not in err
    assert main(["fewshot", checkpoint, "--out", str(tmp_path), "--data", "digits", "--shots", "200"]) == 2
    assert "need 210 training samples per class" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
