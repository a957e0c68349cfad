"""Image-text retrieval: recall@K / ranks against a brute-force numpy computation (ties and duplicates included),
captioned manifests and Hugging Face sources, ``vitlab eval --retrieval`` against transformers' CLIP embeddings, and
joint-space embeddings written by ``vitlab predict`` (images and texts) against transformers' ``image_embeds`` /
``text_embeds``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.evaluate.retrieval import retrieval_metrics


def _brute_force(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, ks) -> dict:
    """The whole similarity matrix in float64, every row sorted (stable: ties in index order), the first correct
    item's position in the sorted row."""
    scores = images.astype(np.float64) @ texts.astype(np.float64).T  # (N, M)

    def ranks(matrix, correct):
        out = []
        for row, good in zip(matrix, correct):
            order = np.argsort(-row, kind="stable")
            out.append(int(np.flatnonzero(good[order])[0]))
        return np.array(out)

    i2t = ranks(scores, owner[None, :] == np.arange(len(images))[:, None])
    t2i = ranks(scores.T, np.arange(len(images))[None, :] == owner[:, None])

    def summary(r):
        return {**{f"recall@{k}": float((r < k).mean()) for k in ks}, "mean_rank": float(r.mean() + 1),
                "median_rank": float(np.median(r) + 1)}

    return {"image_to_text": summary(i2t), "text_to_image": summary(t2i)}


def _quantised(rng, n, dim=6):
    """Vectors of multiples of 1/4 in [-1, 1]: their dot products are exact in float32 and float64, so ties are
    ties whatever order a product sums in."""
    return rng.integers(-4, 5, (n, dim)).astype(np.float32) / 4


@pytest.mark.parametrize("block", [1, 7, 1 << 20], ids=["row", "blocks", "whole"])
def test_recalls_and_ranks_equal_brute_force_with_ties_and_duplicates(block):
    rng = np.random.default_rng(0)
    images = _quantised(rng, 12)
    images[5] = images[2]  # a duplicate image
    owner = np.concatenate([np.arange(12), rng.integers(0, 12, 25)])  # every image captioned, some several times
    texts = _quantised(rng, len(owner))
    texts[7] = texts[3]  # duplicate captions of different images
    texts[30] = texts[3]
    texts[10] = images[owner[10]]  # a caption equal to its image
    ks = (1, 2, 5, 10)
    got = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), owner, ks, block_elements=block)
    want = _brute_force(images, texts, owner, ks)
    assert got["images"] == 12 and got["texts"] == 37
    for direction in ("image_to_text", "text_to_image"):
        assert got[direction] == pytest.approx(want[direction], abs=1e-12), direction
    # there were ties to break (else the test would prove little about them)
    scores = images @ texts.T
    assert any(len(set(row)) < len(row) for row in scores)


def test_counts_summed_as_integers_past_the_float_limit(monkeypatch):
    import vitlab.evaluate.retrieval as retrieval

    rng = np.random.default_rng(1)
    images, texts = _quantised(rng, 6), _quantised(rng, 15)
    owner = np.concatenate([np.arange(6), rng.integers(0, 6, 9)])
    want = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), owner, block_elements=20)
    monkeypatch.setattr(retrieval, "FLOAT_COUNT_LIMIT", 0)
    assert retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), owner, block_elements=20) == want


def test_ties_rank_the_lower_index_first():
    # every score equal: each query's rank is the index of its first correct item
    images, texts = torch.ones(3, 4), torch.ones(5, 4)
    owner = [2, 0, 1, 2, 1]
    got = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # image 0's caption is text 1 (rank 2), image 1's first is text 2 (rank 3), image 2's text 0 (rank 1)
    assert got["image_to_text"] == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3),
                                    "mean_rank": 2.0, "median_rank": 2.0}
    # each text's rank is its image's index + 1
    assert got["text_to_image"]["mean_rank"] == pytest.approx((3 + 1 + 2 + 3 + 2) / 5)


def test_bad_inputs_are_refused_in_one_line():
    with pytest.raises(VitlabError, match="image 1 has no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 2, 2])
    with pytest.raises(VitlabError, match="image indices must be in 0..2"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 3])
    with pytest.raises(VitlabError, match="one width P"):
        retrieval_metrics(torch.eye(3), torch.ones(3, 2), [0, 1, 2])
    with pytest.raises(VitlabError, match="positive K"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 2], ks=(0,))


