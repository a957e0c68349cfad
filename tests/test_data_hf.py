"""Hugging Face datasets as a data source: save_to_disk folders, parquet / arrow files and a Hub dataset in a datasets
cache used offline read the same images as the image folder they were made from (same pixels, labels, skipped files
and trained weights), a stream covers each row once per epoch over (rank, worker) slots and restarts exactly, and bad
input is one line naming the source, row or file."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main as cli_main
from vitlab.data import BadSample, HFImageDataset, HFStreamDataset, ImageFolderDataset, build_dataset
from vitlab.data.hf import parse_spec, with_options
from vitlab.data.images import ImageLoadError
from vitlab.data.loaders import Augment, FolderTrainLoader
from vitlab.errors import VitlabError
from vitlab.train import TrainConfig, train

from .test_train import tiny_config
from .train_runs import child_env, train_and_kill

datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def image_folder(root: Path, per_class: int = 6, broken: bool = True) -> Path:
    """Three classes of small PNGs, with the cases load_image guards against: 16-bit grey, RGBA and a broken file."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("ant", "bee", "cat")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
        if c == 0:
            Image.fromarray(rng.integers(0, 65536, (9, 9), dtype=np.uint16)).save(root / cls / "deep.png")
        if c == 1:
            Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8), "RGBA").save(root / cls / "alpha.png")
    if broken:
        (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def dataset_of(folder: Path, multi: bool = False):
    """A datasets.Dataset with the folder's files as an Image feature and its classes as a ClassLabel, rows in the
    folder's (sorted) order; ``multi`` adds a list-of-ClassLabel column ``tags``."""
    samples = ImageFolderDataset(folder).samples
    classes = sorted(p.name for p in folder.iterdir())
    columns = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in samples],
               "label": [y for _, y in samples], "note": [Path(p).name for p, _ in samples]}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes),
                "note": datasets.Value("string")}
    if multi:
        columns["tags"] = [sorted({y, (i % 3)}) for i, (_, y) in enumerate(samples)]
        features["tags"] = datasets.List(datasets.ClassLabel(names=["red", "green", "blue"]))
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def lay_out_hub_dataset(cache: Path, repo: str, splits: dict, config: str = "default") -> Path:
    """A Hub dataset in a datasets cache as ``load_dataset`` leaves it after a download: ``org___name/<config>/
    <version>/<commit>/`` with the arrow files and dataset_info.json, written by datasets' own parquet builder."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    staging = cache / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, ds in splits.items():
        files[split] = [str(staging / f"{split}-00000-of-00001.parquet")]
        ds.to_parquet(files[split][0])
    builder = Parquet(cache_dir=str(staging / "build"), dataset_name=repo.split("/")[-1], config_name=config,
                      data_files=files, hash=COMMIT)
    builder.download_and_prepare()
    target = cache / repo.replace("/", "___") / config / "0.0.0" / COMMIT
    target.parent.mkdir(parents=True)
    Path(builder.cache_dir).rename(target)
    return target


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_DATASETS_OFFLINE=1 with the datasets cache in a temporary folder (datasets reads both when imported, so
    the values it read are changed too)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def sources(tmp_path):
    """The same images as an image folder, a save_to_disk folder, a parquet file and an arrow file."""
    folder = image_folder(tmp_path / "folder")
    ds = dataset_of(folder)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "pq" / "images.parquet"))
    return {"folder": folder, "saved": tmp_path / "saved", "parquet": tmp_path / "pq" / "images.parquet",
            "arrow": next((tmp_path / "saved").glob("*.arrow"))}


def _rows(dataset):
    out = []
    for image, label in (dataset if isinstance(dataset, HFStreamDataset) else
                         (dataset[i] for i in range(len(dataset)))):
        bad = isinstance(image, BadSample)  # the reason up to Pillow's own words (which name the file or the bytes)
        out.append((image.reason.split(": ")[-1].split(" (")[0] if bad else np.asarray(image).tobytes(), label))
    return out


def test_saved_parquet_and_arrow_read_the_folders_pixels_labels_and_bad_files(sources):
    folder = build_dataset(sources["folder"])
    want = _rows(folder)
    assert sum(isinstance(x, str) for x, _ in want) == 1  # the broken file
    for key in ("saved", "parquet", "arrow", str(sources["parquet"].parent), str(sources["parquet"].parent) + "/*"):
        ds = build_dataset(sources.get(key, key))
        assert isinstance(ds, HFImageDataset), key
        assert ds.class_names == folder.class_names and not ds.multi_label and len(ds) == len(folder)
        assert _rows(ds) == want, key
    bad = next(i for i, (x, _) in enumerate(want) if isinstance(x, str))
    assert "row" in build_dataset(sources["saved"])[bad][0].reason  # the row is named
    with pytest.raises(ImageLoadError, match=rf"saved: row {bad}: cannot decode image"):
        build_dataset(sources["saved"], on_error="fail")[bad]
    streamed = build_dataset(f"{sources['parquet']}?stream=on")
    assert isinstance(streamed, HFStreamDataset) and len(streamed) == len(folder)
    assert _rows(streamed) == want  # in order outside training
    # the arrow IPC file format (Feather v2) as well as the stream format datasets writes
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(str(sources["parquet"]))
    with pa.ipc.new_file(str(sources["parquet"].parent / "images.arrow"), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=5):
            writer.write_batch(batch)
    for stream in ("off", "on"):
        ds = build_dataset(f"{sources['parquet'].parent / 'images.arrow'}?stream={stream}")
        assert _rows(ds) == want, stream


def test_labels_from_class_labels_integers_strings_and_lists(tmp_path):
    folder = image_folder(tmp_path / "folder", per_class=2, broken=False)
    ds = dataset_of(folder, multi=True)
    ds.save_to_disk(str(tmp_path / "multi"))
    multi = build_dataset(f"{tmp_path / 'multi'}?label=tags")
    assert multi.multi_label and multi.class_names == ["red", "green", "blue"]
    for i in range(len(multi)):
        want = torch.zeros(3)
        want[ds[i]["tags"]] = 1.0
        target = multi[i][1]
        assert target.dtype == torch.float32 and target.shape == (3,) and torch.equal(target, want)
    stream = build_dataset(f"{tmp_path / 'multi'}?label=tags&stream=on")
    assert stream.multi_label and sorted(t.tolist() for _, t in stream) == sorted(multi[i][1].tolist()
                                                                                   for i in range(len(multi)))
    # plain integers: classes 0..max; strings: sorted names, as an image folder sorts its class folders
    plain = ds.cast_column("label", datasets.Value("int64")).map(lambda r: {"word": ["zz", "aa", "mm"][r["label"]]})
    plain.to_parquet(str(tmp_path / "plain.parquet"))
    ints = build_dataset(tmp_path / "plain.parquet", image_column=None, label_column="label")
    assert ints.class_names == ["0", "1", "2"] and [ints[i][1] for i in range(len(ints))] == ds["label"]
    words = build_dataset(f"{tmp_path / 'plain.parquet'}?label=word")
    assert words.class_names == ["aa", "mm", "zz"]
    assert [words.class_names[words[i][1]] for i in range(len(words))] == plain["word"]


def test_a_stream_covers_every_row_once_over_rank_slots_and_restarts_exactly(tmp_path):
    folder = image_folder(tmp_path / "folder", per_class=7, broken=False)
    ds = dataset_of(folder)
    ds.to_parquet(str(tmp_path / "small-groups.parquet"), batch_size=3)  # 8 row groups of 3 (the last of 2)
    ds.to_parquet(str(tmp_path / "one-group.parquet"))
    import pyarrow.parquet as pq

    assert pq.ParquetFile(str(tmp_path / "small-groups.parquet")).metadata.num_row_groups == 8
    for name in ("small-groups", "one-group"):
        for shuffle in (0, 5):
            seen = []
            for rank in range(3):
                part = build_dataset(f"{tmp_path / name}.parquet?stream=on")
                part.rank, part.world_size, part.shuffle_buffer = rank, 3, shuffle
                part.sample_seed = lambda row: row  # as the training loader does: shuffle
                seen += [np.asarray(x).tobytes() for x, _ in part]
            want = [np.asarray(x).tobytes() for x, _ in _iter_map(build_dataset(tmp_path / f"{name}.parquet"))]
            assert sorted(seen) == sorted(want), (name, shuffle)  # each row once, in some order
    stream = build_dataset(f"{tmp_path / 'small-groups.parquet'}?stream=on")
    loader = FolderTrainLoader(stream, 4, (8, 8), Augment(policy="inception", crop_scale=(0.3, 1.0)), seed=3)
    stream.shuffle_buffer = 6
    whole = list(loader.epoch(2))
    again = list(loader.epoch(2))
    tail = list(loader.epoch(2, start=2))
    assert len(whole) == 5 and len(tail) == 3
    for a, b in zip(whole, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    for a, b in zip(whole[2:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = list(loader.epoch(3))
    assert not all(torch.equal(a.labels, b.labels) for a, b in zip(whole, other))  # a new order each epoch


def _iter_map(ds):
    return (ds[i] for i in range(len(ds)))


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path)


def _train_config(tmp_path, data, name, **changes):
    values = dict(data=str(data), val_data=str(data), eval_split="train", run_name=name, epochs=None, steps=4,
                  batch_size=6, augment="inception", crop_scale=(0.3, 1.0), num_workers=0, eval_every_epochs=0,
                  deterministic=True)
    return tiny_config(tmp_path, **{**values, **changes})


def test_training_on_the_folder_a_saved_dataset_and_parquet_gives_the_same_weights(tmp_path, sources):
    results = {key: train(_train_config(tmp_path, sources[key], key)) for key in ("folder", "saved", "parquet")}
    reference = _weights(results["folder"].model_path)
    for key in ("saved", "parquet"):
        other = _weights(results[key].model_path)
        assert all(torch.equal(reference[k], other[k]) for k in reference), key
        assert results[key].metrics == results["folder"].metrics
        assert results[key].skipped_files == results["folder"].skipped_files
    assert results["parquet"].metrics["skipped"] == 1 and results["parquet"].skipped_files > 0  # the broken file


def test_a_hub_dataset_in_the_datasets_cache_trains_offline(tmp_path, offline_cache, capsys):
    folder = image_folder(tmp_path / "folder", per_class=4)
    ds = dataset_of(folder)
    lay_out_hub_dataset(offline_cache, "someone/tiny-pets", {"train": ds, "validation": ds.select(range(6))})
    train_set = build_dataset("hf:someone/tiny-pets")
    assert isinstance(train_set, HFImageDataset) and len(train_set) == len(ds)
    assert str(train_set.files[0]).startswith(str(offline_cache))  # read in the cache, not copied
    test_set = build_dataset("hf:someone/tiny-pets", "test")  # test -> the validation split
    assert len(test_set) == 6 and "validation" in test_set.name
    assert len(build_dataset(f"hf:someone/tiny-pets:default@{COMMIT}#validation")) == 6
    streamed = build_dataset("hf:someone/tiny-pets?stream=on")
    assert isinstance(streamed, HFStreamDataset) and _rows(streamed) == _rows(train_set)
    result = train(_train_config(tmp_path, "hf:someone/tiny-pets", "hub").replace(
        val_data=None, eval_split="test", eval_every_epochs=1))
    assert result.metrics["samples"] == 6 and result.steps == 4
    with pytest.raises(VitlabError, match=r"^hf:someone/tiny-pets:other: Couldn't find cache .*'other'"):
        build_dataset("hf:someone/tiny-pets:other")
    with pytest.raises(VitlabError, match=r"^hf:someone/tiny-pets: no split 'dev' \(splits: train, validation\)"):
        build_dataset("hf:someone/tiny-pets#dev")
    with pytest.raises(VitlabError, match=r"^hf:nobody/missing: "):
        build_dataset("hf:nobody/missing")


def test_bad_sources_are_one_line_naming_the_source_and_what_is_wrong(tmp_path, monkeypatch, capsys):
    folder = image_folder(tmp_path / "folder", per_class=2, broken=False)
    ds = dataset_of(folder)
    ds.remove_columns("image").save_to_disk(str(tmp_path / "no-image"))
    with pytest.raises(VitlabError, match=r"no-image: no image column \(an Image feature\) among label"):
        build_dataset(tmp_path / "no-image")
    ds.map(lambda r: {"score": 0.5}).to_parquet(str(tmp_path / "float.parquet"))
    with pytest.raises(VitlabError, match=r"float.parquet: label column 'score' is Value\('float64'\), not class"):
        build_dataset(f"{tmp_path / 'float.parquet'}?label=score")
    empty = ds.remove_columns("label").add_column("label", [None] * len(ds)).cast_column(
        "label", datasets.Value("int64"))
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(VitlabError, match=r"empty.parquet: label column 'label' is empty"):
        build_dataset(tmp_path / "empty.parquet")
    with pytest.raises(VitlabError, match=r"label column 'nope'|no column 'nope'"):
        build_dataset(f"{tmp_path / 'empty.parquet'}?label=nope")
    unlabelled = ds.cast_column("label", datasets.Value("int64")).map(
        lambda r, i: {"label": -1 if i == 2 else r["label"]}, with_indices=True).cast_column(
        "label", ds.features["label"])
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    bad = build_dataset(tmp_path / "unlabelled")[2][0]
    assert isinstance(bad, BadSample) and bad.reason.endswith("unlabelled: row 2: no label (-1)")
    with pytest.raises(VitlabError, match=r"unlabelled: row 2: no label \(-1\)"):
        build_dataset(tmp_path / "unlabelled", on_error="fail")[2]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "train-0.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(VitlabError, match=r"junk/train-0.parquet: unreadable parquet file"):
        build_dataset(tmp_path / "junk")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(VitlabError, match=r"dict: no test/val split \(splits: train\)"):
        build_dataset(tmp_path / "dict", "test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # the extra not installed
    with pytest.raises(VitlabError, match=r"pip install 'vitlab\[hf\]'"):
        build_dataset(tmp_path / "dict")
    monkeypatch.undo()
    capsys.readouterr()  # datasets' progress bars so far
    assert cli_main(["train", "--data", str(tmp_path / "junk"), "--steps", "1", "--out-dir", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-0.parquet: unreadable parquet file" in err[0], err
    assert cli_main(["train", "--data", "digits", "--label-column", "x", "--dry-run"]) != 0
    assert "--label-column: only for Hugging Face sources" in capsys.readouterr().err


def test_source_strings_and_the_command_line_options():
    spec = parse_spec("hf:org/name:cfg@v1.0#validation?image=img&label=tags&stream=on")
    assert (spec.hub, spec.target, spec.config, spec.revision, spec.split) == (True, "org/name", "cfg", "v1.0",
                                                                                 "validation")
    assert spec.options == {"image": "img", "label": "tags", "stream": "on"}
    assert parse_spec("data/*.parquet").target == "data/*.parquet"
    assert with_options("hf:org/name#test", label_column="tags") == "hf:org/name#test?label=tags"
    assert with_options("digits", label_column="tags") == "digits"
    with pytest.raises(VitlabError, match="stream must be one of"):
        parse_spec("hf:org/name?stream=maybe")


def test_eval_and_fewshot_on_a_saved_dataset(tmp_path, sources, capsys):
    result = train(_train_config(tmp_path, sources["saved"], "m"))
    assert cli_main(["eval", str(result.model_path), "--data", str(sources["saved"]), "--image-column", "image",
                     "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["samples"] == len(build_dataset(sources["saved"])) - 1 and metrics["skipped"] == 1
    assert metrics["top1"] == result.metrics["top1"]
    # the data layer names its argument (image_column), eval its flag
    raw = datasets.load_from_disk(str(sources["saved"])).cast_column("image", datasets.Image(decode=False))
    two = raw.add_column("photo", raw["image"]).cast_column("photo", datasets.Image())
    two.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "two"))
    assert cli_main(["eval", str(result.model_path), "--data", str(tmp_path / "two")]) == 2
    assert capsys.readouterr().err.endswith("several image columns (image, photo); choose one with --image-column\n")
    assert cli_main(["eval", str(result.model_path), "--data", str(sources["parquet"]), "--stream", "on",
                     "--workers", "2", "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert (streamed["samples"], streamed["top1"]) == (metrics["samples"], metrics["top1"])  # each image once
    # few-shot: the shots from the train split, scored on the test split of a saved DatasetDict
    data = datasets.load_from_disk(str(sources["saved"]))
    data = data.select([i for i, n in enumerate(data["note"]) if n != "broken.png"])  # few-shot stops on it
    datasets.DatasetDict({"train": data, "test": data.select(range(0, len(data), 2))}).save_to_disk(
        str(tmp_path / "dict"))
    assert cli_main(["fewshot", str(result.model_path), "--data", str(tmp_path / "dict"), "--out",
                     str(tmp_path / "fewshot"), "--shots", "1", "--seeds", "0", "--methods", "lsr",
                     "--holdout-per-class", "1"]) == 0
    report = json.loads((tmp_path / "fewshot" / "results.json").read_text())
    assert report["num_test"] == (len(data) + 1) // 2


@pytest.mark.slow
def test_two_processes_train_the_same_weights_on_the_folder_a_saved_dataset_and_parquet(tmp_path, sources):
    runs = {}
    for key in ("folder", "saved", "parquet"):
        cfg = _train_config(tmp_path, sources[key], key, optimizer="sgd", lr=0.05)
        config_file = tmp_path / f"{key}.json"
        config_file.write_text(cfg.to_json())
        done = subprocess.run([sys.executable, "-m", "vitlab", "train", "--config", str(config_file), "--nproc", "2"],
                              env=child_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[key] = _weights(tmp_path / "runs" / key / "model.safetensors")
    for key in ("saved", "parquet"):
        assert all(torch.equal(runs["folder"][k], runs[key][k]) for k in runs["folder"]), key


@pytest.mark.slow
def test_sigkill_and_resume_on_a_streamed_dataset_ends_with_the_uninterrupted_weights(tmp_path):
    folder = image_folder(tmp_path / "folder", per_class=30, broken=True)
    dataset_of(folder).to_parquet(str(tmp_path / "data.parquet"), batch_size=16)
    data = f"{tmp_path / 'data.parquet'}?stream=on"
    cfg = _train_config(tmp_path, data, "killed", steps=None, epochs=8, batch_size=8, save_every_steps=5,
                        save_every_epochs=0, num_workers=2, model_args={**tiny_config(tmp_path).model_args,
                                                                        "dropout": 0.1})
    steps_per_epoch = len(build_dataset(data)) // 8
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    killed_at = train_and_kill(config_file, tmp_path / "runs" / "killed",
                               lambda step: step >= steps_per_epoch + 2 and step % steps_per_epoch, timeout=240)
    assert killed_at is not None, "the run ended before it could be killed"
    reference = train(cfg.replace(run_name="reference"))
    # the killed run's DataLoader workers notice their parent is gone within seconds and release the run's lock
    for _ in range(60):
        try:
            resumed = train(TrainConfig(threads=1), resume=tmp_path / "runs" / "killed")
            break
        except VitlabError as exc:
            if "in use by" not in str(exc):
                raise
            time.sleep(0.5)
    assert resumed.steps == reference.steps == 8 * steps_per_epoch
    a, b = _weights(resumed.model_path), _weights(reference.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == reference.metrics
