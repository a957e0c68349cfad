"""Model soups (``vitlab.soup``, ``vitlab soup``): the uniform and weighted soups are the hand-computed float64
averages of the ingredients' state dicts, bit for bit; ingredients of another model are refused in one line naming
the file; the greedy soup keeps exactly the ingredients a constructed case says it must; the written file loads with
its metadata and gives the Python soup's logits."""

import dataclasses
import json

import pytest
import torch

import vitlab
from tests.checkpoint_fixtures import randomize_weights_
from vitlab.checkpoints.soup import WeightSum
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.models import VisionTransformer, ViTConfig
from vitlab.preprocessing import Preprocessing

CFG = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2, mlp_dim=32)
NAMES = ["ant", "bee", "cat"]
PRE = Preprocessing(img_size=(8, 8), mean=(0.3,), std=(0.2,), channels=1)


def _save(model, path, **kwargs):
    kwargs.setdefault("class_names", NAMES)
    return str(vitlab.save(model, path, **kwargs))


@pytest.fixture()
def three(tmp_path):
    """Three random tiny ViTs of one architecture, saved; (paths, state dicts)."""
    paths, sds = [], []
    for seed in range(3):
        model = randomize_weights_(VisionTransformer(CFG), seed=seed).eval()
        paths.append(_save(model, tmp_path / f"m{seed}.safetensors", preprocessing=PRE if seed == 0 else None))
        sds.append({k: v.clone() for k, v in model.state_dict().items()})
    return paths, sds


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_uniform_soup_is_the_float64_mean_of_the_state_dicts(three):
    paths, sds = three
    result = vitlab.soup(paths)
    got = result.model.state_dict()
    assert result.method == "uniform" and result.kept == paths and result.score is None
    for key in sds[0]:
        expected = ((sds[0][key].double() + sds[1][key].double() + sds[2][key].double()) / 3).to(sds[0][key].dtype)
        assert torch.equal(got[key], expected), key  # exact: float64 sum, one rounding
        torch.testing.assert_close(got[key], torch.stack([sd[key] for sd in sds]).mean(0), rtol=1e-6, atol=1e-7)


def test_weighted_soup_and_its_weight_checks(three):
    paths, sds = three
    got = vitlab.soup(paths, weights=[1, 2, 5]).model.state_dict()
    for key in sds[0]:
        expected = (sds[0][key].double() + 2 * sds[1][key].double() + 5 * sds[2][key].double()) / 8
        assert torch.equal(got[key], expected.float()), key
    # a zero weight leaves that ingredient out: the mean of the other two
    two = vitlab.soup(paths, weights=[1, 0, 1]).model.state_dict()
    assert torch.equal(two["head.weight"], ((sds[0]["head.weight"].double() + sds[2]["head.weight"].double()) / 2)
                       .float())
    for bad, says in (([1, 2], "2 given for 3"), ([1, -1, 1], "non-negative"), ([0, 0, 0], "not all zero"),
                      ([1, float("nan"), 1], "finite")):
        with pytest.raises(VitlabError) as exc:
            vitlab.soup(paths, weights=bad)
        assert says in _one_line(exc)


def test_soup_keeps_the_first_ingredients_metadata_and_writes_a_loadable_file(three, tmp_path):
    paths, _ = three
    out = tmp_path / "soup.safetensors"
    result = vitlab.soup(paths, out=out)
    assert result.path == out
    loaded = vitlab.load(out)
    assert loaded.class_names == NAMES
    assert loaded.preprocessing == PRE  # the first ingredient's (the others have the default)
    assert any("other preprocessing" in n for n in result.notes)
    record = vitlab.read_checkpoint(out).metadata["soup"]
    assert record["method"] == "uniform" and [i["checkpoint"] for i in record["ingredients"]] == paths
    for key, value in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_a_soup_of_training_checkpoints_takes_their_ema_weights_when_asked(tmp_path):
    models = [randomize_weights_(VisionTransformer(CFG), seed=s) for s in range(4)]
    paths = []
    for i in range(2):  # a vitlab training state's layout: model, model_ema, vit_config, class_names
        path = tmp_path / f"run{i}.pt"
        torch.save({"model": models[2 * i].state_dict(), "model_ema": models[2 * i + 1].state_dict(),
                    "vit_config": CFG.to_dict(), "class_names": NAMES}, path)
        paths.append(path)
    plain = vitlab.soup(paths).model.state_dict()
    ema = vitlab.soup(paths, prefer_ema=True).model.state_dict()
    for got, (a, b) in ((plain, (models[0], models[2])), (ema, (models[1], models[3]))):
        expected = (a.state_dict()["head.weight"].double() + b.state_dict()["head.weight"].double()) / 2
        assert torch.equal(got["head.weight"], expected.float())