# ----------------------------------------------------------------------------------------------- captioned data
CAPTIONS = ["a photo of a cat .", "a small cat", "a dog", "a photo of the large dog .", "a race car", "a blurry car",
            "a drawing of a car", "the small dog", "a large cat", "a photo of a race car ."]


def _png_images(folder, count=5, size=32, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _captions_csv(root, rows, name="captions.csv", header=("image", "caption")):
    import csv

    path = root / name
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(rows)
    return path


# image i has captions CAPTIONS[j] for j with OWNER[j] == i (two each), rows not grouped by image
OWNER = [0, 1, 2, 0, 3, 4, 1, 2, 3, 4]


def test_manifest_rows_become_distinct_images_with_several_captions(tmp_path):
    from vitlab.data.captions import build_captioned, read_texts

    _png_images(tmp_path / "images")
    rows = [[f"images/img{i}.png", c] for i, c in zip(OWNER, CAPTIONS)]
    data = build_captioned(_captions_csv(tmp_path, rows))
    assert [p.rsplit("/", 1)[1] for p in data.images] == [f"img{i}.png" for i in range(5)]
    assert data.texts == CAPTIONS and data.text_image.tolist() == OWNER
    image, index = data[3]
    assert index == 3 and image.size == (32, 32)
    import pickle  # DataLoader workers started by spawn receive the data set pickled

    assert pickle.loads(pickle.dumps(data))[3][0].tobytes() == image.tobytes()
    # JSONL: a list of captions in one cell, and a split column
    lines = [{"path": "images/img0.png", "captions": ["one", "two"], "split": "test"},
             {"path": "images/img1.png", "captions": "three", "split": "train"},
             {"path": "images/img2.png", "captions": ["four"], "split": "test"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines))
    data = build_captioned(jsonl, ("test",))
    assert data.texts == ["one", "two", "four"] and data.text_image.tolist() == [0, 0, 1] and len(data) == 2
    assert read_texts(jsonl, ("train",)) == ["three"]
    # errors name the file, the line or the column
    with pytest.raises(VitlabError, match=r"c2.csv: no text column \(columns: image, label\); name the captions"):
        build_captioned(_captions_csv(tmp_path, rows, "c2.csv", ("image", "label")))
    with pytest.raises(VitlabError, match=r"c3.csv line 3: empty caption"):
        build_captioned(_captions_csv(tmp_path, [["images/img0.png", "x"], ["images/img1.png", " "]], "c3.csv"))
    with pytest.raises(VitlabError, match="no text column 'words'"):
        build_captioned(_captions_csv(tmp_path, rows, "c4.csv"), text_column="words")
    with pytest.raises(VitlabError, match="captioned images are a .csv / .jsonl manifest with a text column"):
        build_captioned(tmp_path / "images")
    # a missing image is a bad sample naming the manifest line
    data = build_captioned(_captions_csv(tmp_path, [["images/gone.png", "x"]], "c5.csv"))
    assert "c5.csv line 2: images/gone.png" in data[0][0].reason


def test_hugging_face_parquet_with_a_list_of_captions(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitlab.data.captions import build_captioned

    paths = _png_images(tmp_path / "images", 3)
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": None} for p in paths],
                      "sentences": [["a cat", "the cat"], ["a dog"], ["a car", "two", "three"]]})
    pq.write_table(table, tmp_path / "test.parquet")
    data = build_captioned(str(tmp_path / "test.parquet"))
    assert data.texts == ["a cat", "the cat", "a dog", "a car", "two", "three"]
    assert data.text_image.tolist() == [0, 0, 1, 2, 2, 2] and data[1][0].size == (32, 32)
    import pickle

    assert pickle.loads(pickle.dumps(data))[1][0].tobytes() == data[1][0].tobytes()
    # the default text column is the first of caption, captions, text, texts, sentences present
    pq.write_table(table.append_column("text", pa.array(["x", "y", "z"])), tmp_path / "two.parquet")
    assert build_captioned(str(tmp_path / "two.parquet")).texts == ["x", "y", "z"]
    with pytest.raises(VitlabError, match="no text column 'caption'"):
        build_captioned(str(tmp_path / "test.parquet") + "?text=caption")


# ------------------------------------------------------------------------------------- against transformers' CLIP
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from .image_text_fixtures import clip_folder as make

    return make(tmp_path_factory.mktemp("retrieval") / "clip")


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    from .image_text_fixtures import siglip_folder as make

    return make(tmp_path_factory.mktemp("retrieval") / "siglip")


