"""A fine-tuning run trains and evaluates with the source checkpoint's preprocessing (mean / std after channel
adaptation, interpolation, evaluation crop), at the run's resolution, and saves exactly that; a run from scratch keeps
the paper's [-1, 1]."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitlab
from tests.conftest import randomize_
from vitlab.checkpoints.loading import IMAGENET_MEAN, IMAGENET_STD
from vitlab.data import batch_transforms as BT
from vitlab.data.loaders import mix_seed
from vitlab.preprocessing import Preprocessing
from vitlab.tasks.runs import eval_checkpoint
from vitlab.train import TrainConfig, train
from vitlab.train import distributed as D
from vitlab.train.run import build_run
from vitlab.train.runlog import RunLog

IMAGENET = Preprocessing(img_size=8, resize="crop", crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN,
                         std=IMAGENET_STD)


def _source(tmp_path, in_chans=3, num_classes=10, pre=IMAGENET, name="src.safetensors"):
    model = randomize_(vitlab.create_model("vit_fmnist", img_size=8, patch_size=4, embed_dim=16, depth=1,
                                           num_heads=2, mlp_dim=32, pool="token", class_token=True,
                                           pos_embed="learned", in_chans=in_chans, num_classes=num_classes),
                       std=0.5)  # large enough that the logits depend visibly on the input
    return vitlab.save(model, tmp_path / name, preprocessing=pre.replace(channels=in_chans, mean=pre.mean[:in_chans],
                                                                         std=pre.std[:in_chans]))


def _build(tmp_path, **changes):
    cfg = TrainConfig().replace(**{**dict(data="digits", epochs=None, steps=1, batch_size=16, optimizer="sgd",
                                          lr=0.01, augment="none", out_dir=str(tmp_path / "runs"), threads=1,
                                          progress=False, eval_every_epochs=0), **changes})
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, console=False)
    return build_run(cfg, D.setup("cpu"), run_dir, log), run_dir


def test_in_memory_finetune_sees_the_sources_normalisation_adapted_to_grey(tmp_path):
    """An RGB checkpoint with ImageNet statistics fine-tuned on grey digits at 16 px: the first training batch is
    (x / 255 - mean(IMAGENET_MEAN)) / mean(IMAGENET_STD), resized bicubic, and the log says where it came from."""
    path = _source(tmp_path)
    run, run_dir = _build(tmp_path, init_from=str(path), img_size=16)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    assert run.preprocessing == Preprocessing(img_size=16, resize="crop", crop_pct=0.875, interpolation="bicubic",
                                              mean=(mean,), std=(std,), channels=1)
    batch = next(iter(run.loader.epoch(0)))
    order = torch.randperm(len(run.train_set), generator=torch.Generator().manual_seed(mix_seed(run.config.seed, 0)))
    raw = run.train_set.images[order[:16]].float() / 255
    expected = F.interpolate((raw - mean) / std, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(batch.images, expected, rtol=0, atol=1e-5)
    paper = F.interpolate((raw - 0.5) / 0.5, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert (batch.images - paper).abs().max() > 0.1  # what the run fed before
    log = (run_dir / "log.txt").read_text()
    assert f"preprocessing: the source checkpoint's ({path})" in log
    assert "bicubic; evaluation: shorter side to 18 (crop_pct 0.875), centre 16x16 crop" in log


def test_from_scratch_keeps_the_papers_preprocessing(tmp_path):
    run, run_dir = _build(tmp_path, model="vit_fmnist", img_size=8,
                          model_args={"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
                                      "pool": "token", "class_token": True, "pos_embed": "learned"})
    assert run.preprocessing == Preprocessing.for_model(8, 1)
    batch = next(iter(run.loader.epoch(0)))
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert "preprocessing: the paper's (training from scratch): mean 0.5, std 0.5, bilinear" in (
        run_dir / "log.txt").read_text()


@pytest.mark.parametrize("shape", [(8, 8), (8, 12), (13, 9)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_batch_centre_crop_matches_the_preprocessing_transform(shape, interpolation):
    """The in-memory evaluation's crop policy on float batches = Preprocessing.transform on the same float images
    (sizes and crop offsets as torchvision's Resize + CenterCrop)."""
    pre = Preprocessing(img_size=16, resize="crop", crop_pct=0.875, interpolation=interpolation, channels=1,
                        mean=(0.3,), std=(0.2,))
    images = torch.randint(0, 256, (3, 1, *shape), dtype=torch.uint8)
    ours = BT.resize_center_crop(BT.to_float(images, pre.mean, pre.std), (16, 16), pre.crop_pct, interpolation)
    theirs = torch.stack([pre.transform()(img.float() / 255) for img in images])
    assert ours.shape == theirs.shape == (3, 1, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def _folder(root, size=(10, 14)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_folder_finetune_evaluates_like_vitlab_eval_of_the_source_and_saves_its_preprocessing(tmp_path):
    """1 step at a negligible learning rate: the run's own test evaluation equals ``vitlab eval`` of the source
    checkpoint (its own preprocessing) at the run's resolution, not the paper's; model.safetensors records the
    source's preprocessing at that resolution, and ``vitlab eval`` of it gives the run's numbers."""
    data = _folder(tmp_path / "images")
    path = _source(tmp_path, num_classes=3)
    result = train(TrainConfig().replace(
        data=str(data), init_from=str(path), img_size=16, reset_head="never", linear_probe=True, epochs=None,
        steps=1, batch_size=4, optimizer="sgd", lr=1e-30, augment="inception", threads=1, progress=False,
        num_workers=0, eval_every_epochs=0, out_dir=str(tmp_path / "runs")))
    saved = vitlab.load(result.model_path).preprocessing
    assert saved == IMAGENET.replace(img_size=16)
    source = eval_checkpoint(path, str(data), img_size=16, device="cpu")
    exported = eval_checkpoint(result.model_path, str(data), device="cpu")
    paper = eval_checkpoint(path, str(data), img_size=16, device="cpu", preprocessing=Preprocessing.for_model(16))
    assert result.metrics["samples"] == source["samples"] == 12
    assert result.metrics["loss"] == pytest.approx(source["loss"], rel=1e-5, abs=1e-6)
    assert exported["loss"] == pytest.approx(source["loss"], rel=1e-5, abs=1e-6)
    assert abs(paper["loss"] - source["loss"]) > 0.05  # the paper's [-1, 1] would give other numbers


def test_in_memory_finetune_evaluation_and_export_follow_the_source(tmp_path):
    """On an in-memory set the run's evaluation uses the source's mean / std, bicubic and centre crop, and the
    export records it; ``vitlab eval`` of the source (uint8 resize through torchvision) agrees closely."""
    path = _source(tmp_path, in_chans=1, pre=IMAGENET.replace(channels=1, mean=(0.2,), std=(0.3,)))
    result = train(TrainConfig().replace(
        data="digits", init_from=str(path), img_size=16, reset_head="never", linear_probe=True, epochs=None,
        steps=1, batch_size=16, optimizer="sgd", lr=1e-30, augment="inception", threads=1, progress=False,
        eval_every_epochs=0, out_dir=str(tmp_path / "runs")))
    expected = Preprocessing(img_size=16, resize="crop", crop_pct=0.875, interpolation="bicubic", mean=(0.2,),
                             std=(0.3,), channels=1)
    assert vitlab.load(result.model_path).preprocessing == expected
    source = eval_checkpoint(path, "digits", img_size=16, device="cpu")
    paper = eval_checkpoint(path, "digits", img_size=16, device="cpu", preprocessing=Preprocessing.for_model(16, 1))
    assert result.metrics["samples"] == source["samples"]
    assert result.metrics["loss"] == pytest.approx(source["loss"], rel=1e-2)
    assert abs(result.metrics["loss"] - source["loss"]) < abs(paper["loss"] - source["loss"]) / 10


def test_a_runs_training_checkpoint_carries_its_stored_preprocessing(tmp_path):
    """A run's ``.pt`` stores the preprocessing it used; loading it (and so fine-tuning from it) takes that, not the
    timm default its tensor names would suggest; a stored record for another channel count is refused."""
    from vitlab.checkpoints import read_checkpoint
    from vitlab.errors import VitlabError

    model = randomize_(vitlab.create_model("vit_fmnist", img_size=8, patch_size=4, embed_dim=16, depth=1,
                                           num_heads=2, mlp_dim=32, pool="token", class_token=True,
                                           pos_embed="learned", in_chans=3, num_classes=3))
    state = {"model": model.state_dict(), "vit_config": model.cfg.to_dict(), "preprocessing": IMAGENET.to_dict()}
    torch.save(state, tmp_path / "last.pt")
    assert read_checkpoint(tmp_path / "last.pt").preprocessing == IMAGENET
    from vitlab.checkpoints import inspect_checkpoint  # `vitlab info` names where it came from: the file

    info = inspect_checkpoint(tmp_path / "last.pt")
    assert info["preprocessing_source"] == "stored in the file" and "stored_preprocessing" not in info["facts"]
    assert vitlab.load(tmp_path / "last.pt", img_size=16).preprocessing == IMAGENET.replace(img_size=16)
    torch.save({**state, "preprocessing": IMAGENET.replace(channels=1, mean=(0.5,), std=(0.5,)).to_dict()},
               tmp_path / "bad.pt")
    with pytest.raises(VitlabError, match="bad.pt: the stored preprocessing is for 1-channel images"):
        read_checkpoint(tmp_path / "bad.pt")


def test_torchvision_checkpoint_is_fine_tuned_with_imagenet_statistics(tmp_path, capsys):
    """A torchvision ViT state dict (ImageNet mean / std, 224/256 centre crop, bilinear) fine-tuned on an image
    folder from the command line: the first training batch is the folder's images normalised with ImageNet's
    statistics, the log says so, and the saved model records it at the run's resolution."""
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    from torchvision.transforms import v2 as T

    from vitlab.cli import main as cli_main
    from vitlab.data import load_image

    torch.manual_seed(0)
    reference = tv.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                     mlp_dim=32, num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    data = _folder(tmp_path / "images")
    run, _ = _build(tmp_path, data=str(data), init_from=str(tmp_path / "tv.pth"), img_size=24, batch_size=4,
                    num_workers=0)
    batch = next(iter(run.loader.epoch(0)))
    order = torch.randperm(len(run.train_set), generator=torch.Generator().manual_seed(mix_seed(run.config.seed, 0)))
    expected = torch.stack([T.Compose([T.ToImage(), T.Resize((24, 24), antialias=True),
                                       T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(
        load_image(run.train_set.samples[i][0], channels=3)) for i in order[:4].tolist()])
    torch.testing.assert_close(batch.images, expected, rtol=0, atol=1e-6)
    assert cli_main(["finetune", "--from", str(tmp_path / "tv.pth"), "--data", str(data), "--steps", "1",
                     "--batch-size", "4", "--img-size", "24", "--threads", "1", "--no-progress",
                     "--out-dir", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr()
    assert "mean 0.485/0.456/0.406, std 0.229/0.224/0.225, bilinear; evaluation: shorter side to 27 (crop_pct " \
           "0.875), centre 24x24 crop" in out.out + out.err
    saved = vitlab.load(next((tmp_path / "cli").glob("*/model.safetensors"))).preprocessing
    assert saved == Preprocessing(img_size=24, resize="crop", crop_pct=224 / 256, interpolation="bilinear",
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
