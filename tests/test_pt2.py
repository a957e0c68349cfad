"""The PyTorch-native deployment format: ``vitlab export --format pt2`` (torch.export + AOTInductor) writes a package
that plain PyTorch runs without vitlab, and that ``predict``, ``eval`` and ``serve --backend pt2`` use like the
checkpoint it came from. Compiling needs a C++ compiler and takes tens of seconds, so one package is built per run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main as cli_main
from vitlab.compute.pt2 import Pt2Classifier, is_exported_file, load_exported
from vitlab.errors import VitlabError

from .serve_helpers import CLASSES, save_tiny, write_images

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="AOTInductor needs a C++ compiler")

# run in a fresh interpreter that cannot import vitlab (-I: no PYTHONPATH, no user site, not the working folder)
STANDALONE = """
import json, sys
import torch
package = torch._inductor.aoti_load_package(sys.argv[1])
meta = json.loads(package.get_metadata()["vitlab"])
inputs = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    outputs = {key: package(x) for key, x in inputs.items()}
torch.save(outputs, sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] == "vitlab"]
print(json.dumps(meta))
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A small checkpoint (class names) and its package with dynamic batch, height and width, exported by the
    command with the oneDNN Linear swap on (the package must not depend on vitlab's custom op)."""
    folder = tmp_path_factory.mktemp("pt2")
    ckpt = save_tiny(folder / "tiny.safetensors")
    before = os.environ.get("VITLAB_ONEDNN_LINEAR")
    os.environ["VITLAB_ONEDNN_LINEAR"] = "1"
    try:
        assert cli_main(["export", str(ckpt), str(folder / "tiny.pt2"), "--dynamic-size"]) == 0
    finally:
        if before is None:
            del os.environ["VITLAB_ONEDNN_LINEAR"]
        else:
            os.environ["VITLAB_ONEDNN_LINEAR"] = before
    return ckpt, vitlab.load(ckpt).eval(), folder / "tiny.pt2"


@pytest.mark.slow
@needs_compiler
def test_package_runs_without_vitlab_and_matches_eager(package, tmp_path):
    _, model, path = package
    gen = torch.Generator().manual_seed(0)
    inputs = {"b1": torch.randn(1, 3, 32, 32, generator=gen), "b5": torch.randn(5, 3, 32, 32, generator=gen),
              "40x24": torch.randn(2, 3, 40, 24, generator=gen), "16x48": torch.randn(3, 3, 16, 48, generator=gen)}
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    assert meta["class_names"] == CLASSES and meta["config"]["embed_dim"] == model.cfg.embed_dim
    assert meta["preprocessing"] == model.preprocessing.to_dict()
    assert meta["format"]["name"] == "pt2" and meta["format"]["torch"] == torch.__version__
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for key, x in inputs.items():
        with torch.no_grad():
            expected = model(x, dynamic_img_size=True)
        assert outputs[key].shape == expected.shape
        assert float(expected.abs().max()) > 0.1  # random weights: the comparison is not of zeros
        torch.testing.assert_close(outputs[key], expected, atol=1e-5, rtol=0)


def _predict(source, images, capsys):
    capsys.readouterr()
    assert cli_main(["predict", str(source), *map(str, images), "--json", "--topk", "3"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _same_answers(got, want):
    for g, w in zip(got, want, strict=True):
        assert [t["class"] for t in g["top"]] == [t["class"] for t in w["top"]]
        np.testing.assert_allclose([t["probability"] for t in g["top"]], [t["probability"] for t in w["top"]],
                                   atol=1e-5)


@pytest.mark.slow
@needs_compiler
def test_predict_eval_and_serve_take_the_package(package, tmp_path, capsys):
    pytest.importorskip("fastapi")
    from vitlab.serve import BackgroundServer, create_app

    from .serve_helpers import post_files, request

    ckpt, model, path = package
    images = write_images(tmp_path / "images")
    reference = _predict(ckpt, images, capsys)
    _same_answers(_predict(path, images, capsys), reference)

    # eval: the same accuracy and loss as the checkpoint on an image folder
    rng = np.random.default_rng(0)
    for i, name in enumerate(CLASSES):
        (tmp_path / "data" / "test" / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (32 + i, 30 + j, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "test" / name / f"{j}.png")
    results = {}
    for key, source in (("torch", ckpt), ("pt2", path)):
        capsys.readouterr()
        assert cli_main(["eval", str(source), "--data", str(tmp_path / "data"), "--json"]) == 0
        results[key] = json.loads(capsys.readouterr().out)
    assert results["pt2"]["samples"] == results["torch"]["samples"] == 2 * len(CLASSES)
    assert results["pt2"]["top1"] == results["torch"]["top1"]
    assert results["pt2"]["loss"] == pytest.approx(results["torch"]["loss"], abs=1e-5)

    # serve --backend pt2 answers what predict answers
    files = [(p.name, p.read_bytes()) for p in images]
    app = create_app(str(path), backend="pt2", name="tiny-pt2")
    with BackgroundServer(app) as running:
        status, _, answer = post_files(running.url + "/v1/classify", files, {"top_k": "3"})
        assert status == 200, answer
        _same_answers(answer["results"], reference)
        card = json.loads(request(running.url + "/v1/model")[2])
        assert card["backend"] == "pt2" and card["device"] == "cpu (AOTInductor)"
        assert card["class_names"] == CLASSES and card["explain"] is False
    with pytest.raises(VitlabError, match="a .pt2 package needs --backend pt2"):
        create_app(str(path), backend="torch")
    loaded = load_exported(path)
    assert isinstance(loaded, Pt2Classifier) and loaded.class_names == CLASSES
    assert loaded.cfg == dataclasses.replace(model.cfg, dynamic_img_size=True)  # the package takes any size


@pytest.mark.parametrize("argv,message", [
    (["export", "vit_ti16", "x.pt"], "give --format (onnx or pt2) or an output ending in .onnx or .pt2"),
    (["export", "vit_ti16", "x.onnx", "--format", "pt2"], "--format pt2 writes a .pt2 file; x.onnx does not end"),
    (["export", "vit_ti16", "x.pt2", "--int8", "y.onnx"], "--int8 and --int8-weights are for ONNX"),
    (["export", "vit_ti16", "x.onnx", "--device", "cuda"], "--device is for --format pt2"),
    (["export", "vit_ti16", "x.pt2", "--tolerance", "0"], "--tolerance must be positive"),
    (["export", "vit_nope", "x.pt2"], "neither a file nor a registered model"),
    (["predict", "broken.pt2", "x.png"], "broken.pt2: not a .pt2 package (packages are zip archives)"),
    (["predict", "empty.pt2", "x.png"], "empty.pt2: a zip archive with no AOTInductor model inside"),
])
def test_export_and_package_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.pt2").write_bytes(b"not a zip file")
    with zipfile.ZipFile(tmp_path / "empty.pt2", "w") as archive:  # a zip without a compiled model
        archive.writestr("empty/version", "1")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt2", "empty.pt2"]


def test_exported_files_are_told_from_checkpoints_by_suffix(tmp_path):
    assert is_exported_file("m.PT2") and is_exported_file("m.onnx") and not is_exported_file("m.safetensors")
    with pytest.raises(VitlabError, match="no such .pt2 file"):
        Pt2Classifier(tmp_path / "missing.pt2")
    with pytest.raises(VitlabError, match="not an exported model"):
        load_exported(tmp_path / "m.pt")
