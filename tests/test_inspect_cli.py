"""``vitlab inspect`` end to end: a saved checkpoint and image files in, figures, values and HTML out."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitlab
from vitlab.cli import main
from vitlab.inspect import (
    attention_statistics,
    load_images,
    position_embedding_similarity,
    position_embedding_structure,
)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def fashion_mnist_test_images(count: int) -> np.ndarray:
    with gzip.open(FASHION_MNIST, "rb") as handle:
        data = handle.read(16 + count * 28 * 28)
    return np.frombuffer(data, np.uint8, offset=16).reshape(count, 28, 28)


@pytest.fixture
def checkpoint(tmp_path):
    model = vitlab.create_model("vit_fmnist", depth=2)
    path = tmp_path / "fmnist.safetensors"
    vitlab.save(model, path, class_names=[f"c{i}" for i in range(10)])
    return path


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    if FASHION_MNIST.exists():
        pictures = fashion_mnist_test_images(10)
    else:  # the data package is missing: any grey pictures will do
        pictures = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / f"test_{i:02d}.png")
    return folder


@pytest.mark.slow
def test_inspect_command_writes_the_report_for_test_images(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "report"
    status = main(["inspect", str(checkpoint), "--images", str(image_folder), "--out", str(out),
                   "--rollout-images", "4", "--num-images", "8", "--batch-size", "3"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "posemb: corr(similarity, grid distance)" in printed and "index.html" in printed
    for name in ("filters.png", "posemb.png", "distance.png", "rollout.png", "inspection.npz", "inspection.json",
                 "index.html"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "inspection.json").read_text())
    model = vitlab.load(checkpoint)
    images = load_images(sorted(image_folder.iterdir())[:8], model.preprocessing)
    stats = attention_statistics(model, images, rollout_images=4)
    np.testing.assert_allclose(saved["distance"]["table"], stats.mean_distance.numpy(), rtol=1e-5)
    assert saved["distance"]["num_images"] == 8
    structure = position_embedding_structure(position_embedding_similarity(model))
    assert saved["posemb"]["row_column_effect"] == pytest.approx(structure.row_column_effect)
    assert saved["rollout"]["images"] == [f"test_{i:02d}.png" for i in range(4)]
    assert all(p.startswith("c") for p in saved["rollout"]["predictions"])  # class names from the checkpoint


def test_inspect_command_without_images_draws_the_weight_figures(checkpoint, tmp_path):
    out = tmp_path / "weights"
    assert main(["inspect", str(checkpoint), "--out", str(out), "--what", "filters,posemb"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["filters.png", "posemb.png"]


@pytest.mark.parametrize("extra, message", [
    (["--what", "rollout"], "needs images"),
    (["--what", "attention"], "unknown analysis attention"),
    (["--discard-ratio", "1.5"], "discard_ratio"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--images", "missing-folder"], "no such file or folder"),
])
def test_inspect_command_reports_bad_options_on_one_line(checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    status = main(["inspect", str(checkpoint), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_inspect_command_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"<html>not a checkpoint</html>")
    assert main(["inspect", str(bogus), "--out", str(tmp_path / "out")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_inspect_command_on_a_convolutional_model_is_one_line(tmp_path, capsys):
    """A BiT ResNet-v2 checkpoint was an AttributeError traceback (its config has no patch size)."""
    path = tmp_path / "bit.safetensors"
    vitlab.save(vitlab.create_model("bit_fmnist"), path)
    assert main(["inspect", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ResNetV2 is a convolutional model" in err
    assert not (tmp_path / "out").exists()