def test_ingredients_of_another_model_are_refused_in_one_line_naming_the_file(three, tmp_path):
    paths, _ = three
    wider = _save(randomize_weights_(VisionTransformer(CFG.replace(embed_dim=32))), tmp_path / "wide.safetensors")
    other_head = _save(VisionTransformer(CFG.replace(num_classes=4)), tmp_path / "four.safetensors",
                       class_names=None)
    renamed = _save(VisionTransformer(CFG), tmp_path / "renamed.safetensors", class_names=["ant", "bee", "dog"])
    for bad, says in ((wider, "embed_dim 32"), (other_head, "num_classes 4"), (renamed, "other class names")):
        with pytest.raises(VitlabError) as exc:
            vitlab.soup([paths[0], bad])
        text = _one_line(exc)
        assert text.startswith(bad) and says in text and paths[0] in text
    with pytest.raises(VitlabError) as exc:
        vitlab.soup(paths[:1])
    assert "at least 2 ingredients, got 1" in _one_line(exc)
    with pytest.raises(VitlabError) as exc:
        vitlab.soup(paths, out=paths[2])
    assert "already exists" in _one_line(exc)
    with pytest.raises(VitlabError) as exc:
        vitlab.soup(paths, greedy=True)
    assert "held-out score" in _one_line(exc)


def test_integer_tensors_must_be_equal_in_every_ingredient(three):
    paths, _ = three
    a, b = (vitlab.read_checkpoint(p) for p in paths[:2])
    with_counter = [dataclasses.replace(c, state_dict={**c.state_dict, "steps": torch.tensor([7, 9])})
                    for c in (a, b)]
    total = WeightSum(with_counter[0])
    total.add(with_counter[1])
    assert torch.equal(total.average()["steps"], torch.tensor([7, 9]))  # kept as is, not averaged
    changed = dataclasses.replace(b, state_dict={**b.state_dict, "steps": torch.tensor([7, 10])})
    with pytest.raises(VitlabError) as exc:
        WeightSum(with_counter[0]).add(changed)
    assert "steps (int64) differs" in _one_line(exc) and "must be equal" in str(exc.value)


def _with_bias(tmp_path, name, value):
    model = randomize_weights_(VisionTransformer(CFG), seed=0)
    with torch.no_grad():
        model.head.bias.fill_(value)
    return _save(model, tmp_path / name)


def test_greedy_soup_keeps_what_does_not_lower_the_score(tmp_path):
    # the score is closeness of the head bias to 2: A (1) and B (3) score -1 each, C (10) scores -8; from A (first of
    # the tie, in the given order B comes before A), adding B gives bias 2 (score 0: kept), then C gives 14/3
    # (score -2.67: left out). With D and E (bias 2, score 0) the soup starts from D, keeps E (the score stays 0:
    # not a drop) and leaves out A, B and C (each moves the bias away from 2).
    a, b, c, d, e = (_with_bias(tmp_path, f"{n}.safetensors", v)
                     for n, v in (("a", 1.0), ("b", 3.0), ("c", 10.0), ("d", 2.0), ("e", 2.0)))

    def score(model):
        return -abs(model.head.bias.double().mean().item() - 2.0)

    result = vitlab.soup([c, b, a], score=score, greedy=True)
    assert [(i.checkpoint, i.score, i.kept) for i in result.ingredients] == [(c, -8.0, False), (b, -1.0, True),
                                                                            (a, -1.0, True)]
    assert result.score == 0.0 and result.method == "greedy"
    assert [i.soup_score for i in result.ingredients] == [pytest.approx(-(14 / 3 - 2)), -1.0, 0.0]  # B, A, C tried
    assert torch.equal(result.model.head.bias, torch.full((3,), 2.0))
    with_d = vitlab.soup([a, b, c, d, e], score=score, greedy=True)
    assert [i.kept for i in with_d.ingredients] == [False, False, False, True, True] and with_d.score == 0.0
    uniform = vitlab.soup([c, b, a], score=score)  # scored, not chosen: everything kept
    assert uniform.score == pytest.approx(-(14 / 3 - 2)) and all(i.kept for i in uniform.ingredients)
    with pytest.raises(VitlabError) as exc:
        vitlab.soup([a, b], score=score, greedy=True, weights=[1, 2])
    assert "drop the weights" in _one_line(exc)


