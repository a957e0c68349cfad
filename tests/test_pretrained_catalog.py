"""The catalog of pre-trained checkpoints: every entry checked against the model registry (parameter count, token
grid, resolution, classes) and, where timm is installed, against timm's own table of the same weights."""

from __future__ import annotations

import json

import pytest
import torch

import vitlab
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.hub.cache import http_url
from vitlab.labels import class_names, wordnet_ids
from vitlab.models import create_model, get_config, resolve
from vitlab.models.pretrained import CATALOG, DEFAULT_TAGS, LABEL_SETS, get_pretrained, list_pretrained

ENTRIES = {e.name: e for e in CATALOG}


def _count(entry) -> int:
    overrides = {"img_size": entry.img_size, "num_classes": entry.num_classes}
    if entry.representation_size:
        overrides["representation_size"] = entry.representation_size
    with torch.device("meta"):
        model = create_model(entry.model, **overrides)
    # EVA-02: vitlab stores the zero key third of each q/k/v bias, which the published files do not hold
    unstored = model.cfg.depth * model.cfg.embed_dim if getattr(model.cfg, "rope_kind", None) == "eva" else 0
    return sum(p.numel() for p in model.parameters()) - unstored


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_entry_matches_the_architecture_it_names(name):
    entry = ENTRIES[name]
    assert resolve(entry.model)[0].name == entry.model, "entries use canonical model names"
    assert _count(entry) == entry.params
    cfg = get_config(entry.model, img_size=entry.img_size, num_classes=entry.num_classes)
    if hasattr(cfg, "grid_size"):  # the token grid the position embedding of the file must have
        stride = entry.img_size // cfg.grid_size[0]
        assert cfg.grid_size == (entry.img_size // stride,) * 2
        assert entry.img_size % stride == 0 or cfg.drop_remainder  # SigLIP So400m/14 at 384: 27x27, 6 px unused
    if entry.labels:
        assert LABEL_SETS[entry.labels] == entry.num_classes
    else:  # features (DINOv2, SigLIP) or CLIP's image-to-text projection: no class names
        assert entry.num_classes in (0, 512, 768)
    tag = entry.tag
    if tag.startswith(("orig", "augreg", "goog")):  # the paper's releases: in21k or fine-tuned on in1k
        assert ("_ft_in1k" in tag) == (entry.num_classes == 1000)
    size_suffix = tag.rsplit("_", 1)[-1]
    default_size = getattr(get_config(entry.model), "img_size", (224, 224))[0]
    assert (size_suffix == str(entry.img_size)) == (entry.img_size != default_size)
    assert entry.sources and entry.license in ("apache-2.0", "mit")
    for top1 in (entry.top1_paper, entry.top1_timm):
        assert top1 is None or 60 < top1 < 91  # EVA-02 L (m38m, in22k -> in1k): 90.05
    for source in entry.sources:
        assert source.kind in ("gcs", "timm", "transformers", "url")
        assert source.size is None and source.sha256 is None  # no publisher states them (module docstring)
        if source.kind == "gcs":
            assert source.location.startswith(("gs://vit_models/", "gs://bit_models/"))
            assert source.location.endswith(".npz")
        if source.kind == "url":  # the DeiT / DINOv2 releases
            assert source.location.startswith("https://dl.fbaipublicfiles.com/") and source.location.endswith(".pth")
        if source.kind == "timm":  # the repo's architecture is this model at this resolution
            arch = source.location.split("/", 1)[1].split(".")[0]
            reg, implied = resolve(arch)
            # timm's _quickgelu_ models load the same OpenAI repos as the plain CLIP names
            assert entry.model in (reg.name, f"{reg.name}_quickgelu")
            assert implied.get("img_size", entry.img_size) == entry.img_size or entry.model.startswith("bit_")


def test_catalog_holds_every_release_the_issue_lists():
    originals = ["vit_b16", "vit_b32", "vit_l16", "vit_l32", "vit_h14", "r50_vit_b16", "r26_vit_b32", "r50_vit_l32"]
    for model in originals:
        assert f"{model}.orig_in21k" in ENTRIES
    for name in ("vit_b16.orig_in21k_ft_in1k", "vit_b16.orig_in21k_ft_in1k_384", "vit_b32.orig_in21k_ft_in1k_384",
                 "vit_l16.orig_in21k_ft_in1k", "vit_l16.orig_in21k_ft_in1k_384", "vit_l32.orig_in21k_ft_in1k_384",
                 "r50_vit_b16.orig_in21k_ft_in1k_384", "bit_r50x1.goog_in21k"):
        assert name in ENTRIES
    for size in ("ti16", "s16", "b16", "l16"):
        for tag in ("augreg_in21k", "augreg_in21k_ft_in1k", "augreg_in21k_ft_in1k_384"):
            assert f"vit_{size}.{tag}" in ENTRIES
    hf = {s.location for e in CATALOG for s in e.sources if s.kind == "transformers" and "/vit-" in s.location}
    assert hf == {f"google/vit-{r}" for r in (
        "base-patch16-224", "base-patch16-384", "base-patch16-224-in21k", "base-patch32-224-in21k",
        "base-patch32-384", "large-patch16-224", "large-patch16-384", "large-patch16-224-in21k",
        "large-patch32-224-in21k", "large-patch32-384", "huge-patch14-224-in21k")}


def test_every_default_tag_names_an_entry_and_lookups_resolve_aliases():
    for model, tag in DEFAULT_TAGS.items():
        assert get_pretrained(model).name == f"{model}.{tag}"
    assert get_pretrained("vit_base_patch16_384.augreg_in21k_ft_in1k").name == "vit_b16.augreg_in21k_ft_in1k_384"
    assert get_pretrained("vit_b16", "augreg_in21k").name == "vit_b16.augreg_in21k"
    assert [e.name for e in list_pretrained("vit_ti16*ft_in1k*")] == ["vit_ti16.augreg_in21k_ft_in1k",
                                                               "vit_ti16.augreg_in21k_ft_in1k_384"]


def test_unknown_name_suggests_the_closest_entries():
    with pytest.raises(KeyError, match="did you mean vit_b16.augreg_in21k_ft_in1k"):
        get_pretrained("vit_b16.augreg_in21k_ft_in1")
    with pytest.raises(VitlabError, match="did you mean vit_l16.augreg_in21k"):
        vitlab.load("vit_l16.augreg_i21k")


def test_gcs_urls_are_percent_encoded_https():
    assert http_url("gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz") == \
        "https://storage.googleapis.com/vit_models/imagenet21k%2Bimagenet2012/ViT-B_16.npz"


def test_label_files_ship_with_the_package():
    names = class_names("imagenet-1k")
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    ids = wordnet_ids("imagenet-1k")
    assert ids == sorted(ids) and ids[0] == "n01440764"
    assert len(class_names("imagenet-21k")) == 21843


def test_catalog_agrees_with_timm_default_cfgs():
    """timm's table is an independent record of the same releases: repo names, GCS files, sizes and classes."""
    pytest.importorskip("timm")
    from timm.models import get_pretrained_cfg

    checked = 0
    for entry in CATALOG:
        gcs = [s for s in entry.sources if s.kind == "gcs"]
        for source in entry.sources:
            if source.kind != "timm":
                continue
            cfg = get_pretrained_cfg(source.location.split("/", 1)[1])
            assert cfg is not None, source.location
            assert tuple(cfg.input_size) == (3, entry.img_size, entry.img_size)
            assert cfg.num_classes == (0 if source.note else entry.num_classes)
            assert cfg.hf_hub_id == source.location
            # OpenAI's CLIP and OpenCLIP are MIT-licensed (github.com/openai/CLIP, mlfoundations/open_clip);
            # timm's table says apache-2.0 for every CLIP tag
            assert cfg.license == entry.license or (entry.license == "mit" and entry.model.startswith("clip_"))
            if cfg.url and "storage.googleapis.com" in cfg.url:
                assert gcs and http_url(gcs[0].location) == cfg.url
            urls = [s.location for s in entry.sources if s.kind == "url"]
            if urls:  # the publisher's file is the one timm converts
                assert cfg.url == urls[0]
            if not entry.model.startswith(("vit_", "r50_", "r26_", "r_vit", "bit_")):  # the families' statistics
                pre = entry.preprocessing
                assert (tuple(cfg.mean), tuple(cfg.std), cfg.interpolation) == (pre.mean, pre.std, pre.interpolation)
            checked += 1
    assert checked >= 70


@pytest.mark.slow
def test_catalog_parameter_counts_agree_with_timm():
    timm = pytest.importorskip("timm")
    for entry in CATALOG:
        timm_repo = next((s.location for s in entry.sources if s.kind == "timm"), None)
        if timm_repo is None or entry.representation_size:  # timm builds no pre-logits layer
            continue
        with torch.device("meta"):
            model = timm.create_model(timm_repo.split("/", 1)[1].split(".")[0], num_classes=entry.num_classes)
        assert sum(p.numel() for p in model.parameters()) == entry.params, entry.name


def test_models_cli_lists_the_catalog(capsys):
    assert main(["models", "--pretrained", "vit_ti16"]) == 0
    out = capsys.readouterr().out
    assert "vit_ti16.augreg_in21k_ft_in1k " in out and "75.45" in out and "gs://vit_models/augreg/Ti_16" in out
    # each accuracy says whose it is: timm's measurement, or the paper's table where timm has none
    row = next(line for line in out.splitlines() if line.startswith("vit_ti16.augreg_in21k_ft_in1k "))
    assert row.split()[5:7] == ["75.45", "timm"], row
    assert main(["models", "--pretrained", "vit_l16.orig_in21k_ft_in1k_384", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["top1"], entry["top1_source"]) == (entry["top1_paper"], "paper") and entry["top1_timm"] is None
    assert main(["models", "--pretrained", "vit_l16.orig_in21k_ft_in1k_384"]) == 0
    assert f"{entry['top1']:.2f} paper" in capsys.readouterr().out
    assert main(["models", "--pretrained", "nothing-like-this"]) == 2


def test_docs_catalog_table_is_the_catalog():
    """docs/pretrained.md lists every entry with the numbers the table holds (no hand-copied drift)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "pretrained.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `") and "|" in line[3:] and "M |" in line]
    assert len(rows) == len(CATALOG)
    for row, entry in zip(rows, CATALOG):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].split("`")[1] == entry.name
        assert ("(default)" in cells[0]) == (DEFAULT_TAGS.get(entry.model) == entry.tag)
        assert cells[1:4] == [str(entry.img_size), f"{entry.num_classes:,}", f"{entry.params / 1e6:.1f}M"]
        assert cells[4] == (f"{entry.top1_timm:.2f}" if entry.top1_timm else "-")
        assert cells[5] == (f"{entry.top1_paper:.2f}" if entry.top1_paper else "-")


def test_imagenet_synset_folders_match_the_shipped_names():
    """An ImageNet val folder (``n01440764/``, ...) evaluates a checkpoint carrying ``tench``, ... names."""
    from vitlab.evaluate.classmap import check_classes
    from vitlab.labels import same_classes

    names, ids = class_names("imagenet-1k"), wordnet_ids("imagenet-1k")
    check_classes(1000, names, ids, "vit_b16.augreg_in21k_ft_in1k", "imagenet/val")
    assert same_classes(ids, names) and not same_classes(names, ids[::-1])
    with pytest.raises(VitlabError, match="name their classes differently"):
        check_classes(1000, names, ids[1:] + ids[:1], "ckpt", "data")
