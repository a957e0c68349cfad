"""``vitlab.push_to_hub`` / ``vitlab push`` against a real loopback Hub (tests/hub_fixtures.py ``LoopbackHub``: the
create / preupload / commit interface ``huggingface_hub`` uploads through, then the files served back): what is
pushed loads back with vitlab and with the layout's own library (timm, transformers) and computes the same logits;
the model card carries the front matter and a run's metrics; bad input is refused in one line before any request."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
import yaml

import vitlab
from tests.checkpoint_fixtures import randomize_weights_
from tests.hub_fixtures import LoopbackHub
from vitlab.cli import main
from vitlab.errors import InvalidValueError, VitlabError
from vitlab.factory import hub_folder
from vitlab.models.registry import _ALIASES
from vitlab.models.timm_args import NOT_IN_TIMM, timm_architecture

timm = pytest.importorskip("timm")
TINY = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_dim=64)
REPO = "someone/tiny-digits"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished vitlab training run: a tiny ViT, 3 steps on digits (8x8, 1 channel, 10 classes)."""
    from vitlab.train import TrainConfig, train

    root = tmp_path_factory.mktemp("run")
    train(TrainConfig().replace(data="digits", model="vit_ti16", img_size=8, model_args=dict(TINY), steps=3,
                                batch_size=8, lr=1e-3, augment="none", out_dir=str(root), threads=1, num_workers=0,
                                progress=False, eval_every_epochs=0, seed=0, warmup_steps=0, run_name="digits"))
    return root / "digits"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback Hub with no repos, HF_ENDPOINT pointing at it (also for timm / transformers, which read
    huggingface_hub's constants), a fresh Hub cache and a fake token."""
    server = LoopbackHub({})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_pushtest")
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "vitlab-home"))
    for name in ("HF_HUB_OFFLINE", "VITLAB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def test_run_folder_pushed_in_timm_layout_loads_back_in_vitlab_and_timm(hub, run_folder, tmp_path):
    original = vitlab.load(run_folder)
    result = vitlab.push_to_hub(run_folder, REPO)
    assert result["commit_url"] == f"{hub.url}/{REPO}/commit/{result['commit_oid']}"
    assert sorted(hub.repos[REPO]) == ["README.md", "config.json", "model.safetensors"]
    commit = hub.commits[-1]
    assert commit["authorization"] == "Bearer hf_pushtest" and commit["header"]["summary"] == "Upload model with vitlab"
    # every file went inline as a regular blob: nothing through LFS or xet
    assert not [path for _, path in hub.requests if "lfs" in path or "xet" in path]

    x = torch.randn(3, 1, 8, 8)
    back = vitlab.load(f"hf-hub:{REPO}")
    torch.testing.assert_close(_logits(back, x), _logits(original, x), atol=1e-5, rtol=0)
    assert back.class_names == [str(i) for i in range(10)] == original.class_names
    assert back.preprocessing == original.preprocessing

    reference = timm.create_model(f"hf-hub:{REPO}", pretrained=True, cache_dir=tmp_path / "timm-cache").eval()
    torch.testing.assert_close(_logits(reference, x), _logits(original, x), atol=1e-5, rtol=0)
    data = timm.data.resolve_data_config({}, model=reference)
    pre = original.preprocessing
    assert data["input_size"] == (1, 8, 8) and data["interpolation"] == pre.interpolation
    assert tuple(data["mean"]) == pre.mean and tuple(data["std"]) == pre.std and data["crop_pct"] == 1.0
    assert reference.pretrained_cfg["label_names"] == original.class_names

    card = hub.repos[REPO]["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert hub.card_metadata == front  # the Hub checked the same front matter
    assert front["library_name"] == "timm" and front["datasets"] == ["digits"]
    assert {"vitlab", "image-classification", "vision-transformer", "timm"} <= set(front["tags"])
    metrics = json.loads((run_folder / "result.json").read_text())["metrics"]
    assert f"| top1 | {metrics['top1']:.4f} |" in card and f"| loss | {metrics['loss']:.4f} |" in card
    assert f"{sum(p.numel() for p in original.parameters()):,}" in card
    assert "Classes: 10: 0, 1, 2" in card and f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in card


def test_model_pushed_in_hf_layout_to_a_new_private_branch_loads_in_transformers(hub, run_folder, tmp_path):
    from transformers import AutoModelForImageClassification

    model = vitlab.load(run_folder)
    result = vitlab.push_to_hub(model, REPO, layout="hf", private=True, revision="v1", commit_message="first")
    assert result["revision"] == "v1" and hub.commits[-1]["header"]["summary"] == "first"
    assert hub.created[REPO]["visibility"] == "private" and hub.repos[REPO] == {}  # main untouched
    assert "preprocessor_config.json" in hub.branches[(REPO, "v1")]
    x = torch.randn(2, 1, 8, 8)
    hf = AutoModelForImageClassification.from_pretrained(REPO, revision="v1", cache_dir=tmp_path / "tf-cache").eval()
    torch.testing.assert_close(_logits(hf, x), _logits(model, x), atol=1e-5, rtol=0)
    assert hf.config.id2label[3] == "3"
    back = vitlab.load(f"hf-hub:{REPO}@v1")
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-5, rtol=0)
    assert back.class_names == model.class_names
    front = yaml.safe_load(hub.branches[(REPO, "v1")]["README.md"].decode().split("---")[1])
    assert front["library_name"] == "transformers" and "datasets" not in front  # a model object: no run
    # the same branch in timm's layout: transformers' preprocessor config goes in the same commit
    vitlab.push_to_hub(model, REPO, revision="v1")
    assert sorted(hub.branches[(REPO, "v1")]) == ["README.md", "config.json", "model.safetensors"]
    assert "preprocessor_config.json" not in hub.commits[-1]["files"]
    back = timm.create_model(f"hf-hub:{REPO}@v1", pretrained=True, cache_dir=tmp_path / "timm-cache").eval()
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-5, rtol=0)


