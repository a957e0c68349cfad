"""CSV / JSONL manifests: parsing rules, one-line errors naming the manifest line, the same loaders as image folders
(a folder and a manifest listing the same files in the same order train to bit-identical weights), and training."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.data import ImageFolderDataset, ManifestDataset, build_dataset
from vitlab.errors import VitlabError
from vitlab.train import TrainConfig, train

TINY_MODEL = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}


def image_folder(root, classes=("ant", "bee", "cat"), per_class=4, size=8):
    """root/<class>/<i>.png: tiny RGB images whose colour depends on the class."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3)) + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def tiny_run(tmp_path, data, **changes) -> TrainConfig:
    base = dict(data=str(data), model="vit_fmnist", img_size=8, model_args=dict(TINY_MODEL), steps=3, batch_size=4,
                lr=1e-3, augment="none", out_dir=str(tmp_path / "runs"), threads=1, num_workers=0, progress=False,
                eval_every_epochs=0, seed=3, warmup_steps=0, deterministic=True)
    base.update(changes)
    return TrainConfig().replace(**base)


def test_csv_and_jsonl_rows_paths_and_classes(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    rows = [(f"imgs/{c}/{i}.png", c) for c in ("cat", "ant") for i in range(2)]
    csv_ds = build_dataset(write_csv(tmp_path / "m.csv", ["Path", "Label"], rows))
    assert isinstance(csv_ds, ManifestDataset) and isinstance(csv_ds, ImageFolderDataset)
    assert csv_ds.class_names == ["ant", "cat"] and not csv_ds.multi_label and len(csv_ds) == 4
    assert csv_ds.samples[0] == (str(folder / "cat" / "0.png"), 1)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": p, "label": c}) for p, c in rows) + "\n\n")
    assert build_dataset(jsonl).samples == csv_ds.samples
    image, label = csv_ds[0]
    assert isinstance(image, Image.Image) and label == 1
    # numeric labels sort as numbers; a given class list (file, or classes.txt beside the manifest) fixes the order
    numeric = build_dataset(write_csv(tmp_path / "n.csv", ["path", "label"],
                                      [(p, n) for (p, _), n in zip(rows, (10, 2, 9, 2))]))
    assert numeric.class_names == ["2", "9", "10"]
    (tmp_path / "list.txt").write_text("cat\nbee\nant\n")
    assert build_dataset(tmp_path / "m.csv", classes=str(tmp_path / "list.txt")).class_names == ["cat", "bee", "ant"]
    (tmp_path / "classes.txt").write_text("zebra\ncat\nant\n")
    assert build_dataset(tmp_path / "m.csv").class_names == ["zebra", "cat", "ant"]
    # other sources name their own classes: a class list given to one is refused, not ignored
    with pytest.raises(VitlabError, match="is the class list of a .csv / .jsonl manifest; .* names its own classes"):
        build_dataset(folder, classes=str(tmp_path / "list.txt"))


def test_split_column_selects_rows(tmp_path):
    image_folder(tmp_path / "imgs")
    rows = [("imgs/ant/0.png", "ant", "train"), ("imgs/bee/0.png", "bee", "train"), ("imgs/ant/1.png", "ant", "val")]
    path = write_csv(tmp_path / "m.csv", ["path", "label", "split"], rows)
    assert len(build_dataset(path, "train")) == 2
    test = build_dataset(path, "test")  # test takes val rows, as image-folder trees do
    assert len(test) == 1 and test.class_names == ["ant", "bee"]  # classes from every row: the splits agree
    with pytest.raises(VitlabError, match=r"m.csv: no rows of split extra"):
        build_dataset(path, "extra")


@pytest.mark.parametrize("header, rows, message", [
    (["path", "label"], [], r"m.csv: the manifest is empty"),
    (["file_name", "label"], [("a.png", "x")], r"m.csv: no path column \(columns: file_name, label\)"),
    (["path", "class"], [("a.png", "x")], r"m.csv: no label column"),
    (["path", "label"], [("a.png", "x"), ("b.png", "")], r"m.csv line 3: empty label"),
    (["path", "label"], [("a.png", "x|y")], r"m.csv line 2: label 'x\|y' holds the separator"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, header, rows, message):
    with pytest.raises(VitlabError, match=message) as err:
        build_dataset(write_csv(tmp_path / "m.csv", header, rows))
    assert "\n" not in str(err.value)


def test_label_outside_the_class_list_and_bad_json_name_the_line(tmp_path):
    (tmp_path / "classes.txt").write_text("ant\nbee\n")
    with pytest.raises(VitlabError, match=r"m.csv line 3: label 'wasp' is not in the class list .*classes.txt"):
        build_dataset(write_csv(tmp_path / "m.csv", ["path", "label"], [("a.png", "ant"), ("b.png", "wasp")]))
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"path": "a.png", "label": "ant"}\n{"path": "b.png", "label": \n')
    with pytest.raises(VitlabError, match=r"m.jsonl line 2: not valid JSON"):
        build_dataset(bad)


def test_missing_and_broken_files_are_skipped_or_fail_naming_the_line(tmp_path):
    image_folder(tmp_path / "imgs", per_class=1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = write_csv(tmp_path / "m.csv", ["path", "label"],
                     [("imgs/ant/0.png", "ant"), ("gone.png", "bee"), ("broken.png", "cat")])
    ds = build_dataset(path)
    assert str(ds[1][0].reason).endswith("m.csv line 3: gone.png: no such file")
    assert "m.csv line 4: broken.png: cannot decode image" in ds[2][0].reason
    with pytest.raises(VitlabError, match=r"m.csv line 3: gone.png: no such file"):
        build_dataset(path, on_error="fail")[1]


def test_folder_and_manifest_train_to_identical_weights(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    reference = ImageFolderDataset(folder)
    rows = [(str(p), reference.classes[k]) for p, k in reference.samples]  # the folder's order
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], rows)
    common = dict(augment="crop", crop_scale=(0.5, 1.0))
    a = train(tiny_run(tmp_path, folder, run_name="folder", **common))
    b = train(tiny_run(tmp_path, manifest, run_name="csv", **common))
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert vitlab.load(a.model_path).class_names == vitlab.load(b.model_path).class_names == ["ant", "bee", "cat"]


def test_train_on_jsonl_with_a_split_column_evaluates_on_its_rows(tmp_path):
    image_folder(tmp_path / "imgs")
    lines = [{"path": f"imgs/{c}/{i}.png", "label": c, "split": "train" if i < 3 else "test"}
             for c in ("ant", "bee", "cat") for i in range(4)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = train(tiny_run(tmp_path, path, batch_size=3))
    assert result.metrics["samples"] == 3 and 0.0 <= result.metrics["top1"] <= 1.0


def test_multi_label_manifest_with_workers_and_a_resume_ends_bit_identical(tmp_path, monkeypatch):
    import vitlab.train.loop as loop

    folder = image_folder(tmp_path / "imgs")
    rows = [(str(p.relative_to(tmp_path)), "|".join(sorted({p.parent.name, "any" if i % 2 else "odd"})))
            for i, p in enumerate(sorted(folder.rglob("*.png")))]
    manifest = write_csv(tmp_path / "tags.csv", ["path", "labels"], rows)
    saved = {}
    original = loop.save_run_state

    def keep_step_two(run, name, step, *args, **kwargs):  # the state an interrupted run would resume from
        original(run, name, step, *args, **kwargs)
        if step == 2 and name == "last.pt":
            saved["state"] = (run.run_dir / "checkpoints" / name).read_bytes()

    monkeypatch.setattr(loop, "save_run_state", keep_step_two)
    config = tiny_run(tmp_path, manifest, run_name="whole", augment="crop", crop_scale=(0.5, 1.0), steps=4,
                      mixup=0.4, save_every_steps=2, num_workers=2)
    whole = train(config)
    monkeypatch.setattr(loop, "save_run_state", original)
    shutil.copytree(whole.run_dir, tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "last.pt").write_bytes(saved["state"])
    (tmp_path / "resumed" / "result.json").unlink()
    resumed = train(TrainConfig(threads=1, num_workers=0), resume=tmp_path / "resumed")
    assert resumed.steps == 4
    for (name, x), (_, y) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert vitlab.load(whole.model_path).class_names == ["ant", "any", "bee", "cat", "odd"]
