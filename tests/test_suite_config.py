"""Suite config parsing: TOML and JSON, defaults, per-task overrides, clear errors."""

import json

import pytest

from vitlab.errors import VitlabError
from vitlab.tasks.suite_config import load_suite_config, parse_suite_config

TOML = """
name = "mini"
mode = "finetune"
test_examples = 500
groups = true

[finetune]
steps = 100
lr = 0.03

[fewshot]
method = "knn"

[[task]]
name = "fmnist"
data = "fashion-mnist"
group = "natural"

[[task]]
name = "digits"
data = "digits"
group = "structured"
mode = "fewshot"
train_examples = 500
val_examples = 100
fewshot = { representation = "cls_token" }
finetune = { steps = 7 }
"""


def test_toml_with_defaults_and_overrides(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text(TOML)
    cfg = load_suite_config(path)
    a, b = cfg.tasks
    assert cfg.name == "mini" and cfg.groups and cfg.seed == 0
    assert (a.mode, a.train_examples, a.val_examples, a.test_examples) == ("finetune", 1000, 200, 500)
    assert a.finetune == {"steps": 100, "lr": [0.03], "batch_size": 512, "resolution": None, "warmup_steps": None}
    assert (b.mode, b.train_examples, b.val_examples) == ("fewshot", 500, 100)
    assert b.fewshot["method"] == "knn" and b.fewshot["representation"] == "cls_token"
    assert b.finetune["steps"] == 7 and a.group == "natural"


def test_json_and_image_folder_relative_to_the_config(tmp_path):
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"tasks": [{"name": "mine", "data": "imgs"}], "checkpoint": "m.safetensors"}))
    cfg = load_suite_config(path)
    assert cfg.tasks[0].data == str(tmp_path / "imgs") and cfg.tasks[0].mode == "fewshot"
    assert cfg.checkpoint == str(tmp_path / "m.safetensors")


@pytest.mark.parametrize("data,message", [
    ({}, "no tasks"),
    ({"task": [{"name": "a"}]}, "'data' .* is required"),
    ({"task": [{"name": "a", "data": "x"}, {"name": "a", "data": "y"}]}, "used twice"),
    ({"task": [{"name": "a", "data": "x", "mode": "zeroshot"}]}, "mode must be one of"),
    ({"task": [{"name": "a", "data": "x", "val_examples": 1000}]}, "must be smaller than train_examples"),
    ({"task": [{"name": "a", "data": "x"}], "finetune": {"stepz": 3}}, "unknown keys stepz"),
    ({"task": [{"name": "a", "data": "x"}], "finetune": {"lr": -1}}, "lr must be a positive number"),
    ({"task": [{"name": "a", "data": "x"}], "fewshot": {"method": "svm"}}, "method must be one of"),
    ({"task": [{"name": "a", "data": "x"}], "groups": True}, "have no group"),
    ({"task": [{"name": "../a", "data": "x"}]}, "no '/'"),
    ({"tsks": []}, "unknown keys tsks"),
])
def test_bad_configs_are_one_line_errors(data, message):
    with pytest.raises(VitlabError, match=message):
        parse_suite_config(data)


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = [")
    with pytest.raises(VitlabError, match="bad.toml: not valid TOML"):
        load_suite_config(path)


def test_a_binary_file_as_config_names_the_file(tmp_path):
    """An image (or a checkpoint) given as the config was a UnicodeDecodeError traceback."""
    path = tmp_path / "model.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(VitlabError, match="model.png: not a text file"):
        load_suite_config(path)