def test_cli_round_trip_gives_the_python_soups_logits(three, tmp_path, capsys):
    paths, _ = three
    out = tmp_path / "cli.safetensors"
    assert main(["soup", *paths, "--out", str(out), "--weights", "1", "1", "2"]) == 0
    printed = capsys.readouterr().out
    assert "weighted soup of 3 checkpoints" in printed and f"wrote {out}" in printed
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = vitlab.soup(paths, weights=[1, 1, 2]).model(x)
        got = vitlab.load(out)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert vitlab.load(out).class_names == NAMES
    assert main(["soup", *paths, "--out", str(out)]) == 2  # exists: refused before anything is read
    assert "already exists" in capsys.readouterr().err
    assert main(["soup", paths[0], "--out", str(tmp_path / "one.safetensors")]) == 2
    assert "at least 2 ingredients" in capsys.readouterr().err
    assert main(["soup", *paths, "--out", str(tmp_path / "g.safetensors"), "--greedy"]) == 2
    assert "give --data" in capsys.readouterr().err


def _digits_heads(tmp_path):
    """A random trunk with a least-squares head fitted to the held-out digits (A), the same with the head doubled
    (B: the same predictions) and with it times -6 (C: the soup of A, B and C has head -A, the worst classifier)."""
    from vitlab.tasks import heldout_dataset

    cfg = CFG.replace(num_classes=10)
    model = randomize_weights_(VisionTransformer(cfg), seed=0).eval()
    data = heldout_dataset("digits", "train", Preprocessing.for_model(8, 1), holdout=300, seed=0)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        design = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        solution = torch.linalg.lstsq(design, torch.nn.functional.one_hot(y, 10).double()).solution.float()
    paths = []
    for name, factor in (("a", 1.0), ("b", 2.0), ("c", -6.0)):
        with torch.no_grad():
            model.head.weight.copy_(factor * solution[:-1].T)
            model.head.bias.copy_(factor * solution[-1])
        paths.append(_save(model, tmp_path / f"{name}.safetensors", class_names=None))
    return paths


def test_cli_greedy_soup_on_held_out_training_images_leaves_out_the_harmful_one(tmp_path, capsys):
    pytest.importorskip("sklearn")
    a, b, c = _digits_heads(tmp_path)
    out = tmp_path / "greedy.safetensors"
    assert main(["soup", c, a, b, "--out", str(out), "--greedy", "--data", "digits", "--split", "train",
                 "--holdout", "300", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    scores = {i["checkpoint"]: i["score"] for i in result["ingredients"]}
    assert scores[a] == scores[b] > 0.3 > scores[c]
    assert result["kept"] == [a, b] and result["score"] == scores[a]
    loaded = vitlab.load(out)
    torch.testing.assert_close(loaded.head.weight, 1.5 * vitlab.load(a).head.weight, rtol=1e-6, atol=0)
    assert vitlab.read_checkpoint(out).metadata["soup"]["method"] == "greedy"
    # the uniform soup of the three scores below every ingredient it contains but C
    assert main(["soup", a, b, c, "--out", str(tmp_path / "u.safetensors"), "--data", "digits", "--holdout", "300",
                 "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] < scores[a]


def test_a_hub_repo_and_a_local_file_make_a_soup(tmp_path, monkeypatch):
    # an hf-hub: name is an ingredient like a file: the timm-layout repo's weights averaged with a local vitlab file
    # of the same model; the soup keeps the repo's preprocessing and class names (the first ingredient's)
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from tests.hub_fixtures import lay_out_hub_cache, offline_hub_cache

    hub = offline_hub_cache(tmp_path, monkeypatch)
    model = randomize_weights_(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, depth=1)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 3, "num_features": 192, "global_pool": "token",
              "label_names": NAMES, "model_args": {"depth": 1},
              "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875,
                                 "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3], "num_classes": 3}}
    lay_out_hub_cache(hub, "timm/vit_soup", {"config.json": config,
                                            "model.safetensors": (tmp_path / "w.safetensors").read_bytes()})
    from_hub = vitlab.load("hf-hub:timm/vit_soup")
    other = randomize_weights_(vitlab.load("hf-hub:timm/vit_soup"), seed=5)
    local = _save(other, tmp_path / "local.safetensors", preprocessing=PRE.replace(img_size=(32, 32), channels=3,
                                                                                   mean=(0.5,) * 3, std=(0.5,) * 3))
    result = vitlab.soup(["hf-hub:timm/vit_soup", local])
    for key, value in result.model.state_dict().items():
        expected = (from_hub.state_dict()[key].double() + other.state_dict()[key].double()) / 2
        assert torch.equal(value, expected.float()), key
    assert result.model.preprocessing == from_hub.preprocessing and result.model.class_names == NAMES
