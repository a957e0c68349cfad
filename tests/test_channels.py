"""More than three channels: .npy arrays and multi-band TIFFs as images (the layout and scaling rule, one-line errors),
training on them from folders and manifests, per-channel mean / std measured from the data and saved with the model,
an RGB checkpoint adapted to four bands, and predict on array files."""

import numpy as np
import pytest
import torch

import vitlab
from vitlab.checkpoints.channels import adapt_input_conv
from vitlab.cli import main as cli_main
from vitlab.data import build_dataset, load_sample
from vitlab.data.images import ImageLoadError
from vitlab.data.stats import channel_statistics
from vitlab.preprocessing import Preprocessing
from vitlab.train import TrainConfig, train
from vitlab.train.predict import predict

tifffile = pytest.importorskip("tifffile")

TINY_MODEL = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}


def band_folder(root, suffix=".tif", classes=("crop", "water"), per_class=4, bands=4, size=8, dtype=np.uint16):
    """root/<class>/<i><suffix>: (size, size, bands) images whose band k is bright for class k."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            top = np.iinfo(dtype).max
            pixels = rng.integers(0, top // 3, (size, size, bands)).astype(dtype)
            pixels[..., k] += top // 2
            path = root / name / f"{i}{suffix}"
            tifffile.imwrite(path, pixels) if suffix == ".tif" else np.save(path, pixels)
    return root


def run_config(tmp_path, data, **changes) -> TrainConfig:
    base = dict(data=str(data), model="vit_fmnist", img_size=8, model_args=dict(TINY_MODEL, in_chans=4), steps=2,
                batch_size=4, lr=1e-3, augment="crop", crop_scale=(0.5, 1.0), out_dir=str(tmp_path / "runs"),
                threads=1, num_workers=0, progress=False, eval_every_epochs=0, warmup_steps=0)
    base.update(changes)
    return TrainConfig().replace(**base)


def test_array_layout_and_scaling_rule(tmp_path):
    hwc = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.save(tmp_path / "hwc.npy", hwc)
    np.save(tmp_path / "chw.npy", hwc.transpose(2, 0, 1).copy())
    a, b = load_sample(tmp_path / "hwc.npy", 4), load_sample(tmp_path / "chw.npy", 4)
    assert a.shape == (4, 2, 3) and a.dtype == torch.float32 and torch.equal(a, b)
    torch.testing.assert_close(a, torch.from_numpy(hwc.transpose(2, 0, 1) / 255.0).float())
    np.save(tmp_path / "u16.npy", np.full((2, 2, 4), 65535, np.uint16))
    np.save(tmp_path / "f.npy", np.full((4, 2, 2), 1234.5, np.float32))  # floats and signed ints as they are
    np.save(tmp_path / "grey.npy", np.zeros((5, 6), np.uint8))
    assert load_sample(tmp_path / "u16.npy", 4).eq(1).all() and load_sample(tmp_path / "f.npy", 4).eq(1234.5).all()
    assert load_sample(tmp_path / "grey.npy", 1).shape == (1, 5, 6)
    tifffile.imwrite(tmp_path / "b.tif", hwc.astype(np.uint16) * 257)
    torch.testing.assert_close(load_sample(tmp_path / "b.tif", 4), a)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p / "x.npy", np.array(["a", "b"])), r"x.npy: not a numeric array \(dtype <U1\)"),
    (lambda p: np.save(p / "x.npy", np.array([{"a": 1}], dtype=object)),
     r"x.npy: cannot read array \(.*(pickle|Python objects)"),  # refused, never unpickled
    (lambda p: np.save(p / "x.npy", np.zeros((3, 8, 8))), r"x.npy: 3 band\(s\), expected 4 channel\(s\)"),
    (lambda p: np.save(p / "x.npy", np.zeros((2, 3, 8, 8))), r"x.npy: an array of shape \(2, 3, 8, 8\)"),
    (lambda p: np.save(p / "x.npy", np.full((2, 2, 4), np.nan)), r"x.npy: the array holds NaN"),
    (lambda p: tifffile.imwrite(p / "x.tif", np.zeros((8, 8, 3), np.uint8)), r"x.tif: 3 band\(s\), expected 4"),
    (lambda p: (p / "x.tif").write_bytes(b"II*\x00garbage"), r"x.tif: (cannot read array|no pixels)"),
    (lambda p: (p / "x.png").write_bytes(b"png"), r"x.png: a .png file cannot hold 4 channels"),
])
def test_bad_array_images_are_one_line_errors(tmp_path, make, message):
    make(tmp_path)
    name = next(tmp_path.iterdir())
    with pytest.raises(ImageLoadError, match=message) as err:
        load_sample(name, 4)
    assert "\n" not in str(err.value)


def test_a_bad_band_count_is_skipped_and_counted_in_training(tmp_path):
    root = band_folder(tmp_path / "tifs")
    tifffile.imwrite(root / "crop" / "rgb.tif", np.zeros((8, 8, 3), np.uint8))
    dataset = build_dataset(root, channels=4)
    bad = [dataset[i][0] for i in range(len(dataset)) if not isinstance(dataset[i][0], torch.Tensor)]
    assert len(bad) == 1 and bad[0].reason.endswith("rgb.tif: 3 band(s), expected 4 channel(s) (shape (8, 8, 3): "
                                                    "neither the first nor the last axis has 4 entries)")
    result = train(run_config(tmp_path, root, batch_size=9, steps=1))
    assert result.skipped_files == 1


def test_train_on_four_band_tiffs_with_statistics_from_the_data(tmp_path, capsys):
    root = band_folder(tmp_path / "tifs")
    args = ["train", "--data", str(root), "--channels", "4", "--normalize-from-data", "--steps", "2",
            "--batch-size", "4", "--img-size", "8", "--workers", "0", "--no-progress", "--threads", "1",
            "--out-dir", str(tmp_path / "runs"), "--run-name", "bands", "--set", "model_args.patch_size=4",
            "--set", "model_args.embed_dim=32", "--set", "model_args.depth=1", "--set", "model_args.num_heads=2",
            "--set", "model_args.mlp_dim=64", "--set", "eval_every_epochs=0"]
    assert cli_main(args) == 0
    model = vitlab.load(tmp_path / "runs" / "bands" / "model.safetensors")
    assert model.cfg.in_chans == 4 and model.preprocessing.channels == 4
    pixels = np.stack([tifffile.imread(p).astype(np.float64) / 65535 for p in sorted(root.rglob("*.tif"))])
    np.testing.assert_allclose(model.preprocessing.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)  # float32 pixels
    np.testing.assert_allclose(model.preprocessing.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    assert "mean / std measured on 8 training images" in (tmp_path / "runs" / "bands" / "log.txt").read_text()


def test_npy_manifest_and_an_rgb_checkpoint_adapted_to_four_bands(tmp_path):
    root = band_folder(tmp_path / "arrays", suffix=".npy", dtype=np.uint8)
    files = sorted(root.rglob("*.npy"))
    (tmp_path / "bands.csv").write_text("path,label\n" + "".join(f"{f.relative_to(tmp_path)},{f.parent.name}\n"
                                                                 for f in files))
    rgb = vitlab.create_model("vit_fmnist", num_classes=2, img_size=8, in_chans=3, **TINY_MODEL)
    source = vitlab.save(rgb, tmp_path / "rgb.safetensors", class_names=["crop", "water"])
    config = run_config(tmp_path, tmp_path / "bands.csv", init_from=str(source), steps=1, lr=1e-9,
                        model_args={"in_chans": 4}, img_size=None)
    result = train(config)
    model = vitlab.load(result.model_path)
    assert model.cfg.in_chans == 4 and model.preprocessing.mean == (0.5,) * 4
    expected = adapt_input_conv(rgb.state_dict()["patch_embed.proj.weight"], 4)
    torch.testing.assert_close(model.state_dict()["patch_embed.proj.weight"], expected, atol=1e-6, rtol=0)
    preds = predict(model, [str(files[0]), str(tmp_path / "missing.npy")], topk=2)
    x = model.preprocessing.transform()(load_sample(files[0], 4))[None]
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
    assert preds[0].top[0][2] == pytest.approx(float(probs.max()), abs=1e-6)
    assert preds[1].error.endswith("missing.npy: no such file")


def test_preprocessing_and_statistics_for_many_channels(tmp_path):
    pre = Preprocessing.for_model(8, 6)
    assert Preprocessing.from_dict(pre.to_dict()) == pre and pre.mean == (0.5,) * 6
    x = torch.rand(6, 8, 8)
    out = pre.transform()(x)
    torch.testing.assert_close(out, (x - 0.5) / 0.5)
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        Preprocessing(channels=0, mean=(), std=())
    root = band_folder(tmp_path / "tifs", per_class=2)
    mean, std, n = channel_statistics(build_dataset(root, channels=4))
    assert n == 4 and len(mean) == len(std) == 4
