"""ONNX files as models: an exported file carries the model's config, preprocessing and class names, so that
``vitlab predict``, ``vitlab eval`` and ``vitlab serve --backend onnx-int8`` use it like a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import vitlab  # noqa: E402
from vitlab.cli import main as cli_main  # noqa: E402
from vitlab.compute import deploy  # noqa: E402
from vitlab.compute.deploy import (  # noqa: E402
    Int8AccuracyWarning,
    choose_weight_type,
    export_onnx,
    quantize_int8,
    read_metadata,
)
from vitlab.compute.onnx_classifier import OnnxClassifier  # noqa: E402
from vitlab.errors import VitlabError  # noqa: E402

from .serve_helpers import CLASSES, save_tiny, tiny_model, write_images  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small checkpoint (timm-style crop preprocessing, class names) and its float32 and int8 ONNX files."""
    folder = tmp_path_factory.mktemp("onnx")
    ckpt = save_tiny(folder / "tiny.safetensors")
    model = vitlab.load(ckpt)
    assert cli_main(["export-onnx", str(ckpt), str(folder / "tiny.onnx"), "--int8", str(folder / "tiny_int8.onnx")]) \
        == 0
    return ckpt, model, folder / "tiny.onnx", folder / "tiny_int8.onnx"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("onnx_images"))


def test_exported_file_carries_config_preprocessing_and_class_names(tmp_path):
    model = tiny_model()
    model.preprocessing = vitlab.Preprocessing(img_size=32, resize="crop", crop_pct=0.875, interpolation="bicubic",
                                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    path = export_onnx(model, tmp_path / "m.onnx")
    meta = read_metadata(path)
    assert meta["architecture"] == "VisionTransformer" and meta["config"] == model.cfg.to_dict()
    assert meta["preprocessing"] == model.preprocessing.to_dict() and meta["class_names"] == CLASSES
    int8 = quantize_int8(path, tmp_path / "m8.onnx")
    loaded = OnnxClassifier(int8)
    assert loaded.cfg == model.cfg and loaded.preprocessing == model.preprocessing and loaded.class_names == CLASSES
    assert loaded.quantization.startswith("int8") and OnnxClassifier(path).quantization is None
    assert loaded.int8["weights"] == choose_weight_type("auto") and OnnxClassifier(path).int8 is None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(OnnxClassifier(path)(x), model(x), atol=1e-4, rtol=0)


def test_an_onnx_file_without_vitlab_metadata_is_refused_in_one_line(exported, tmp_path):
    import onnx

    proto = onnx.load(str(exported[2]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(VitlabError, match=r"bare.onnx: no vitlab metadata .* export it with `vitlab export-onnx`"):
        OnnxClassifier(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(VitlabError, match="junk.onnx: ONNX Runtime cannot load it"):
        OnnxClassifier(tmp_path / "junk.onnx")


def predict_json(checkpoint, paths, capsys):
    capsys.readouterr()
    assert cli_main(["predict", str(checkpoint), *map(str, paths), "--json", "--topk", "3"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_accepts_onnx_files(exported, images, capsys):
    ckpt, _, fp32, int8 = exported
    reference = predict_json(ckpt, images, capsys)
    for got, want in zip(predict_json(fp32, images, capsys), reference):
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        np.testing.assert_allclose([t["probability"] for t in got["top"]], [t["probability"] for t in want["top"]],
                                   atol=1e-5)
    quantised = predict_json(int8, images, capsys)
    agree = np.mean([q["top"][0]["index"] == r["top"][0]["index"] for q, r in zip(quantised, reference)])
    assert agree >= 0.8, agree  # int8 keeps (nearly) every top-1 of this small model
    assert all(q["top"][0]["class"] in CLASSES for q in quantised)


def test_signed_int8_on_a_cpu_without_vnni_warns_once_in_predict(exported, images, capsys, monkeypatch, tmp_path):
    """Signed int8 weights saturate in ONNX Runtime's kernels on x86 without VNNI; a file quantised that
    way, used on such a CPU, says so (once) and how to re-export; unsigned weights run silently."""
    import warnings

    fp32 = exported[2]
    signed = quantize_int8(fp32, tmp_path / "signed.onnx", weights="signed")
    unsigned = quantize_int8(fp32, tmp_path / "unsigned.onnx", weights="unsigned")
    monkeypatch.setattr(deploy, "cpu_features", lambda: ("x86_64", frozenset({"avx2", "fma"})))  # an AMD Zen 3
    monkeypatch.setattr(deploy, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict_json(signed, images[:2], capsys)
        predict_json(signed, images[:2], capsys)
        predict_json(unsigned, images[:2], capsys)
    messages = [str(w.message) for w in caught if issubclass(w.category, Int8AccuracyWarning)]
    assert len(messages) == 1 and messages[0].startswith(f"{signed}: int8 with signed weights on a CPU without VNNI")
    assert "accuracy may drop" in messages[0] and "--int8-weights unsigned" in messages[0]


@pytest.mark.slow
def test_eval_measures_the_int8_accuracy_with_the_same_command(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from vitlab.train import train

    from .test_train import tiny_config

    run = train(tiny_config(tmp_path, run_name="digits", epochs=6, eval_every_epochs=0))
    fp32, int8 = tmp_path / "digits.onnx", tmp_path / "digits_int8.onnx"
    assert cli_main(["export-onnx", str(run.model_path), str(fp32), "--int8", str(int8)]) == 0
    results = {}
    for name, path in (("torch", run.model_path), ("fp32", fp32), ("int8", int8)):
        capsys.readouterr()
        assert cli_main(["eval", str(path), "--data", "digits", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["torch"]["top1"] > 0.5  # chance is 0.1
    assert results["fp32"]["samples"] == results["int8"]["samples"] == 359
    assert results["fp32"]["top1"] == pytest.approx(results["torch"]["top1"], abs=1 / 359)
    assert results["fp32"]["loss"] == pytest.approx(results["torch"]["loss"], abs=1e-4)
    assert abs(results["int8"]["top1"] - results["torch"]["top1"]) <= 0.03
    with pytest.raises(VitlabError, match="runs at its exported resolution"):
        from vitlab.tasks.runs import load_for_eval

        load_for_eval(int8, img_size=16)


def test_serve_with_the_onnx_int8_backend(exported, images, capsys):
    pytest.importorskip("fastapi")
    from vitlab.serve import BackgroundServer, create_app

    from .serve_helpers import post_files, request

    ckpt, _, _, int8 = exported
    reference = predict_json(int8, images, capsys)
    files = [(p.name, p.read_bytes()) for p in images]
    for source in (int8, ckpt):  # an int8 file as it is; a checkpoint exported and quantised at start-up
        app = create_app(str(source), backend="onnx-int8", name="tiny-int8")
        with BackgroundServer(app) as running:
            status, _, answer = post_files(running.url + "/v1/classify", files, {"top_k": "3"})
            assert status == 200, answer
            for got, want in zip(answer["results"], reference):
                assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]]
                np.testing.assert_allclose([t["probability"] for t in got["top"]],
                                           [t["probability"] for t in want["top"]], atol=1e-5)
            status, _, explained = post_files(running.url + "/v1/explain", files[:1])
            assert status == 501 and "needs the PyTorch model" in explained["error"]
            card = json.loads(request(running.url + "/v1/model")[2])
            assert card["backend"] == "onnx-int8" and card["quantization"].startswith("int8")
            assert card["explain"] is False and card["class_names"] == CLASSES
    with pytest.raises(VitlabError, match="runs on the CPU"):
        create_app(str(int8), backend="onnx-int8", device="cuda")
