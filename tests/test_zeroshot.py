"""Zero-shot classifiers: the projection + L2-norm head option of the ViT, and classifiers built from an image-text
model's class-prompt embeddings (checked against the image-text model's own logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.errors import InvalidValueError
from vitlab.models import VisionTransformer, ViTConfig

from .image_text_fixtures import clip_folder as make_clip_folder
from .image_text_fixtures import siglip_folder as make_siglip_folder

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=3)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def test_head_projection_and_l2_norm_compute_scaled_cosines():
    model = _randomised(VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True)))
    x = torch.randn(4, 3, 32, 32)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (4, 32)  # pre-logits: before the projection
    embedded = F.normalize(pooled @ model.head_proj.weight.T, dim=-1)
    expected = embedded @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # every logit is bounded by its row's norm (a scaled cosine) plus the bias
    bound = model.head.weight.norm(dim=1) + model.head.bias.abs()
    assert (model(x).abs() <= bound + 1e-5).all()


def test_head_options_save_load_and_reset(tmp_path):
    model = _randomised(VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True)))
    x = torch.randn(2, 3, 32, 32)
    path = vitlab.save(model, tmp_path / "zs.safetensors", class_names=["a", "b", "c"], metadata={"loss": "sigmoid"})
    loaded = vitlab.load(path)
    assert loaded.cfg.head_proj_dim == 8 and loaded.cfg.head_l2_norm
    assert loaded.class_names == ["a", "b", "c"] and loaded.loss == "sigmoid"
    torch.testing.assert_close(loaded(x), model(x))
    # a new head for other classes keeps the projection and the norm (fine-tuning a cosine classifier)
    other = vitlab.load(path, num_classes=5)
    torch.testing.assert_close(other.head_proj.weight, model.head_proj.weight)
    assert other.cfg.head_l2_norm and other(x).abs().max() == 0  # zero-initialised new head
    # pruning the head for features drops the projection and norm too: the pooled features come out
    pruned = _randomised(VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True)))
    reference = pruned.forward_head(pruned.forward_features(x), pre_logits=True)
    pruned.prune_intermediate_layers(indices=1, prune_head=True)
    torch.testing.assert_close(pruned(x), reference)


def test_head_options_refused_where_a_layout_cannot_hold_them(tmp_path):
    model = VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True))
    for fmt in ("timm", "npz", "hf"):
        with pytest.raises(InvalidValueError, match="head_proj_dim|zero-shot head"):
            vitlab.convert(vitlab.save(model, tmp_path / "m.safetensors"), tmp_path / f"out.{fmt}.safetensors"
                           if fmt != "npz" else tmp_path / "out.npz", to=fmt)
    with pytest.raises(InvalidValueError, match="head_proj_dim must be"):
        ViTConfig(**TINY, head_proj_dim=-1)
    with pytest.raises(InvalidValueError, match="distilled=True does not combine with head_proj_dim"):
        ViTConfig(**{**TINY, "head_l2_norm": True, "distilled": True})


# --------------------------------------------------------------------- classifiers from image-text models
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CLASSES = ["cat", "dog", "race car"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("zs") / "clip")


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    return make_siglip_folder(tmp_path_factory.mktemp("zs") / "siglip")


def _reference_logits(ref, model, images, prompts):
    with torch.no_grad():
        return ref(input_ids=model.tokenize(prompts), pixel_values=images).logits_per_image


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_classifier_logits_equal_transformers_logits_per_image(kind, request):
    from vitlab.zeroshot import zero_shot_classifier

    ref, folder = request.getfixturevalue(f"{kind}_folder")
    model = vitlab.load_image_text(folder)
    classifier = zero_shot_classifier(model, CLASSES)
    assert classifier.class_names == CLASSES and classifier.cfg.head_l2_norm
    assert classifier.loss == ("softmax" if kind == "clip" else "sigmoid")
    assert classifier.cfg.head_proj_dim == (24 if kind == "clip" else 0)
    images = torch.randn(4, 3, 32, 32)
    expected = _reference_logits(ref, model, images, [f"a photo of a {c}." for c in CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), expected, rtol=1e-5, atol=1e-5)
    # the tokens differ per class (else the test would prove little)
    tokens = model.tokenize([f"a photo of a {c}." for c in CLASSES])
    assert len({tuple(t.tolist()) for t in tokens}) == 3 and (tokens == 2).sum() == 0  # no unknown words


def test_prompt_ensemble_averages_unit_text_embeddings(clip_folder):
    from vitlab.zeroshot import zero_shot_classifier

    ref, folder = clip_folder
    model = vitlab.load_image_text(folder)
    templates = ["a photo of a {}.", "a drawing of the {}.", "a blurry photo of a small {}."]
    classifier = zero_shot_classifier(model, CLASSES, templates)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = ref(input_ids=model.tokenize([t.format(c) for c in CLASSES for t in templates]), pixel_values=images)
        text = F.normalize(out.text_embeds.reshape(3, 3, -1).mean(dim=1), dim=-1)
        expected = ref.logit_scale.exp() * out.image_embeds @ text.T
        torch.testing.assert_close(classifier(images), expected, rtol=1e-5, atol=1e-5)


def test_class_names_and_templates_refused_in_one_line(clip_folder):
    from vitlab.zeroshot import zero_shot_classifier

    model = vitlab.load_image_text(clip_folder[1])
    with pytest.raises(InvalidValueError, match=r"'a photo' must hold the class name's place as \{\} exactly once"):
        zero_shot_classifier(model, CLASSES, ["a photo"])
    with pytest.raises(InvalidValueError, match="'cat' is given twice"):
        zero_shot_classifier(model, ["cat", "dog", "cat"])
    with pytest.raises(InvalidValueError, match="at least one class"):
        zero_shot_classifier(model, [])


def _image_folder(root, per_class=3):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "race_car"):
        (root / "test" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "test" / name / f"{i}.png")
    return root


def test_commands_zero_shot_predict_and_eval(clip_folder, tmp_path, capsys):
    import json

    from vitlab.cli import main
    from vitlab.evaluate.data import eval_dataset

    ref, folder = clip_folder
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "clf.safetensors"
    assert main(["zero-shot", str(folder), "--data", str(data), "--out", str(out)]) == 0
    assert "zero-shot classifier of 3 classes (cat, dog, race_car)" in capsys.readouterr().out
    assert main(["zero-shot", str(folder), "--classes", "cat,dog", "--out", str(out)]) == 2  # never replaced
    assert "already exists" in capsys.readouterr().err
    classifier = vitlab.load(out)
    assert classifier.class_names == ["cat", "dog", "race_car"] and classifier.loss == "softmax"
    assert main(["info", str(out)]) == 0  # the head options and where the classifier came from
    described = capsys.readouterr().out
    assert "head_proj_dim=24, head_l2_norm=True" in described and '"templates": ["a photo of a {}."]' in described

    # the data read with the tower's preprocessing; transformers' logits against the prompts give the expected top-1
    model = vitlab.load_image_text(folder)
    dataset = eval_dataset(str(data), "test", classifier.preprocessing)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    expected = _reference_logits(ref, model, images, [f"a photo of a {c}." for c in ("cat", "dog", "race car")])
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), expected, rtol=1e-5, atol=1e-5)
    top1 = (expected.argmax(1) == labels).float().mean().item()

    assert main(["eval", str(folder), "--zero-shot", "--data", str(data), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["top1"] == pytest.approx(top1) and results["zero_shot"]["templates"] == ["a photo of a {}."]
    assert main(["eval", str(out), "--data", str(data), "--json"]) == 0  # the written file: the same numbers
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(top1)

    first = data / "test" / "dog" / "0.png"
    assert main(["predict", str(folder), str(first), "--classes", "cat,dog,race car", "--json", "--topk", "1"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["top"][0]["class"] == ["cat", "dog", "race car"][int(expected[3].argmax())]

    # options that make no sense are refused before anything loads
    assert main(["eval", str(folder), "--data", str(data), "--template", "a {}"]) == 2
    assert "add --zero-shot" in capsys.readouterr().err
    assert main(["predict", str(folder), str(first), "--template", "a {}"]) == 2
    assert "give --classes or --classes-file" in capsys.readouterr().err
    assert main(["zero-shot", str(folder), "--classes", "cat,,dog", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "an empty name" in capsys.readouterr().err


@pytest.mark.parametrize("per_request", [False, True], ids=["classes", "zero-shot"])
def test_vitlab_serve_classes_answers_as_the_zero_shot_classifier(siglip_folder, per_request):
    import io
    import json

    from PIL import Image

    from tests.serve_helpers import cli_server, noise_png, post_files, request

    pytest.importorskip("fastapi")
    ref, folder = siglip_folder
    args = [str(folder), "--classes", ",".join(CLASSES), "--template", "a drawing of the {}."]
    with cli_server(*args, *["--zero-shot"] * per_request) as (line, url):
        assert line.startswith("vitlab serve: siglip (torch on cpu) at http://127.0.0.1:"), line
        card = json.loads(request(url + "/v1/model")[2])
        assert card["class_names"] == CLASSES and card["probabilities"] == "sigmoid" and card["source"] == "siglip"
        assert card["zero_shot"] == ({"templates": ["a drawing of the {}."]} if per_request else None)
        status, _, answer = post_files(url + "/v1/classify", [("a.png", noise_png((32, 32)))])
        assert status == 200, answer
        from vitlab.zeroshot import zero_shot_classifier

        classifier = zero_shot_classifier(vitlab.load_image_text(folder), CLASSES, ["a drawing of the {}."])
        upload = Image.open(io.BytesIO(noise_png((32, 32)))).convert("RGB")
        engine_input = classifier.preprocessing.transform()(upload).unsqueeze(0)
        with torch.no_grad():
            want = torch.sigmoid(classifier(engine_input))[0]
        top = answer["results"][0]["top"][0]
        assert top["class"] == CLASSES[int(want.argmax())]
        assert top["probability"] == pytest.approx(float(want.max()), abs=1e-5)


def test_serve_zero_shot_labels_named_per_request(clip_folder, tmp_path):
    """``--zero-shot``: each request names its labels (JSON list, form field, query); answers equal the zero-shot
    classifier of those labels; requests in one batch may name different labels; limits and bad labels are 400s."""
    import base64
    import io
    import json
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from tests.serve_helpers import noise_png, post_files, request
    from vitlab.serve import BackgroundServer, ServeSettings, create_app
    from vitlab.serve.engine import Engine
    from vitlab.zeroshot import PromptHeads, image_embedder, zero_shot_classifier

    pytest.importorskip("fastapi")
    _, folder = clip_folder
    image_text = vitlab.load_image_text(folder)
    engine = Engine(image_embedder(image_text), name="clip", source=str(folder), prompts=PromptHeads(image_text),
                    class_names=["cat", "dog"])
    app = create_app(engine, settings=ServeSettings(max_prompts=6, max_wait_ms=50))
    png = noise_png((32, 32))

    def expected(labels, templates=("a photo of a {}.",)):
        classifier = zero_shot_classifier(image_text, labels, templates)
        x = classifier.preprocessing.transform()(Image.open(io.BytesIO(png)).convert("RGB"))[None]
        with torch.no_grad():
            return torch.softmax(classifier(x), dim=1)[0]

    def check(answer, labels, templates=("a photo of a {}.",)):
        want = expected(labels, templates)
        top = answer["results"][0]["top"]
        assert [t["class"] for t in top] == [labels[i] for i in want.argsort(descending=True).tolist()]
        assert [t["probability"] for t in top] == pytest.approx(sorted(want.tolist(), reverse=True), abs=1e-5)

    with BackgroundServer(app) as running:
        url = running.url + "/v1/classify"
        card = json.loads(request(running.url + "/v1/model")[2])
        assert card["zero_shot"] == {"templates": ["a photo of a {}."]} and card["class_names"] == ["cat", "dog"]
        body = {"image": base64.b64encode(png).decode(), "labels": ["race car", "dog", "cat"],
                "template": "a drawing of the {}."}
        status, _, raw = request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        assert status == 200, raw
        check(json.loads(raw), ["race car", "dog", "cat"], ("a drawing of the {}.",))
        status, _, answer = post_files(url, [("a.png", png)], fields={"labels": "dog, race car"})
        assert status == 200, answer
        check(answer, ["dog", "race car"])
        status, _, answer = post_files(url, [("a.png", png)])  # none named: the server's default classes
        check(answer, ["cat", "dog"])
        status, _, raw = request(url + "?labels=dog,cat&top_k=1", png, {"Content-Type": "image/png"})
        top = json.loads(raw)["results"][0]["top"]
        assert status == 200 and len(top) == 1 and top[0]["class"] == ["dog", "cat"][int(expected(["dog", "cat"])
                                                                                          .argmax())]
        # concurrent requests naming different labels share the image tower's batches and get their own answers
        lists = [["cat", "dog"], ["race car", "cat"], ["dog", "race car", "cat"], ["dog"]]
        with ThreadPoolExecutor(len(lists)) as pool:
            answers = list(pool.map(lambda labels: post_files(url, [("a.png", png)],
                                                              fields={"labels": ",".join(labels)})[2], lists))
        for answer, labels in zip(answers, lists):
            check(answer, labels)
        for fields, message in (({"labels": "cat,,dog"}, "an empty entry"),
                                ({"labels": "cat,cat"}, "'cat' is given twice"),
                                ({"labels": "a,b,c,d,e,f,g"}, "7 labels x 1 templates are 7 prompts; the limit"),
                                ({"labels": "cat", "template": "a photo"}, "exactly once"),
                                ({"labels": "x" * 201}, "longer than 200 characters")):
            status, _, answer = post_files(url, [("a.png", png)], fields=fields)
            assert status == 400 and message in answer["error"], (fields, answer)
    # a server of a fixed classifier says why it cannot take labels
    with BackgroundServer(create_app(zero_shot_classifier(image_text, ["cat", "dog"]))) as running:
        status, _, answer = post_files(running.url + "/v1/classify", [("a.png", png)], fields={"labels": "cat"})
        assert status == 400 and "served with --zero-shot" in answer["error"]


@pytest.mark.slow
def test_page_sends_the_labels_typed_into_its_classes_field(clip_folder, tmp_path):
    from tests.devtools import CHROMIUM, Browser
    from tests.serve_helpers import noise_png, post_files
    from vitlab.serve import BackgroundServer, create_app
    from vitlab.serve.engine import Engine
    from vitlab.zeroshot import PromptHeads, image_embedder

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/setup.sh --dev installs it)")
    image_text = vitlab.load_image_text(clip_folder[1])
    engine = Engine(image_embedder(image_text), name="clip-page", prompts=PromptHeads(image_text),
                    class_names=["cat", "dog"])
    picture = tmp_path / "noise.png"
    picture.write_bytes(noise_png((32, 32)))
    with BackgroundServer(create_app(engine)) as server, Browser(1200, 900) as browser:
        _, _, answer = post_files(server.url + "/v1/explain", [("noise.png", picture.read_bytes())],
                                  fields={"labels": "race car, dog, cat"})
        browser.open(server.url + "/")
        browser.wait_for("document.querySelector('#card-body table') !== null")
        assert browser.evaluate("document.querySelector('#labels-form').hidden") is False
        assert browser.evaluate("document.querySelector('#labels').value") == "cat, dog"
        assert "zero-shot: named per request" in browser.evaluate("document.querySelector('#card-body').innerText")
        browser.evaluate("document.querySelector('#labels').value = 'race car, dog, cat'")
        browser.choose_files("#file", [picture])
        browser.wait_for("document.querySelector('.result.done') !== null")
        shown = browser.evaluate("Array.from(document.querySelectorAll('.result .bar-row .label'))"
                                 ".map(e => e.textContent)")
    assert shown == [t["class"] for t in answer["results"][0]["top"]] and sorted(shown) == ["cat", "dog", "race car"]


def test_catalog_names_load_their_publishers_two_tower_repo(clip_folder, tmp_path, monkeypatch, capsys):
    """``clip_b16_quickgelu.openai`` resolves to the transformers repo with both towers (openai/clip-vit-base-patch16,
    served here by a loopback Hub), so the zero-shot commands take catalog names; an image-only entry is refused."""
    from tests.hub_fixtures import LoopbackHub, offline_hub_cache
    from vitlab.cli import main
    from vitlab.errors import VitlabError

    ref, folder = clip_folder
    offline_hub_cache(tmp_path, monkeypatch)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    server = LoopbackHub({"openai/clip-vit-base-patch16": files})
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model = vitlab.load_image_text("clip_b16_quickgelu.openai")
        out = tmp_path / "pets.safetensors"
        assert main(["zero-shot", "clip_b16_quickgelu.openai", "--classes", ",".join(CLASSES), "--out", str(out)]) == 0
    finally:
        server.stop()
    images = torch.randn(2, 3, 32, 32)
    expected = _reference_logits(ref, model, images, [f"a photo of a {c}." for c in CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load(out)(images), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(VitlabError, match="no text tower for vit_b16.augreg_in21k .* with both towers: siglip_b16"):
        vitlab.load_image_text("vit_b16.augreg_in21k")


def test_suite_zero_shot_tasks_score_as_eval_zero_shot(clip_folder, tmp_path, capsys):
    """A suite task with mode = "zero-shot" scores the checkpoint's zero-shot classifier of the data's classes with
    the task's templates (no training split needed): the accuracy of vitlab eval --zero-shot on the same images;
    a rerun reuses it, and a template without {} is refused when the config is read."""
    import json

    from vitlab.cli import main

    _, folder = clip_folder
    data = _image_folder(tmp_path / "data", per_class=4)
    config = tmp_path / "suite.toml"
    config.write_text(f'name = "zs"\nmode = "zero-shot"\n\n[zero_shot]\ntemplates = ["a drawing of the {{}}.", '
                      f'"a photo of a {{}}."]\n\n[[task]]\nname = "pets"\ndata = "{data}"\n')
    out = tmp_path / "report"
    assert main(["suite", str(config), "--checkpoint", str(folder), "--out", str(out)]) == 0
    result = json.loads((out / "tasks" / "pets" / "result.json").read_text())
    assert result["mode"] == "zero-shot" and result["num_train"] == 0 and result["num_test"] == 12
    assert result["templates"] == ["a drawing of the {}.", "a photo of a {}."]
    capsys.readouterr()
    assert main(["eval", str(folder), "--zero-shot", "--data", str(data), "--json", "--template",
                 "a drawing of the {}.", "--template", "a photo of a {}."]) == 0
    assert result["accuracy"] == pytest.approx(json.loads(capsys.readouterr().out)["top1"])
    assert main(["suite", str(config), "--checkpoint", str(folder), "--out", str(out)]) == 0
    assert "done before" in capsys.readouterr().out
    config.write_text(f'mode = "zero-shot"\n[zero_shot]\ntemplates = ["a photo"]\n[[task]]\nname = "p"\n'
                      f'data = "{data}"\n')
    assert main(["suite", str(config), "--checkpoint", str(folder), "--out", str(tmp_path / "r2")]) == 2
    assert "zero_shot templates must be a list of prompts, each with {} once" in capsys.readouterr().err
