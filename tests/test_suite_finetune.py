"""Suite fine-tune mode: image-folder export, class-index mapping, and a tiny end-to-end VTAB-style task through
the training package's loop."""

import json

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from tests.conftest import randomize_
from tests.test_suite import Builder, PatternDataset
from vitlab.models import VisionTransformer, ViTConfig
from vitlab.tasks.finetune import export_image_folder, score_with_class_map


def test_export_writes_pngs_by_class_index_and_skips_unreadable(tmp_path):
    data = PatternDataset(12, 4, seed=0)

    class WithBad(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return (object() if i == 5 else data.images[i]), int(data.targets[i])

    root = tmp_path / "train"
    written = export_image_folder(WithBad(), [0, 1, 5, 6, 11], root, data.targets, num_classes=12)
    assert written == 4
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    assert files == ["00/0.png", "01/1.png", "02/6.png", "03/11.png"]  # two digits: 12 classes
    with Image.open(root / "03" / "11.png") as img:
        assert img.mode == "L" and torch.equal(torch.from_numpy(__import__("numpy").array(img)), data.images[11, 0])


def test_export_links_the_files_of_an_image_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i in range(3):
        Image.new("RGB", (4, 4), (i * 50, 0, 0)).save(src / f"im{i}.jpg")
        paths.append(str(src / f"im{i}.jpg"))

    class Folder(Dataset):
        samples = [(p, k) for k, p in enumerate(paths)]

        def __len__(self):
            return 3

    export_image_folder(Folder(), [0, 2], tmp_path / "out", torch.tensor([0, 1, 2]), num_classes=3)
    linked = tmp_path / "out" / "2" / "2.jpg"
    assert linked.is_symlink() and linked.resolve() == (src / "im2.jpg").resolve()


def test_scores_map_head_outputs_to_task_classes():
    class Head(torch.nn.Module):  # trained without class 1: outputs are classes "0" and "2"
        class_names = ["0", "2"]
        cfg = type("Cfg", (), {"in_chans": 1, "img_size": (1, 1)})()

        def forward(self, x):
            v = x.flatten(1)[:, 0]
            return torch.stack([-v, v], dim=1)

    data = torch.utils.data.TensorDataset(torch.tensor([-1.0, 1.0, 1.0, -1.0]).reshape(4, 1, 1, 1),
                                          torch.tensor([0, 2, 1, 0]))
    out = score_with_class_map(Head(), data, num_classes=3)
    assert out["top1"] == 0.75  # the class-1 image cannot be right
    assert out["confusion_matrix"] == [[2, 0, 0], [0, 0, 1], [0, 0, 1]]


@pytest.mark.slow
def test_finetune_task_end_to_end_with_lr_tuning_and_resume(tmp_path):
    pytest.importorskip("vitlab.train")
    from vitlab.tasks.suite import run_suite
    from vitlab.tasks.suite_config import parse_suite_config

    cfg = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=32, depth=1, num_heads=2,
                    mlp_dim=64)
    model = randomize_(VisionTransformer(cfg), std=0.2).eval()
    config = parse_suite_config({
        "train_examples": 80, "val_examples": 20, "test_examples": 60,
        "finetune": {"steps": 6, "batch_size": 16, "lr": [0.01, 0.1]},
        "task": [{"name": "four", "data": "four", "mode": "finetune"}]})
    logs = []
    suite = run_suite(config, model, tmp_path, dataset_builder=Builder(), device="cpu", log=logs.append)
    task = suite["tasks"][0]
    assert task["param_name"] == "lr" and set(task["val_accuracy"]) == {"0.01", "0.1"}
    assert task["chosen"] == max((0.01, 0.1), key=lambda v: task["val_accuracy"][f"{v:g}"])
    assert 0.0 <= task["accuracy"] <= 1.0 and task["num_test"] == 60 and task["resolution"] == [8, 8]
    assert (tmp_path / "pretrained.safetensors").is_file()  # an in-memory model is saved once for init_from
    task_dir = tmp_path / "tasks" / "four"
    assert not (task_dir / "data").exists() and not list(task_dir.glob("runs/*/checkpoints"))
    assert json.loads((task_dir / "runs" / "final" / "config.json").read_text())["lr"] == task["chosen"]
    again = Builder()
    run_suite(config, model, tmp_path, dataset_builder=again, device="cpu", log=logs.append)
    assert again.calls == []  # finished: nothing is rebuilt or retrained
