"""``hf-hub:`` names resolved through ``huggingface_hub`` against a Hub cache laid out by the test, in timm's and in
transformers' layout: the same logits as the same weights from a local file (and as timm / transformers), with the
source's preprocessing and class names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import vitlab
from tests.checkpoint_fixtures import randomize_weights_
from tests.hub_fixtures import lay_out_hub_cache, offline_hub_cache
from vitlab.errors import VitlabError

timm = pytest.importorskip("timm")
LABELS = [f"class {i}" for i in range(10)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return offline_hub_cache(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def timm_repo(tmp_path_factory):
    """A ViT-Ti/16 at 32x32 px with 10 classes, as timm publishes its Hub repos."""
    from safetensors.torch import save_file

    model = randomize_weights_(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)).eval()
    folder = tmp_path_factory.mktemp("timm-repo")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 10, "num_features": 192, "global_pool": "token",
              "label_names": LABELS,
              "pretrained_cfg": {"tag": "test", "input_size": [3, 32, 32], "interpolation": "bicubic",
                                 "crop_pct": 0.875, "crop_mode": "center", "mean": [0.4, 0.45, 0.5],
                                 "std": [0.2, 0.25, 0.3], "num_classes": 10}}
    return model, folder, config


def test_timm_layout_repo_gives_the_local_files_logits_preprocessing_and_class_names(hub, timm_repo):
    model, folder, config = timm_repo
    lay_out_hub_cache(hub, "timm/vit_test", {"config.json": config,
                                            "model.safetensors": (folder / "model.safetensors").read_bytes()})
    x = torch.randn(2, 3, 32, 32)
    ours = vitlab.load("hf-hub:timm/vit_test")
    local = vitlab.load(folder / "model.safetensors", model_name="vit_ti16")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), local(x), rtol=0, atol=0)
        torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-4)
    pre = ours.preprocessing
    assert (pre.resize, pre.crop_pct, pre.interpolation, pre.img_size) == ("crop", 0.875, "bicubic", (32, 32))
    assert pre.mean == (0.4, 0.45, 0.5) and pre.std == (0.2, 0.25, 0.3)
    assert ours.class_names == LABELS


def test_revision_after_at_picks_that_snapshot(hub, timm_repo):
    _, folder, config = timm_repo
    weights = (folder / "model.safetensors").read_bytes()
    lay_out_hub_cache(hub, "timm/vit_test", {"config.json": config, "model.safetensors": weights})
    other = dict(config, label_names=[f"v2 {i}" for i in range(10)])
    lay_out_hub_cache(hub, "timm/vit_test", {"config.json": other, "model.safetensors": weights},
                      commit="f" * 40, ref="v2")
    assert vitlab.load("hf-hub:timm/vit_test@v2").class_names[0] == "v2 0"
    assert vitlab.load("hf-hub:timm/vit_test").class_names[0] == "class 0"


def test_transformers_layout_repo_gives_the_local_folders_logits_preprocessing_and_class_names(hub, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, num_labels=3,
                                 id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2})
    model = randomize_weights_(transformers.ViTForImageClassification(cfg)).eval()
    folder = tmp_path / "hf-folder"
    model.save_pretrained(folder)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3,
                                               image_mean=[0.3, 0.3, 0.3], image_std=[0.6, 0.6, 0.6])
    processor.save_pretrained(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= set(files)
    lay_out_hub_cache(hub, "google/vit-test", files)
    x = torch.randn(2, 3, 32, 32)
    ours = vitlab.load("hf-hub:google/vit-test")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), vitlab.load(folder)(x), rtol=0, atol=0)
        torch.testing.assert_close(ours(x), model(pixel_values=x).logits, rtol=1e-4, atol=1e-4)
    assert ours.class_names == ["cat", "dog", "fish"]
    pre = ours.preprocessing
    assert (pre.resize, pre.interpolation, pre.mean, pre.std) == ("squash", "bicubic", (0.3,) * 3, (0.6,) * 3)


def test_repo_without_a_vit_is_refused_clearly(hub):
    lay_out_hub_cache(hub, "someone/bert", {"config.json": {"model_type": "bert", "architectures": ["BertModel"]}})
    with pytest.raises(VitlabError, match="holds a 'bert' model, not a ViT"):
        vitlab.load("hf-hub:someone/bert")
    lay_out_hub_cache(hub, "someone/odd", {"config.json": json.dumps({"hello": 1})})
    with pytest.raises(VitlabError, match="holds no ViT"):
        vitlab.load("hf-hub:someone/odd")


def test_repo_missing_offline_says_what_to_download(hub):
    with pytest.raises(VitlabError) as info:
        vitlab.load("hf-hub:google/vit-base-patch16-224")
    message = str(info.value)
    assert "config.json is not in the Hub cache" in message and "hf download google/vit-base-patch16-224" in message
    assert "\n" not in message
    with pytest.raises(VitlabError, match="expected hf-hub:ORG/NAME"):
        vitlab.load("hf-hub:no-slash")


def test_unreachable_endpoint_falls_back_to_the_hub_cache(hub, timm_repo, monkeypatch):
    _, folder, config = timm_repo
    lay_out_hub_cache(hub, "timm/vit_test", {"config.json": config,
                                            "model.safetensors": (folder / "model.safetensors").read_bytes()})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert vitlab.load("hf-hub:timm/vit_test").class_names == LABELS


def test_no_network_without_offline_fails_fast_with_every_hint(hub, monkeypatch):
    """No --offline, nothing listening where the bucket and the Hub should be: the error comes at once (the Hub client
    alone retries for about 30 s) and names both ways to place the file."""
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on: connections are refused, as with no network
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setenv("VITLAB_GCS_ENDPOINT", dead)
    start = time.perf_counter()
    with pytest.raises(VitlabError) as info:
        vitlab.create_model("vit_ti16", pretrained=True)
    took = time.perf_counter() - start
    message = str(info.value)
    assert took < 5, f"{took:.1f} s to find that there is no network"
    assert "the Hub cannot be reached" in message and "curl -L --fail --create-dirs" in message
    assert "hf download timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k config.json model.safetensors" in message


def test_download_through_huggingface_hub_from_a_loopback_endpoint_then_offline(hub, timm_repo, monkeypatch):
    from tests.hub_fixtures import LoopbackHub

    model, folder, config = timm_repo
    server = LoopbackHub({"timm/vit_served": {"config.json": json.dumps(config).encode(),
                                              "model.safetensors": (folder / "model.safetensors").read_bytes()}})
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(vitlab.load("hf-hub:timm/vit_served")(x), model(x), rtol=1e-4, atol=1e-4)
        assert (hub / "models--timm--vit_served" / "snapshots" / server.commit / "model.safetensors").exists()
        with pytest.raises(VitlabError, match="no such repo on the Hub"):
            vitlab.load("hf-hub:timm/not_there")
    finally:
        server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub cache now holds it: no network needed
    assert vitlab.load("hf-hub:timm/vit_served").class_names == LABELS


def _files_outside(root: Path, cache: Path) -> list[str]:
    """Every file under ``root`` that is not under ``cache`` (the Hub cache) nor vitlab's own home."""
    return sorted(str(p) for p in root.rglob("*") if not p.is_dir()
                  and cache not in p.parents and "vitlab-home" not in p.parts)


