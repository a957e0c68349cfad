"""The pre-trained workflow from a catalog name, with the file placed in the cache by hand as docs/pretrained.md says
(``$VITLAB_HOME/gcs/<bucket>/<object>``) and the network off: ``vitlab predict`` prints ImageNet class names,
``vitlab finetune --from`` runs on Fashion-MNIST images, ``create_model(..., pretrained=True)`` and every command
that takes a checkpoint accept the name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from tests.checkpoint_fixtures import randomize_weights_, save_npz, vit_jax_arrays
from vitlab.cli import main
from vitlab.hub import cache_path, get_pretrained
from vitlab.labels import class_names

timm = pytest.importorskip("timm")
NAME = "vit_ti16.augreg_in21k_ft_in1k"  # the smallest real entry: ViT-Ti/16, 224 px, ImageNet-1k head


@pytest.fixture(scope="module")
def ti16_timm():
    """ViT-Ti/16 in timm with random weights."""
    return randomize_weights_(timm.create_model("vit_tiny_patch16_224", num_classes=1000), seed=3).eval()


@pytest.fixture(scope="module")
def ti16_npz(ti16_timm, tmp_path_factory):
    """ViT-Ti/16 with random weights in the layout of the AugReg release (vit_jax array names), as a file."""
    path = tmp_path_factory.mktemp("ti16") / "ti16.npz"
    save_npz(path, vit_jax_arrays(ti16_timm))
    return path


@pytest.fixture
def placed(ti16_npz, tmp_path, monkeypatch):
    """The file put where the offline docs say, network off."""
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    dest = cache_path(get_pretrained(NAME).sources[0].location)
    assert dest == tmp_path / "home" / "gcs" / "vit_models" / "augreg" / (
        "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz")
    dest.parent.mkdir(parents=True)
    dest.symlink_to(ti16_npz)
    return ti16_npz


def _photo(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_load_by_name_matches_the_local_file_and_carries_the_publishers_preprocessing(placed):
    model = vitlab.load(NAME)
    local = vitlab.load(placed)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), local(x), rtol=0, atol=0)
    assert model.class_names == class_names("imagenet-1k")
    pre = model.preprocessing
    assert (pre.resize, pre.interpolation, pre.img_size, pre.mean) == ("squash", "bilinear", (224, 224), (0.5,) * 3)


def test_predict_by_catalog_name_prints_imagenet_class_names(placed, tmp_path, capsys):
    image = _photo(tmp_path / "image.jpg")
    assert main(["predict", NAME, str(image), "--topk", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = class_names("imagenet-1k")
    ref = vitlab.load(placed)
    with torch.no_grad():
        from vitlab.data import load_image

        logits = ref(ref.preprocessing.transform()(load_image(image)).unsqueeze(0))[0]
    top = logits.topk(3).indices.tolist()
    assert [r["class"] for r in result["top"]] == [names[i] for i in top]
    assert main(["predict", NAME, str(image)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{image}: {names[top[0]]} ")


def test_create_model_pretrained_uses_the_default_tag_and_new_heads(placed):
    model = vitlab.create_model("vit_ti16", pretrained=True)
    assert model.cfg.num_classes == 1000 and model.class_names[0] == "tench"
    tuned = vitlab.create_model("vit_ti16", pretrained="augreg_in21k_ft_in1k", num_classes=10, img_size=64)
    assert tuned.cfg.num_classes == 10 and tuned.cfg.grid_size == (4, 4)
    assert not tuned.head.weight.any()  # zero-initialised, as the paper fine-tunes
    assert vitlab.create_model("vit_ti16").cfg.num_classes == 1000  # no weights asked: a fresh model


def test_offline_without_the_file_says_where_to_place_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    assert main(["info", NAME]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "empty" / "gcs" / "vit_models" / "augreg") in err
    assert "storage.googleapis.com/vit_models/augreg/Ti_16" in err


def _printed_commands(message: str) -> list[str]:
    """The shell commands an error message quotes in backticks."""
    return message.split("`")[1::2]


def test_offline_hint_names_every_source_and_its_commands_work_on_a_fresh_machine(ti16_timm, ti16_npz, tmp_path,
                                                                                   monkeypatch, capsys):
    """The two commands the offline error prints, run as printed against loopback stand-ins for the storage bucket
    and the Hub: each one alone fills an empty cache (no folders made beforehand) so that the name loads offline."""
    from safetensors.torch import save_file

    from tests.hub_fixtures import FileServer, LoopbackHub

    entry = get_pretrained(NAME)
    gcs, hub = entry.sources
    assert (gcs.kind, hub.kind) == ("gcs", "timm")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ti16_timm.state_dict().items()}, str(weights))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000, "global_pool": "token",
              "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.9,
                                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": 1000}}
    bucket = FileServer({"/" + gcs.location[len("gs://"):]: ti16_npz.read_bytes()})
    hub_server = LoopbackHub({hub.location: {"config.json": json.dumps(config).encode(),
                                             "model.safetensors": weights.read_bytes()}})
    monkeypatch.setenv("VITLAB_GCS_ENDPOINT", bucket.url)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    # the commands run where the network is on (another shell): no offline switch there
    shell_env = {k: v for k, v in os.environ.items() if k not in ("VITLAB_OFFLINE", "HF_HUB_OFFLINE")}
    shell_env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                     HF_HUB_DISABLE_TELEMETRY="1")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ti16_timm(x)
    try:
        for which in (0, 1):
            monkeypatch.setenv("VITLAB_HOME", str(tmp_path / f"home{which}"))
            monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / f"hf{which}"))
            assert main(["info", NAME]) == 2
            message = capsys.readouterr().err.strip()
            assert "\n" not in message and "any one of its sources" in message
            commands = _printed_commands(message)
            assert len(commands) == 2 and commands[0].startswith("curl ") and commands[1].startswith("hf download ")
            assert f"{bucket.url}/vit_models/augreg/Ti_16" in commands[0] and hub.location in commands[1]
            assert str(tmp_path / f"hf{which}" / f"models--{hub.location.replace('/', '--')}") in message
            done = subprocess.run(["bash", "-c", commands[which]], env={**shell_env, "VITLAB_HOME": str(
                tmp_path / f"home{which}"), "HF_HUB_CACHE": str(tmp_path / f"hf{which}")}, capture_output=True,
                text=True, timeout=120)
            assert done.returncode == 0, (commands[which], done.stderr[-2000:])
            model = vitlab.load(NAME)  # offline, from what the command put in place
            local = vitlab.load(ti16_npz) if which == 0 else vitlab.load(weights, model_name="vit_ti16")
            with torch.no_grad():
                torch.testing.assert_close(model(x), local(x), rtol=0, atol=0)
                torch.testing.assert_close(model(x), expected, rtol=0, atol=2e-3)  # timm's, within float error
    finally:
        bucket.stop()
        hub_server.stop()
    assert len(bucket.gets("/" + gcs.location[len("gs://"):])) == 1


def test_a_catalog_name_to_fine_tune_from_is_its_registered_model(placed):
    from vitlab.train.transfer import source_model_name

    assert source_model_name(NAME) == "vit_ti16"


def test_info_and_convert_take_catalog_names(placed, tmp_path, capsys):
    assert main(["info", NAME, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_classes"] == 1000 and info["facts"]["catalog_name"] == NAME
    assert info["preprocessing_source"].startswith("given by its source, gs://vit_models/augreg/")
    out = tmp_path / "ti16.safetensors"
    assert main(["convert", NAME, str(out), "--to", "vitlab"]) == 0
    capsys.readouterr()
    again = vitlab.load(out)
    assert again.class_names == class_names("imagenet-1k")


@pytest.mark.slow
def test_finetune_from_catalog_name_runs_on_fashion_mnist(placed, tmp_path, capsys):
    """The RGB checkpoint on the grey 28x28 set: new 10-class head, resampled grid, input convolution adapted."""
    from vitlab.data import build_dataset

    try:
        build_dataset("fashion-mnist", "test")
    except Exception as exc:  # the Debian package with the IDX files is not installed
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    code = main(["finetune", "--from", NAME, "--data", "fashion-mnist", "--img-size", "32", "--steps", "3",
                 "--batch-size", "8", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path / "runs"),
                 "--run-name", "ft", "--no-progress", "--set", "warmup_steps=1", "--set", "train_subset=200"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"fine-tuning from {NAME}: new zero-initialised head for 10 classes" in out.out + out.err
    assert json.loads((tmp_path / "runs" / "ft" / "config.json").read_text())["model"] == "vit_ti16"
    tuned = vitlab.load(tmp_path / "runs" / "ft" / "model.safetensors")
    assert (tuned.cfg.num_classes, tuned.cfg.img_size, tuned.cfg.embed_dim, tuned.cfg.depth) == (10, (32, 32), 192, 12)

def test_catalog_name_downloads_from_the_gcs_endpoint_then_works_offline(ti16_npz, tmp_path, monkeypatch):
    from tests.hub_fixtures import FileServer

    entry = get_pretrained(NAME)
    obj = entry.sources[0].location[len("gs://"):]
    server = FileServer({f"/{obj}": ti16_npz.read_bytes()})
    try:
        monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("VITLAB_GCS_ENDPOINT", server.url)  # a loopback stand-in for storage.googleapis.com
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.delenv("VITLAB_OFFLINE", raising=False)
        model = vitlab.load(NAME)
        assert model.class_names[:2] == ["tench", "goldfish"]
        assert server.gets(f"/{obj}") == [None]
    finally:
        server.stop()
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    assert vitlab.load(NAME).cfg.num_classes == 1000  # from the cache, server gone


def test_local_imagenet_npz_gets_imagenet_names(ti16_npz):
    model = vitlab.load(ti16_npz)
    assert model.class_names == class_names("imagenet-1k")