def _reference(ref, model, image_paths, texts):
    """transformers' unit image and text embeddings of the images (read with vitlab's preprocessing of the tower)
    and the texts (vitlab's tokens)."""
    from PIL import Image

    transform = model.preprocessing.transform()
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths])
    with torch.no_grad():
        out = ref(input_ids=model.tokenize(texts), pixel_values=pixels)
    return out.image_embeds, out.text_embeds


def test_eval_retrieval_equals_brute_force_on_transformers_embeddings(clip_folder, tmp_path, capsys):
    import vitlab
    from vitlab.cli import main

    ref, folder = clip_folder
    paths = _png_images(tmp_path / "images")
    manifest = _captions_csv(tmp_path, [[f"images/img{i}.png", c] for i, c in zip(OWNER, CAPTIONS)])
    model = vitlab.load_image_text(folder)
    images, texts = _reference(ref, model, paths, CAPTIONS)
    ks = (1, 5, 10)
    want = _brute_force(images.numpy(), texts.numpy(), np.array(OWNER), ks)
    out = tmp_path / "report"
    assert main(["eval", str(folder), "--retrieval", "--data", str(manifest), "--json", "--out", str(out)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["images"] == 5 and results["texts"] == 10 and results["skipped"] == 0
    for direction in ("image_to_text", "text_to_image"):
        assert results[direction] == pytest.approx(want[direction], abs=1e-9), direction
    # the numbers are not all perfect or all zero (a random model: else the comparison would prove little)
    assert 0 < results["text_to_image"]["recall@1"] < 1
    assert json.loads((out / "results.json").read_text())["image_to_text"] == results["image_to_text"]
    assert "| image -> text |" in (out / "report.md").read_text()
    # the printed line
    assert main(["eval", str(folder), "--retrieval", "--data", str(manifest)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{manifest} test: image -> text R@1 ") and "(5 images, 10 captions)" in line
    # classification options are refused in one line, before anything loads
    assert main(["eval", str(folder), "--retrieval", "--data", str(manifest), "--zero-shot", "--labels", "x"]) == 2
    assert "--retrieval scores captioned images; drop --zero-shot, --labels" in capsys.readouterr().err
    assert main(["eval", str(folder), "--data", str(manifest), "--text-column", "caption"]) == 2
    assert "add --retrieval" in capsys.readouterr().err
    assert main(["eval", str(folder), "--retrieval", "--data", str(manifest), "--text-column", "words"]) == 2
    assert "no text column 'words'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_predict_joint_and_texts_write_transformers_embeddings(kind, request, tmp_path, capsys):
    import vitlab
    from vitlab.checkpoints.files import read_safetensors
    from vitlab.cli import main

    ref, folder = request.getfixturevalue(f"{kind}_folder")
    paths = _png_images(tmp_path / "images", 3, seed=1)
    model = vitlab.load_image_text(folder)
    texts = CAPTIONS[:4]
    images, text_embeds = _reference(ref, model, paths, texts)
    # images: a folder, in sorted order, as --features lists them
    out = tmp_path / "images.safetensors"
    assert main(["predict", str(folder), str(tmp_path / "images"), "--joint", "--out", str(out)]) == 0
    assert "wrote joint-space embeddings of 3 images" in capsys.readouterr().out
    tensors, meta = read_safetensors(out)
    torch.testing.assert_close(tensors["features"], images, rtol=1e-5, atol=1e-5)
    assert meta["representation"] == "image_embeds" and json.loads(meta["sources"]) == [str(p) for p in paths]
    # texts: a text file (blank lines skipped) to npz, and a captions manifest's text column to parquet
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    assert main(["predict", str(folder), "--texts", str(lines), "--out", str(tmp_path / "t.npz"),
                 "--batch-size", "3"]) == 0
    assert "wrote joint-space embeddings of 4 texts" in capsys.readouterr().out
    with np.load(tmp_path / "t.npz") as saved:
        torch.testing.assert_close(torch.from_numpy(saved["features"]), text_embeds, rtol=1e-5, atol=1e-5)
        assert saved["sources"].tolist() == texts
    if kind == "clip":
        pq = pytest.importorskip("pyarrow.parquet")
        manifest = _captions_csv(tmp_path, [[f"images/img{i}.png", t] for i, t in enumerate(texts)])
        assert main(["predict", str(folder), "--texts", str(manifest), "--out", str(tmp_path / "t.parquet")]) == 0
        table = pq.read_table(tmp_path / "t.parquet")
        assert table.column("source").to_pylist() == texts
        torch.testing.assert_close(torch.tensor(table.column("features").to_pylist()), text_embeds, rtol=1e-5,
                                   atol=1e-5)
        # --joint --data on a captions manifest: each image once, however many captions it has
        captions = _captions_csv(tmp_path, [[f"images/img{i}.png", t] for i, t in zip([2, 0, 2, 1, 0], texts)],
                                 "captions.csv")
        assert main(["predict", str(folder), "--data", str(captions), "--joint", "--out", str(tmp_path / "m.npz")]) == 0
        with np.load(tmp_path / "m.npz") as saved:
            assert [s.rsplit("/", 1)[1] for s in saved["sources"].tolist()] == ["img2.png", "img0.png", "img1.png"]
            torch.testing.assert_close(torch.from_numpy(saved["features"]), images[[2, 0, 1]], rtol=1e-5, atol=1e-5)
    # contradictions refused in one line before anything loads
    for argv, message in (([str(paths[0]), "--texts", str(lines)], "--texts embeds texts; give it without"),
                          (["--texts", str(lines), "--out", str(tmp_path / "x.npz"), "--topk", "2"],
                           "drop --topk"),
                          (["--texts", str(lines)], "--texts writes a file: give --out"),
                          ([str(paths[0]), "--joint", "--classes", "cat,dog", "--out", str(tmp_path / "y.npz")],
                           "--joint writes embeddings; drop the classification options"),
                          ([str(paths[0]), "--joint"], "--joint writes a file: give --out"),
                          ([str(paths[0]), "--text-column", "x"], "add --texts"),
                          (["--texts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "z.npz")],
                           "none.txt: no such text file")):
        assert main(["predict", str(folder), *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_eval_retrieval_on_parquet_captions_lists_and_an_unreadable_image(clip_folder, tmp_path, capsys):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    import vitlab
    from vitlab.cli import main

    ref, folder = clip_folder
    paths = _png_images(tmp_path / "images", 4, seed=2)
    captions = [CAPTIONS[0:3], CAPTIONS[3:4], CAPTIONS[4:7], CAPTIONS[7:10]]
    cells = [{"bytes": p.read_bytes(), "path": None} for p in paths]
    cells[2] = {"bytes": b"not an image", "path": None}  # left out with its three captions
    pq.write_table(pa.table({"img": cells, "sentences": captions, "caption": ["x"] * 4}), tmp_path / "test.parquet")
    model = vitlab.load_image_text(folder)
    kept = [0, 1, 3]
    texts = [t for i in kept for t in captions[i]]
    owner = np.array([j for j, i in enumerate(kept) for _ in captions[i]])
    images, text_embeds = _reference(ref, model, [paths[i] for i in kept], texts)
    want = _brute_force(images.numpy(), text_embeds.numpy(), owner, (1, 5, 10))
    argv = ["eval", str(folder), "--retrieval", "--data", str(tmp_path / "test.parquet"), "--text-column", "sentences"]
    assert main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["images"] == 3 and results["texts"] == 7 and results["skipped"] == 1
    assert "row 2" in results["skipped_images"][0]
    for direction in ("image_to_text", "text_to_image"):
        assert results[direction] == pytest.approx(want[direction], abs=1e-9), direction
    assert main([*argv, "--on-bad-image", "fail"]) == 2
    assert "row 2" in capsys.readouterr().err


def test_retrieval_checkpoint_siglip_equals_brute_force_on_transformers_embeddings(siglip_folder, tmp_path):
    import vitlab
    from vitlab.tasks import retrieval_checkpoint

    ref, folder = siglip_folder
    paths = _png_images(tmp_path / "images", seed=3)
    manifest = _captions_csv(tmp_path, [[f"images/img{i}.png", c] for i, c in zip(OWNER, CAPTIONS)])
    images, texts = _reference(ref, vitlab.load_image_text(folder), paths, CAPTIONS)
    want = _brute_force(images.numpy(), texts.numpy(), np.array(OWNER), (1, 3))
    results = retrieval_checkpoint(folder, str(manifest), ks=(3, 1), batch_size=2, block_elements=16)
    assert list(results["image_to_text"])[:2] == ["recall@1", "recall@3"]
    for direction in ("image_to_text", "text_to_image"):
        assert results[direction] == pytest.approx(want[direction], abs=1e-9), direction
