"""Masked patch prediction: colour targets against a direct computation, the 50% / 80-10-10 corruption, and a loss
that starts at log(classes) and falls."""

import math

import numpy as np
import pytest
import torch

import vitlab
from tests.conftest import CLASS_TOKEN_VIT
from vitlab.selfsup import MaskedPatchPrediction, corrupt_patches, mean_colour_targets


def test_mean_colour_targets_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 8, 12, generator=gen)  # [0, 1] images, 4x4 patches -> 2 x 3 grid
    pixels[0, :, :4, :4] = 1.0  # the top value joins the top level: class 511
    pixels[1, :, :4, :4] = 0.0
    images = (pixels - 0.5) / 0.5  # what the loader hands the model
    got = mean_colour_targets(images, (4, 4), (0.5,) * 3, (0.5,) * 3)
    p = pixels.double().numpy()
    expected = np.zeros((2, 6), dtype=np.int64)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                r, g, bl = (min(int(p[b, c, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean() * 8), 7) for c in range(3))
                expected[b, i * 3 + j] = r * 64 + g * 8 + bl
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got[0, 0] == 511 and got[1, 0] == 0
    grey = mean_colour_targets(images[:, :1], (4, 4), (0.5,), (0.5,))
    np.testing.assert_array_equal(grey.numpy(), expected // 64)  # one channel: 8 classes, the red level


def test_corruption_chooses_half_and_splits_80_10_10():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 100, 8, generator=gen)
    mask = torch.full((1, 1, 8), 7.0)
    out, chosen = corrupt_patches(tokens, mask, generator=gen)
    assert (chosen.sum(1) == 50).all()
    assert torch.equal(out[~chosen], tokens[~chosen])
    picked, original = out[chosen], tokens[chosen]
    is_mask = (picked == 7.0).all(-1)
    unchanged = (picked == original).all(-1)
    flat = tokens.reshape(-1, 8)
    from_batch = (picked[:, None, :] == flat[None]).all(-1).any(-1) & ~unchanged
    n = picked.shape[0]
    assert (is_mask | unchanged | from_batch).all()
    assert abs(is_mask.sum().item() / n - 0.8) < 0.03
    assert abs(unchanged.sum().item() / n - 0.1) < 0.03
    assert abs(from_batch.sum().item() / n - 0.1) < 0.03
    with pytest.raises(ValueError, match="sum"):
        corrupt_patches(tokens, mask, probs=(0.5, 0.1, 0.1))


def test_loss_starts_at_log_classes_and_falls_on_fixed_images():
    vit = vitlab.create_model("vit_fmnist", **{**CLASS_TOKEN_VIT, "depth": 2, "embed_dim": 64, "mlp_dim": 128})
    mpp = MaskedPatchPrediction(vit, mean=(0.5,), std=(0.5,))
    assert mpp.num_colours == 8 and mpp.pixel_patch == (4, 4)
    gen = torch.Generator().manual_seed(1)
    # images whose patches are plain grey levels: the colour of a masked patch is predictable from its neighbours
    levels = torch.randint(0, 8, (16, 1, 7, 1), generator=gen).float() / 7
    images = (levels.repeat_interleave(4, 2).expand(16, 1, 28, 28) - 0.5) / 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        start = mpp(images).item()
    assert start == pytest.approx(math.log(8), abs=1e-5)  # zero head: uniform over the 8 grey levels
    opt = torch.optim.AdamW(mpp.parameters(), lr=2e-3)
    for _ in range(40):
        loss = mpp(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mpp.mask_token.grad.abs().sum() > 0 and vit.patch_embed.proj.weight.grad.abs().sum() > 0
    _, correct, total = mpp.accuracy(images, generator=torch.Generator().manual_seed(3))
    assert loss.item() < 0.85 * start and correct / total > 0.3  # chance: 1/8


def test_hybrid_tokens_cover_stride_times_patch_pixels():
    mpp = MaskedPatchPrediction(vitlab.create_model("r_vit_fmnist", depth=1), mean=(0.5,), std=(0.5,))
    assert mpp.pixel_patch == (4, 4)
    logits, targets, chosen = mpp.predict(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 49, 8) and targets.shape == chosen.shape == (2, 49)
    with pytest.raises(TypeError, match="VisionTransformer"):
        MaskedPatchPrediction(vitlab.create_model("bit_fmnist"), mean=(0.5,), std=(0.5,))


def _digits_config(tmp_path, **changes):
    pytest.importorskip("sklearn")
    from vitlab.train import TrainConfig

    values = dict(data="digits", model="vit_fmnist", model_args={"embed_dim": 32, "num_heads": 2, "mlp_dim": 64,
                                                                "depth": 2}, img_size=16, steps=40, epochs=None,
                  batch_size=64, lr=3e-3, warmup_steps=5, log_every_steps=5, eval_batch_size=200, threads=1,
                  progress=False, out_dir=str(tmp_path), augment="none")
    values.update(changes)
    return TrainConfig.from_dict(values)


@pytest.mark.slow
def test_pretraining_through_the_training_loop_lowers_the_loss_and_fine_tunes(tmp_path):
    import json

    from vitlab.selfsup import pretrain_mpp
    from vitlab.train import train

    result = pretrain_mpp(_digits_config(tmp_path, run_name="pre"))
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "step"]
    assert losses[-1] < 0.8 * losses[0]
    assert 0 < result.metrics["top1"] <= 1 and result.metrics["patches"] == 8 * result.metrics["samples"]  # 16 / 2
    saved = vitlab.load(result.model_path)
    assert saved.cfg.num_classes == 0 and type(saved) is vitlab.VisionTransformer  # the ViT alone, no MPP parts
    tuned = train(_digits_config(tmp_path, run_name="ft", steps=5, init_from=str(result.model_path)))
    assert tuned.model.cfg.num_classes == 10 and tuned.metrics["top1"] > 0


def test_objective_refuses_patch_dropout(tmp_path):
    from vitlab.errors import VitlabError
    from vitlab.selfsup import pretrain_mpp

    with pytest.raises(VitlabError, match="patch_dropout"):
        pretrain_mpp(_digits_config(tmp_path, patch_dropout=0.5))


@pytest.mark.slow
def test_pretrain_mpp_command(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from vitlab.cli import main

    code = main(["pretrain-mpp", "--data", "digits", "--model", "vit_fmnist", "--img-size", "16", "--steps", "3",
                 "--batch-size", "32", "--threads", "1", "--out-dir", str(tmp_path), "--no-progress",
                 "--set", 'model_args={"embed_dim": 32, "num_heads": 2, "mlp_dim": 64, "depth": 1}'])
    out = capsys.readouterr().out
    assert code == 0 and "colour accuracy" in out and "vitlab finetune --from" in out
    assert main(["pretrain-mpp", "--data", "digits", "--mask-ratio", "1.5"]) == 2


@pytest.mark.parametrize("command", ["pretrain-mpp", "pretrain-mae"])
def test_the_pretraining_commands_print_one_summary_under_torchrun(command, monkeypatch, capsys):
    # every torchrun process runs the command; only rank 0's summary is printed
    from types import SimpleNamespace

    from vitlab.cli import main as cli_main
    from vitlab.selfsup import pretrain

    done = SimpleNamespace(metrics={"loss": 0.5, "top1": 0.25, "patches": 10}, steps=3, train_seconds=1.0,
                           run_dir=None, model_path=None)
    name = command.replace("-", "_")
    monkeypatch.setattr(pretrain, name, lambda *args, **kwargs: done)
    outputs = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert cli_main([command, "--steps", "3"]) == 0
        outputs[rank] = capsys.readouterr().out
    assert outputs["1"] == "" and "held-out" in outputs["0"]
