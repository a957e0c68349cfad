"""``vitlab eval`` refuses data whose classes are not the checkpoint's, and with ``--map-classes-by-name`` scores the
shared classes with the logits taken in the data's order (checked by hand on a small image folder)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import randomize_
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.evaluate.classmap import check_classes, match_classes_by_name
from vitlab.models import VisionTransformer, ViTConfig
from vitlab.preprocessing import Preprocessing

NAMES = ["ant", "bee", "cat"]


@pytest.fixture()
def checkpoint(tmp_path):
    from vitlab import save

    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2,
                    mlp_dim=32)
    model = randomize_(VisionTransformer(cfg), std=0.5).eval()
    return str(save(model, tmp_path / "tiny.safetensors", class_names=NAMES)), model


def image_folder(root, classes, per_class=4):
    rng = np.random.default_rng(0)
    files = []
    for cls in classes:
        (root / "test" / cls).mkdir(parents=True)
        for i in range(per_class):
            path = root / "test" / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
            files.append((path, cls))
    return str(root)


@pytest.mark.parametrize("classes, message", [
    (["ant", "cat"], "predicts 3 classes but .* has 2 \\('ant', 'cat'\\): the accuracy would be meaningless; "
                     "--map-classes-by-name evaluates on the classes both name"),
    (["ant", "bee", "dog"], "name their classes differently \\(1 of 3 differ; class 2 is 'cat' in the checkpoint, "
                            "'dog' in the data\\)"),
])
def test_eval_refuses_classes_that_differ(checkpoint, tmp_path, capsys, classes, message):
    root = image_folder(tmp_path / "data", classes)
    assert main(["eval", checkpoint[0], "--data", root, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("vitlab eval: error: ")
    import re

    assert re.search(message, err), err


def test_eval_maps_shared_classes_by_name_in_the_data_order(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    root = image_folder(tmp_path / "data", ["Cat", "ant", "dog"])  # folder order: Cat, ant, dog
    assert main(["eval", ckpt, "--data", root, "--device", "cpu", "--map-classes-by-name", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["class_mapping"] == {"matched": 2, "data_classes": 3, "model_classes": 3, "unmatched": ["dog"],
                                        "ambiguous": [], "images_left_out": 4}
    assert results["class_names"] == ["Cat", "ant"] and results["samples"] == 8
    transform = Preprocessing.for_model(8, 1).transform()
    hits = 0
    for label, cls in enumerate(["Cat", "ant"]):
        for i in range(4):
            image = transform(Image.open(tmp_path / "data" / "test" / cls / f"{i}.png"))[None]
            with torch.no_grad():
                logits = model(image)[0, [2, 0]]  # the model's cat and ant outputs, in the data's order
            hits += int(logits.argmax().item() == label)
    assert results["top1"] == pytest.approx(hits / 8, abs=1e-12)
    assert main(["eval", ckpt, "--data", root, "--device", "cpu", "--map-classes-by-name"]) == 0
    assert "classes matched by name: 2 of the data's 3 (the checkpoint has 3); 4 images of other classes left " \
           "out; unmatched: dog" in capsys.readouterr().out


def test_matching_uses_synonyms_and_leaves_ambiguous_names_out():
    model_names = ["tench, Tinca tinca", "crane", "crane", "great_white shark, white shark"]
    match = match_classes_by_name(model_names, ["tench", "crane", "Great White Shark", "zebra"], "ck", "data")
    assert match.names == ["tench", "Great White Shark"] and match.model_indices == [0, 3]
    assert match.data_labels == [0, 2] and match.ambiguous == ["crane"] and match.unmatched == ["zebra"]
    with pytest.raises(VitlabError, match="carries no class names"):
        match_classes_by_name(None, ["a"], "ck", "data")
    with pytest.raises(VitlabError, match="no class of data"):
        match_classes_by_name(["a"], ["b"], "ck", "data")
    check_classes(3, None, ["x", "y", "z"], "ck", "data")  # unnamed checkpoint, same count: nothing to refuse
    check_classes(3, NAMES, None, "ck", "data")  # unnamed data: labels are checked when evaluated


def test_imagenet_checkpoints_accept_folders_named_by_wordnet_id():
    from vitlab.labels import class_names, wordnet_ids

    names, wnids = class_names("imagenet-1k"), wordnet_ids("imagenet-1k")
    check_classes(1000, names, wnids, "ck", "imagenet")  # the release's folder layout: the same classes, in order
    with pytest.raises(VitlabError, match="name their classes differently"):
        check_classes(1000, names, wnids[::-1], "ck", "imagenet")
    match = match_classes_by_name(names, ["n01443537", "tench", "unicorn"], "ck", "data")
    assert match.model_indices == [1, 0] and match.unmatched == ["unicorn"]


def test_python_evaluate_refuses_data_whose_classes_are_not_the_models():
    """``vitlab.train.evaluate`` applies the same check as ``vitlab eval``: other names, or another count."""
    import vitlab
    from vitlab.train import evaluate

    model = vitlab.create_model("vit_fmnist")
    model.class_names = [f"class {i}" for i in range(10)]  # digits names its classes "0" .. "9"
    with pytest.raises(VitlabError, match=r"the model and digits name their classes differently \(10 of 10 differ"):
        evaluate(model, "digits", device="cpu")
    five = vitlab.create_model("vit_fmnist", num_classes=5)
    with pytest.raises(VitlabError, match="the model predicts 5 classes but digits has 10"):
        evaluate(five, "digits", device="cpu")
