"""vitlab predict as a batch tool: batches equal one image at a time and the model on its own preprocessing, folders
are read recursively in sorted order, --data reads any source, --out writes CSV / JSONL / parquet tables and
--features writes pooled features, unreadable images get their error rows, and refusals leave no file."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main as cli_main
from vitlab.data import load_sample
from vitlab.train import predict
from vitlab.train.predict import image_files
from vitlab.train.predict_files import table_columns

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class grey 28 px ViT saved with class names, and the model as vitlab.load gives it back."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(0)
    model = vitlab.create_model("vit_fmnist", depth=1, num_classes=3, embed_dim=32, num_heads=2, mlp_dim=64)
    with torch.no_grad():  # a head that separates the classes: probabilities that are not all about 1/3
        model.head.weight.normal_(0, 1.0)
    vitlab.save(model, path, class_names=CLASSES)
    return path, vitlab.load(path).eval()


def photos(root, broken=False):
    """Small images of several sizes and modes at several depths (and a file that is not an image)."""
    rng = np.random.default_rng(0)
    (root / "b" / "deep").mkdir(parents=True)
    files = {"z.png": (20, 30, 3), "b/a.jpg": (40, 28, 3), "b/deep/c.png": (28, 28), "a.bmp": (33, 17, 3),
             "b/x.PNG": (28, 50)}
    for name, shape in files.items():
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    if broken:
        (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def manual_probs(model, path):
    """softmax(model(preprocess(image))) for one file, the way a user would write it."""
    pre = vitlab.metadata_of(model).preprocessing
    x = pre.transform()(load_sample(path, channels=pre.channels)).unsqueeze(0)
    with torch.no_grad():
        return model(x).softmax(1)[0]


def test_folders_are_read_recursively_in_sorted_order(tmp_path):
    root = photos(tmp_path / "p", broken=True)
    single = tmp_path / "single.png"
    Image.new("L", (8, 8)).save(single)
    want = [root / "a.bmp", root / "b" / "a.jpg", root / "b" / "broken.png", root / "b" / "deep" / "c.png",
            root / "b" / "x.PNG", root / "z.png"]  # per path component: b/a.jpg before b/deep/, .txt left out
    assert image_files([single, root]) == [str(single)] + [str(p) for p in want]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(vitlab.errors.VitlabError, match="empty: no image files"):
        image_files([tmp_path / "empty"])


def test_batched_predictions_equal_one_at_a_time_and_the_model_on_its_preprocessing(tiny, tmp_path):
    _, model = tiny
    files = image_files([photos(tmp_path / "p")])
    batched = predict(model, files, topk=3, batch_size=4)
    single = predict(model, files, topk=3, batch_size=1)
    workers = predict(model, files, topk=3, batch_size=2, num_workers=2)
    assert [p.source for p in batched] == files == [p.source for p in workers]
    for b, s, w, path in zip(batched, single, workers, files):
        assert [i for i, _, _ in b.top] == [i for i, _, _ in s.top] == [i for i, _, _ in w.top]
        probs = manual_probs(model, path)
        for (i, name, p), (_, _, p1), (_, _, pw) in zip(b.top, s.top, w.top):
            assert name == CLASSES[i]
            assert p == pytest.approx(p1, abs=1e-5) and p == pytest.approx(pw, abs=1e-5)
            assert p == pytest.approx(float(probs[i]), abs=1e-5)
        assert [i for i, _, _ in b.top] == probs.argsort(descending=True).tolist()
    assert max(p for b in batched for _, _, p in b.top) > 0.5  # not a flat distribution


def test_bf16_autocast_answers_float32_probabilities_close_to_fp32(tiny, tmp_path, capsys):
    path, model = tiny
    files = image_files([photos(tmp_path / "p")])
    fp32 = predict(model, files, topk=3)
    bf16 = predict(model, files, topk=3, precision="bf16")
    for a, b in zip(fp32, bf16):
        assert dict((i, p) for i, _, p in a.top) == pytest.approx(dict((i, p) for i, _, p in b.top), abs=0.03)
    assert cli_main(["predict", str(path), *files[:2], "--precision", "bf16", "--device", "cpu", "--json"]) == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == files[:2]


def _read_table(path):
    """The rows of a predictions table as dicts of Python values (CSV cells converted back)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    typed = []
    for row in rows:
        typed.append({k: (None if v == "" else int(v) if k.startswith("index_") else float(v)
                          if k.startswith("prob_") else v) for k, v in row.items()})
    return typed


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_out_tables_round_trip_with_an_error_row_for_a_broken_image(tiny, tmp_path, capsys, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path, model = tiny
    root = photos(tmp_path / "p", broken=True)
    out = tmp_path / "out" / f"preds{suffix}"
    code = cli_main(["predict", str(path), str(root), "--out", str(out), "--topk", "2", "--batch-size", "3"])
    stdout, err = capsys.readouterr()
    assert code == 1  # one image failed; the others are written
    assert err.count("error:") == 1 and "broken.png" in err
    assert f"wrote top-2 predictions for 6 images (1 unreadable) to {out}" in stdout
    rows = _read_table(out)
    assert list(rows[0]) == table_columns(2) == ["source", "index_0", "index_1", "label_0", "label_1", "prob_0",
                                                 "prob_1", "error"]
    files = image_files([root])
    assert [r["source"] for r in rows] == files
    expected = {p.source: p for p in predict(model, files, topk=2)}
    for row in rows:
        want = expected[row["source"]]
        if want.error:
            assert row["error"] == want.error and "broken.png" in row["error"]
            assert all(row[c] is None for c in table_columns(2)[1:-1])
            continue
        assert row["error"] is None
        assert [row["index_0"], row["index_1"]] == [i for i, _, _ in want.top]
        assert [row["label_0"], row["label_1"]] == [n for _, n, _ in want.top]
        assert [row["prob_0"], row["prob_1"]] == [p for _, _, p in want.top]  # exactly: repr round trips
    assert not list(out.parent.glob(".*.tmp"))


def test_data_manifest_and_shards_are_predicted_with_their_sources(tiny, tmp_path, capsys):
    path, model = tiny
    root = photos(tmp_path / "p")
    files = image_files([root])
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, file in enumerate(files):
            w.writerow([file.removeprefix(str(tmp_path) + "/"), CLASSES[i % 3], "test" if i != 1 else "train"])
    out = tmp_path / "m.jsonl"
    assert cli_main(["predict", str(path), "--data", str(manifest), "--out", str(out), "--topk", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kept = [f for i, f in enumerate(files) if i != 1]  # the test split
    assert [r["source"] for r in rows] == kept
    by_file = predict(model, kept, topk=3)
    by_data = predict(model, data=str(manifest), topk=3)  # the same from Python
    assert [p.source for p in by_data] == kept
    for row, want, same in zip(rows, by_file, by_data):
        assert [row[f"prob_{j}"] for j in range(3)] == pytest.approx([p for _, _, p in want.top], abs=1e-6)
        assert [p for _, _, p in same.top] == [row[f"prob_{j}"] for j in range(3)]
    # a manifest without labels (a list of images to predict), with its split column
    unlabelled = tmp_path / "new.csv"
    with open(unlabelled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "split"])
        for i, file in enumerate(files):
            w.writerow([file.removeprefix(str(tmp_path) + "/"), "test" if i != 1 else "train"])
    plain = predict(model, data=str(unlabelled), topk=3)
    assert [p.source for p in plain] == kept and [p.top for p in plain] == [p.top for p in by_data]
    capsys.readouterr()
    assert cli_main(["predict", str(path), "--data", str(unlabelled), "--split", "train", "--json"]) == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == [files[1]]
    # tar shards: named "shard:key", a sample without a label still predicted, a broken one an error row
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "part-0000.tar", "w") as tar:
        for key, data, label in (("k0", open(files[0], "rb").read(), b"1"), ("k1", b"not a png", b"0"),
                                 ("k2", open(files[2], "rb").read(), None)):
            for ext, payload in (("bmp" if files[0].endswith("bmp") and key == "k0" else "png", data),
                                 ("cls", label)):
                if payload is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    capsys.readouterr()
    assert cli_main(["predict", str(path), "--data", str(shards), "--json", "--topk", "1"]) == 1
    out_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tar_name = str(shards / "part-0000.tar")
    assert [r["name"] for r in out_lines] == [f"{tar_name}:k0", f"{tar_name}:k1", f"{tar_name}:k2"]
    assert out_lines[1]["error"] and out_lines[1]["top"] == []
    for r, file in ((out_lines[0], files[0]), (out_lines[2], files[2])):
        [want] = predict(model, [file], topk=1)
        assert r["top"][0]["index"] == want.top[0][0]
        assert r["top"][0]["probability"] == pytest.approx(want.top[0][2], abs=1e-6)


def test_hugging_face_rows_are_named_the_same_with_and_without_streaming(tiny, tmp_path, capsys):
    pytest.importorskip("datasets")
    from .test_data_hf import dataset_of, image_folder

    path, model = tiny
    folder = image_folder(tmp_path / "folder", per_class=2)
    parquet = tmp_path / "pq" / "images.parquet"
    parquet.parent.mkdir()
    dataset_of(folder).to_parquet(str(parquet))
    answers = {}
    for stream in ("off", "on"):
        assert cli_main(["predict", str(path), "--data", str(parquet), "--stream", stream, "--json"]) == 1
        answers[stream] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert answers["off"] == answers["on"]
    rows = answers["off"]
    assert [r["name"] for r in rows] == [f"{parquet}: row {i}" for i in range(len(rows))]
    files = [p for p, _ in vitlab.data.ImageFolderDataset(folder).samples]  # the rows' order
    for row, want in zip(rows, predict(model, files)):
        assert (row["error"] is None) == (want.error is None)
        assert [t["index"] for t in row["top"]] == [i for i, _, _ in want.top]
    assert sum(r["error"] is not None for r in rows) == 1


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".parquet"])
def test_features_are_the_pooled_pre_logits_and_leave_out_broken_images(tiny, tmp_path, capsys, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path, model = tiny
    root = photos(tmp_path / "p", broken=True)
    out = tmp_path / f"feats{suffix}"
    assert cli_main(["predict", str(path), str(root), "--features", "--out", str(out), "--batch-size", "4"]) == 1
    assert f"wrote features of 5 images (1 unreadable) to {out}" in capsys.readouterr().out
    files = [f for f in image_files([root]) if "broken" not in f]
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            feats, meta = f.get_tensor("features"), f.metadata()
        sources, errors = json.loads(meta["sources"]), json.loads(meta["errors"])
        assert meta["representation"] == "pre_logits" and meta["checkpoint"] == str(path)
    elif suffix == ".npz":
        with np.load(out, allow_pickle=False) as f:
            feats, sources = torch.from_numpy(f["features"]), f["sources"].tolist()
            errors = [{"source": s, "error": e} for s, e in zip(f["error_sources"].tolist(), f["errors"].tolist())]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        column = table.column("features").combine_chunks()  # as the docs load it: no Python floats in between
        feats = torch.from_numpy(np.array(column.flatten().to_numpy().reshape(len(column), -1)))
        sources = table.column("source").to_pylist()
        errors = json.loads(table.schema.metadata[b"errors"])
    assert sources == files
    assert [e["source"] for e in errors] == [str(root / "b" / "broken.png")] and "broken.png" in errors[0]["error"]
    assert feats.dtype == torch.float32 and feats.shape == (5, model.cfg.embed_dim)
    pre = vitlab.metadata_of(model).preprocessing
    x = torch.stack([pre.transform()(load_sample(f, channels=1)) for f in files])
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=0)