@pytest.fixture
def hostile_hub(hub, timm_repo, monkeypatch):
    from tests.hub_fixtures import LoopbackHub

    _, folder, config = timm_repo
    server = LoopbackHub({"timm/vit_served": {"config.json": json.dumps(config).encode(),
                                              "model.safetensors": (folder / "model.safetensors").read_bytes()}})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


@pytest.mark.parametrize("revision", ["../../escaped", "main/../../../escaped", "ABSOLUTE", "v1..v2", "a b",
                                      "main/", "", ".hidden", "x.lock", "a@{1}", "new\nline"])
def test_revision_that_is_a_path_is_refused_before_any_request(hostile_hub, hub, tmp_path, revision):
    if revision == "ABSOLUTE":
        revision = str(tmp_path / "escaped")
    with pytest.raises(VitlabError, match="is not a revision") as info:
        vitlab.load(f"hf-hub:timm/vit_served@{revision}")
    assert "\n" not in str(info.value)
    assert hostile_hub.requests == []
    assert _files_outside(tmp_path, hub) == []


@pytest.mark.parametrize("repo", ["timm/..", "timm/a--b", "../timm", "timm/x.git", "timm/-x", "timm/" + "x" * 96,
                                  "timm/vit served", "timm/vït"])
def test_repo_id_outside_the_hubs_rules_is_refused_before_any_request(hostile_hub, repo):
    with pytest.raises(VitlabError, match="is not a Hub repo id"):
        vitlab.load(f"hf-hub:{repo}")
    assert hostile_hub.requests == []