def test_vitlab_layout_holds_what_timm_cannot_and_timm_layout_refuses_it(hub, tmp_path):
    model = randomize_weights_(vitlab.create_model("vit_ti16", img_size=16, num_classes=3, pos_embed="sincos",
                                                   pool="gap", **TINY)).eval()
    model.class_names = ["ant", "bee", "cat"]
    with pytest.raises(InvalidValueError, match="cannot write the timm Hub layout for this model: pos_embed") as info:
        vitlab.push_to_hub(model, REPO, layout="timm")
    assert "\n" not in str(info.value)
    auto = hub_folder(model, tmp_path / "auto", repo_id=REPO)  # the default, auto: vitlab's layout, saying why
    assert auto["layout"] == "vitlab" and auto["notes"][0].startswith("vitlab layout: cannot write the timm Hub")
    with pytest.raises(InvalidValueError, match="cannot write the Hugging Face layout"):
        vitlab.push_to_hub(model, REPO, layout="hf")
    with pytest.raises(InvalidValueError, match="global-average pooling"):
        hub_folder(model, tmp_path / "dry" / "repo", repo_id=REPO, layout="hf")
    assert list((tmp_path / "dry").iterdir()) == []  # nothing left behind
    assert hub.requests == []  # refused (or written locally) before anything was sent
    vitlab.push_to_hub(model, REPO, layout="vitlab", license="apache-2.0", token="hf_given")
    assert hub.commits[-1]["authorization"] == "Bearer hf_given"  # token= wins over HF_TOKEN
    x = torch.randn(2, 3, 16, 16)
    back = vitlab.load(f"hf-hub:{REPO}")
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-5, rtol=0)
    assert back.class_names == ["ant", "bee", "cat"]
    front = yaml.safe_load(hub.repos[REPO]["README.md"].decode().split("---")[1])
    assert front["library_name"] == "vitlab" and front["license"] == "apache-2.0"


def test_gap_pooling_without_fc_norm_round_trips_through_the_timm_layout(hub, tmp_path):
    model = randomize_weights_(vitlab.create_model("vit_ti16", img_size=16, num_classes=4, pool="gap",
                                                   norm_after_pool=False, gelu="tanh", **TINY)).eval()
    assert vitlab.push_to_hub(model, REPO)["layout"] == "timm"  # auto: timm's layout where it holds the model
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_logits(vitlab.load(f"hf-hub:{REPO}"), x), _logits(model, x), atol=1e-5, rtol=0)
    reference = timm.create_model(f"hf-hub:{REPO}", pretrained=True, cache_dir=tmp_path / "timm-cache").eval()
    torch.testing.assert_close(_logits(reference, x), _logits(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["deit3_s16", "dinov2_s14_reg4", "siglip_b16", "clip_b16", "deit_s16"])
def test_timm_architecture_and_model_args_build_the_same_network_in_timm(name):
    cfg = vitlab.get_config(name, depth=1, img_size=28 if "14" in name else 32)
    model = randomize_weights_(vitlab.create_model(name, depth=1, img_size=cfg.img_size)).eval()
    architecture, model_args = timm_architecture(model.cfg)
    reference = timm.create_model(architecture, pretrained=False, **model_args).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, *cfg.img_size)
    torch.testing.assert_close(_logits(reference, x), _logits(model, x), atol=1e-5, rtol=1e-5)