def test_refusals_are_one_line_and_leave_no_file(tiny, tmp_path, capsys):
    path, _ = tiny
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    existing = tmp_path / "old.csv"
    existing.write_text("keep me")
    cases = [
        (["--out", str(existing)], "old.csv exists; remove it or give another file name"),
        (["--out", str(tmp_path / "p.txt")], "p.txt: predictions are written as .csv, .jsonl, .parquet"),
        (["--features", "--out", str(tmp_path / "f.csv")], "f.csv: features are written as .safetensors, .npz"),
        (["--features"], "--features writes a file: give --out FILE"),
        (["--out", str(tmp_path / "j.csv"), "--json"], "--json prints"),
        (["--data", "digits"], "give image files / folders or --data SOURCE (one of the two)"),
        (["--batch-size", "0"], "--batch-size must be positive"),
    ]
    for extra, message in cases:
        assert cli_main(["predict", str(path), str(image), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv", "x.png"]


def test_features_of_a_logits_only_model_are_refused(tiny):
    """An exported model (ONNX Runtime, AOTInductor) has no forward_features: refused before any image is read."""

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.cfg = model, model.cfg

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(vitlab.errors.VitlabError, match="needs the PyTorch model"):
        predict(LogitsOnly(tiny[1]), ["no-such-file.png"], features=True)


@pytest.mark.slow  # an ONNX export and an ONNX Runtime session: about 6 s
def test_features_of_an_onnx_model_are_refused_before_writing(tiny, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from vitlab.compute.deploy import export_onnx

    path, model = tiny
    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(model, onnx_path)
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    out = tmp_path / "f.safetensors"
    assert cli_main(["predict", str(onnx_path), str(image), "--features", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs the PyTorch model" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    # its class predictions still work, and agree with the PyTorch model's
    out = tmp_path / "p.csv"
    assert cli_main(["predict", str(onnx_path), str(image), "--out", str(out)]) == 0
    [row] = _read_table(out)
    [want] = predict(model, [image], topk=3)
    assert row["prob_0"] == pytest.approx(want.top[0][2], abs=1e-5)