def test_valid_revisions_still_reach_the_hub(hostile_hub):
    for revision in ("main", "v1.0", "refs/pr/1", "c" * 40, "release/2024-01"):
        assert vitlab.load(f"hf-hub:timm/vit_served@{revision}").class_names == LABELS


@pytest.mark.parametrize("header, value", [("ETag", '"../../../escaped"'), ("ETag", '"/tmp/escaped"'),
                                           ("X-Linked-Etag", '"../../../../escaped"'),
                                           ("X-Repo-Commit", "../../../escaped")])
def test_endpoint_naming_a_blob_or_commit_outside_the_cache_is_refused(hostile_hub, hub, tmp_path, header, value):
    if value.startswith('"/tmp'):
        value = f'"{tmp_path / "escaped"}"'
    hostile_hub.headers[header] = value
    with pytest.raises(VitlabError, match="HF_ENDPOINT must be a trusted Hub") as info:
        vitlab.load("hf-hub:timm/vit_served")
    assert "\n" not in str(info.value)
    assert _files_outside(tmp_path, hub) == []


def test_hub_file_cut_by_a_lying_endpoint_is_fetched_again_and_a_cut_cached_one_named_offline(hostile_hub, hub,
                                                                                                timm_repo, monkeypatch):
    _, folder, _ = timm_repo
    whole = (folder / "model.safetensors").read_bytes()
    files = hostile_hub.repos["timm/vit_served"]
    files["model.safetensors"] = whole[: len(whole) // 2]  # the endpoint declares and sends half the file
    with pytest.raises(VitlabError, match="incomplete or corrupt model.safetensors"):
        vitlab.load("hf-hub:timm/vit_served")
    files["model.safetensors"] = whole
    assert vitlab.load("hf-hub:timm/vit_served").class_names == LABELS  # nothing bad was left in the cache
    blob = Path(os.path.realpath(hub / "models--timm--vit_served" / "snapshots" / hostile_hub.commit
                                 / "model.safetensors"))
    blob.write_bytes(whole[:-10])  # the cached copy gets cut (a full disk, say)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitlabError, match=f"incomplete or corrupt .*delete {blob}"):
        vitlab.load("hf-hub:timm/vit_served")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert vitlab.load("hf-hub:timm/vit_served").class_names == LABELS  # fetched again
    assert blob.read_bytes() == whole


BROKEN_REPOS = {
    "weight_map a list": {"config.json": {"model_type": "vit"},
                          "model.safetensors.index.json": {"weight_map": ["x"]}},
    "shard outside the repo": {"config.json": {"model_type": "vit"},
                               "model.safetensors.index.json": {"weight_map": {"w": "../../../x.safetensors"}}},
    "config nested 100000 deep": {"config.json": "[" * 100_000 + "]" * 100_000},
    "config with a 5000-digit number": {"config.json": '{"architecture": "vit_tiny_patch16_224", "num_classes": 1'
                                                      + "0" * 4999 + "}"},
    "config with NaN": {"config.json": '{"architecture": "vit_tiny_patch16_224", "num_classes": NaN}'},
    "pretrained_cfg a list": {"config.json": {"architecture": ["x"] * 3, "pretrained_cfg": [1, 2]}},
    "architectures of numbers": {"config.json": {"model_type": 5, "architectures": [1, [2]]}},
}


@pytest.mark.parametrize("case", list(BROKEN_REPOS))
def test_broken_repo_files_are_one_line_not_a_traceback(hub, case):
    lay_out_hub_cache(hub, "someone/broken", BROKEN_REPOS[case])
    with pytest.raises(VitlabError) as info:
        vitlab.load("hf-hub:someone/broken")
    assert "\n" not in str(info.value) and len(str(info.value)) < 600
    assert type(info.value).__name__ in ("VitlabError", "InvalidValueError", "UnknownNameError")