def test_the_aliases_timm_lacks_are_exactly_the_listed_ones():
    assert {a for a in _ALIASES if not timm.is_model(a)} == set(NOT_IN_TIMM)


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "org/x--y", "org/has space", "org/name@main", "org/.."])
def test_bad_repo_id_is_refused_before_any_request(hub, run_folder, repo):
    with pytest.raises(InvalidValueError, match="repo_id") as info:
        vitlab.push_to_hub(run_folder, repo)
    assert "\n" not in str(info.value)
    assert hub.requests == []


def test_missing_path_and_bad_layout_are_refused(hub, tmp_path):
    with pytest.raises(VitlabError, match="no such file or directory"):
        vitlab.push_to_hub(tmp_path / "nothing.safetensors", REPO)
    with pytest.raises(InvalidValueError, match="layout='onnx': choose one of auto, timm, hf, vitlab"):
        vitlab.push_to_hub(tmp_path / "nothing.safetensors", REPO, layout="onnx")
    with pytest.raises(InvalidValueError, match="a Linear is not a vitlab model"):
        vitlab.push_to_hub(torch.nn.Linear(2, 2), REPO)
    with pytest.raises(InvalidValueError, match="got a dict"):
        vitlab.push_to_hub({}, REPO)
    assert hub.requests == []


def test_cli_push_dry_run_writes_the_folder_and_contacts_no_server(hub, run_folder, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["push", str(run_folder), REPO, "--layout", "hf", "--dry-run", "--out", str(out)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "preprocessor_config.json"]
    assert hub.requests == []
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(_logits(vitlab.load(out), x), _logits(vitlab.load(run_folder), x), atol=1e-5, rtol=0)


def test_cli_push_uploads_and_errors_are_one_line_with_status_2(hub, run_folder, capsys):
    assert main(["push", str(run_folder), REPO, "--message", "from the CLI"]) == 0
    assert f"{hub.url}/{REPO}/commit/" in capsys.readouterr().out
    assert hub.commits[-1]["header"]["summary"] == "from the CLI"
    for argv, expected in ((["push", str(run_folder), "bad id"], "repo_id"),
                           (["push", str(run_folder), REPO, "--dry-run"], "--out DIR"),
                           (["push", "missing.safetensors", REPO], "no such file")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitlab push: error: ") and expected in err and err.count("\n") == 1


def test_offline_push_is_refused_in_one_line(hub, run_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitlabError, match="network use is off"):
        vitlab.push_to_hub(run_folder, REPO)
    assert hub.requests == []


@pytest.mark.slow  # a full-size ViT-Ti/16 (5 s here)
def test_catalog_name_dry_run_gets_the_entrys_licence_and_imagenet_names(tmp_path, monkeypatch):
    """A catalog checkpoint (ViT-Ti/16 AugReg, placed in the cache as a random-weight npz) pushed offline as a dry
    run: timm reads the folder back with the same logits, and the card has the entry's licence."""
    from tests.checkpoint_fixtures import save_npz, vit_jax_arrays
    from vitlab.hub import cache_path, get_pretrained

    name = "vit_ti16.augreg_in21k_ft_in1k"
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    reference = randomize_weights_(timm.create_model("vit_tiny_patch16_224", num_classes=1000), seed=3).eval()
    dest = cache_path(get_pretrained(name).sources[0].location)
    dest.parent.mkdir(parents=True)
    save_npz(dest, vit_jax_arrays(reference))
    out = tmp_path / "repo"
    hub_folder(name, out, repo_id="me/ti16")
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["license"] == get_pretrained(name).license == "apache-2.0"
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and len(config["label_names"]) == 1000
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    model = vitlab.load(name)
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-5, rtol=1e-5)
