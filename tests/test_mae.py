"""Masked autoencoder: equal to transformers' ViTMAEForPreTraining on the same weights and noise (loss, predicted
pixels, encoder output), the masking's counts, an analytic loss, MAE checkpoints (timm / original / transformers
layouts) read for fine-tuning, and pre-training through the training loop and the CLI."""

import json

import numpy as np
import pytest
import torch

import vitlab
from vitlab.checkpoints.statedicts import from_hf
from vitlab.errors import InvalidValueError
from vitlab.selfsup import MaskedAutoencoder, patchify, random_masking, unpatchify
from vitlab.selfsup.mae import keep_count

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=0, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
            pool="token", class_token=True, pos_embed="learned", norm_eps=1e-6)


def _hf_mae(tmp_path, mask_ratio=0.75, norm_pix_loss=False, cls_name="ViTMAEForPreTraining"):
    """A tiny random transformers ViTMAE (every parameter perturbed, the fixed sin-cos position embeddings built by
    transformers' own initialisation), saved by save_pretrained: (model, folder)."""
    transformers = pytest.importorskip("transformers")
    from vitlab.models.vit import sincos_2d_position_embedding

    cfg = transformers.ViTMAEConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, decoder_hidden_size=24,
                                    decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=48, layer_norm_eps=1e-6, mask_ratio=mask_ratio,
                                    norm_pix_loss=norm_pix_loss)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # the fixed sin-cos tables as transformers builds them (its post_init leaves them at zero in this version):
        # vitlab's sincos_2d_position_embedding must be the same table, [sin x, cos x, sin y, cos y], zero class row
        embeddings = (model.vit if hasattr(model, "vit") else model).embeddings
        embeddings.patch_embeddings.projection.__dict__.pop("_is_hf_initialized", None)
        projection = embeddings.patch_embeddings.projection.weight.clone()
        embeddings.initialize_weights()
        embeddings.patch_embeddings.projection.weight.copy_(projection)  # keep the random weights
        embeddings.cls_token.add_(0.05 * torch.randn_like(embeddings.cls_token))
        assert torch.equal(embeddings.position_embeddings[0, 1:], sincos_2d_position_embedding((4, 4), 32))
        assert not embeddings.position_embeddings[0, 0].any()
        if hasattr(model, "decoder"):
            mask_token = model.decoder.mask_token.clone()
            model.decoder.initialize_weights(16)
            model.decoder.mask_token.copy_(mask_token)
            assert torch.equal(model.decoder.decoder_pos_embed[0, 1:], sincos_2d_position_embedding((4, 4), 24))
    folder = tmp_path / cls_name
    model.save_pretrained(folder)
    return model, folder


def _mae_from_hf_folder(folder, norm_pix_loss, mask_ratio=0.75) -> MaskedAutoencoder:
    """vitlab's MAE with the weights of a saved ViTMAEForPreTraining: the encoder through vitlab's transformers ViT
    names, the decoder's layers the same names under ``decoder.decoder_layers.{i}`` (the Hub's files) or
    ``decoder.decoder_encoder.layer.{i}`` (what transformers 5 writes)."""
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    encoder = {k: v for k, v in sd.items() if k.startswith("vit.")}
    decoder = {k.removeprefix("decoder."): v for k, v in sd.items() if k.startswith("decoder.")}
    mae = MaskedAutoencoder(vitlab.create_model("vit_fmnist", **TINY), mask_ratio, decoder_width=24,
                            decoder_depth=2, decoder_heads=2, decoder_mlp_ratio=2.0, norm_pix_loss=norm_pix_loss)
    ours, _ = from_hf(encoder)
    layers = {}
    for k, v in decoder.items():
        for theirs in ("decoder_layers.", "decoder_encoder.layer."):
            if k.startswith(theirs):
                layers["encoder.layer." + k.removeprefix(theirs)] = v
    blocks, _ = from_hf(layers)
    ours.update({"decoder_" + k: v for k, v in blocks.items()})
    ours.update({k: decoder[k] for k in ("decoder_embed.weight", "decoder_embed.bias", "mask_token",
                                         "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
                                         "decoder_pred.bias")})
    mae.load_state_dict({("vit." + k if not k.startswith(("decoder", "mask_token")) else k): v
                         for k, v in ours.items()})
    assert torch.equal(mae.decoder_pos_embed, decoder["decoder_pos_embed"][0, 1:])  # the same fixed table
    return mae.eval()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_equals_transformers_vitmae_for_pretraining(tmp_path, norm_pix_loss):
    hf, folder = _hf_mae(tmp_path, norm_pix_loss=norm_pix_loss)
    mae = _mae_from_hf_folder(folder, norm_pix_loss)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 16, 16, generator=gen)
    noise = torch.rand(3, 16, generator=gen)
    with torch.no_grad():
        theirs = hf(pixel_values=images, noise=noise)
        pred, targets, mask = mae.predict(images, noise=noise)
        loss = mae(images, noise=noise)
        latent, _, restore = mae.forward_encoder(images, noise=noise)
        encoded = hf.vit(pixel_values=images, noise=noise)
    assert torch.equal(mask, theirs.mask) and torch.equal(restore, theirs.ids_restore)
    assert int(mask.sum()) == 3 * 12  # 4 of 16 patches kept per image
    np.testing.assert_allclose(latent.numpy(), encoded.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pred.numpy(), theirs.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(loss.item() - theirs.loss.item()) < 1e-5
    if norm_pix_loss:
        assert targets.mean(-1).abs().max() < 1e-5  # per-patch normalised
    else:
        assert torch.equal(targets, hf.patchify(images))


def test_masking_keeps_the_lowest_noise_tokens_in_exact_counts():
    gen = torch.Generator().manual_seed(0)
    for n, ratio, kept in ((196, 0.75, 49), (49, 0.75, 12), (16, 0.5, 8), (10, 0.9, 1), (16, 0.0, 16)):
        assert keep_count(n, ratio) == kept
        noise = torch.rand(5, n, generator=gen)
        keep, mask, restore = random_masking(noise, kept)
        assert keep.shape == (5, kept) and (mask.sum(1) == n - kept).all()
        lowest = noise.argsort(1)[:, :kept]
        assert torch.equal(keep, lowest)
        assert (mask.gather(1, keep) == 0).all()
        tokens = torch.arange(n).expand(5, n)
        order = torch.cat([keep, noise.argsort(1)[:, kept:]], 1)
        assert torch.equal(order.gather(1, restore), tokens)  # restore puts [kept, dropped] back in place
    vit = vitlab.create_model("vit_fmnist", **{**TINY, "depth": 1})
    mae = MaskedAutoencoder(vit, 0.75, decoder_width=16, decoder_depth=1, decoder_heads=2)
    latent, mask, _ = mae.forward_encoder(torch.randn(4, 3, 16, 16))
    assert latent.shape == (4, 1 + 4, 32) and mask.sum().item() == 4 * 12  # class token + 4 visible patches


def test_loss_counts_only_the_masked_patches():
    """Pixels that are a known function of the patch: with the decoder's prediction replaced by a constant, the
    loss is the mean over the masked patches only of mean((c - target)^2), computed here by hand."""
    vit = vitlab.create_model("vit_fmnist", **{**TINY, "in_chans": 1, "depth": 1})
    mae = MaskedAutoencoder(vit, 0.5, decoder_width=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    with torch.no_grad():
        mae.decoder_pred.weight.zero_()
        mae.decoder_pred.bias.fill_(0.25)
    images = torch.arange(16.0).reshape(1, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # patch k = k
    noise = torch.arange(16.0).flip(0)[None]  # the last 8 patches have the lowest noise: patches 0..7 are masked
    pred, targets, mask = mae.predict(images, noise=noise)
    assert mask[0, :8].eq(1).all() and mask[0, 8:].eq(0).all()
    expected = np.mean([(0.25 - k) ** 2 for k in range(8)])
    assert mae(images, noise=noise).item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(unpatchify(patchify(images, (4, 4)), (4, 4), (4, 4)), images)
    mae.norm_pix_loss = True  # per patch (x - mean) / sqrt(var + 1e-6): a flat patch becomes zeros
    assert mae(images, noise=noise).item() == pytest.approx(0.25**2, rel=1e-5)


def test_register_tokens_gap_and_refusals():
    for extra in ({"reg_tokens": 2, "no_embed_class": True}, {"class_token": False, "pool": "gap",
                                                              "pos_embed": "sincos"}):
        vit = vitlab.create_model("vit_fmnist", **{**TINY, "depth": 1, **extra})
        mae = MaskedAutoencoder(vit, 0.75, decoder_width=16, decoder_depth=1, decoder_heads=2)
        loss = mae(torch.randn(2, 3, 16, 16))
        loss.backward()
        assert loss.item() > 0 and all(p.grad is not None for p in mae.parameters() if p.requires_grad)
    with pytest.raises(InvalidValueError, match="map"):
        MaskedAutoencoder(vitlab.create_model("vit_fmnist", **{**TINY, "pool": "map"}))
    with pytest.raises(InvalidValueError, match="hybrid"):
        MaskedAutoencoder(vitlab.create_model("r_vit_fmnist", depth=1))
    with pytest.raises(InvalidValueError, match="mask ratio"):
        MaskedAutoencoder(vitlab.create_model("vit_fmnist", **TINY), mask_ratio=1.0)
    from vitlab.selfsup import MaskedAutoencoderObjective

    with pytest.raises(InvalidValueError, match="mask ratio"):
        MaskedAutoencoderObjective(mask_ratio=0.0)


@pytest.mark.parametrize("cls_name", ["ViTMAEModel", "ViTMAEForPreTraining"])
def test_load_reads_a_transformers_vit_mae_folder(tmp_path, cls_name):
    hf, folder = _hf_mae(tmp_path, mask_ratio=0.0, cls_name=cls_name)
    vit = vitlab.load(folder)
    assert type(vit) is vitlab.VisionTransformer and vit.cfg.num_classes == 0 and vit.cfg.norm_eps == 1e-6
    dropped = any("decoder dropped" in note for note in vitlab.read_checkpoint(folder).notes)
    assert dropped == (cls_name == "ViTMAEForPreTraining")
    images = torch.randn(2, 3, 16, 16)
    noise = torch.arange(16.0).expand(2, 16)  # increasing noise with nothing masked: every token, in order
    with torch.no_grad():
        encoder = hf if cls_name == "ViTMAEModel" else hf.vit
        theirs = encoder(pixel_values=images, noise=noise).last_hidden_state
        ours = vit.eval().forward_features(images)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, rtol=0)


def test_load_reads_timm_and_original_mae_encoders(tmp_path):
    """timm's ``vit_base_patch16_224.mae`` is its VisionTransformer with num_classes=0 (tiny here); the paper's
    ``mae_pretrain_vit_*.pth`` holds the same names under ``model``, its ``mae_visualize_*`` files the decoder too."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    ref = timm.models.VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=0, embed_dim=64, depth=2,
                                        num_heads=1, mlp_ratio=2.0).eval()  # width / 64 heads: what vitlab assumes
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = ref.state_dict()
    save_file(sd, tmp_path / "mae_timm.safetensors")
    decoder = MaskedAutoencoder(vitlab.create_model("vit_fmnist", **{**TINY, "embed_dim": 64}), decoder_width=16,
                                decoder_depth=1,
                                decoder_heads=2).state_dict()
    full = {**sd, **{k: v for k, v in decoder.items() if not k.startswith("vit.")},
            "decoder_pos_embed": torch.zeros(1, 17, 16)}
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    torch.save({"model": full}, tmp_path / "mae_visualize.pth")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref.forward_features(images).numpy()
    for name in ("mae_timm.safetensors", "mae_pretrain.pth", "mae_visualize.pth"):
        vit = vitlab.load(tmp_path / name).eval()
        assert vit.cfg.num_classes == 0
        with torch.no_grad():
            np.testing.assert_allclose(vit.forward_features(images).numpy(), expected, atol=1e-5, rtol=0)


def _digits_config(tmp_path, **changes):
    pytest.importorskip("sklearn")
    from vitlab.train import TrainConfig

    values = dict(data="digits", model="vit_fmnist", model_args={"embed_dim": 32, "num_heads": 2, "mlp_dim": 64,
                                                                "depth": 2}, img_size=16, steps=30, epochs=None,
                  batch_size=64, lr=3e-3, warmup_steps=5, log_every_steps=5, eval_batch_size=200, threads=1,
                  progress=False, out_dir=str(tmp_path), augment="none", optimizer="adamw", betas=(0.9, 0.95),
                  label_smoothing=0.0)
    values.update(changes)
    return TrainConfig.from_dict(values)


@pytest.mark.slow
def test_pretraining_through_the_loop_lowers_the_loss_resumes_exactly_and_fine_tunes(tmp_path, monkeypatch):
    import os
    import signal

    from tests.train_runs import same_tensors
    from vitlab.selfsup import MaskedAutoencoderObjective, pretrain_mae
    from vitlab.train import loop, train
    from vitlab.train.stop import RunStopped

    def objective():
        return MaskedAutoencoderObjective(decoder_width=32, decoder_depth=1, decoder_heads=2)

    cfg = _digits_config(tmp_path, run_name="pre", eval_every_epochs=0.5)
    result = pretrain_mae(cfg, objective=objective())
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    assert losses[-1] < 0.9 * losses[0]
    assert result.metrics["patches"] == 12 * result.metrics["samples"]  # 16 patches, 4 kept
    evals = [r["loss"] for r in rows if r["kind"] == "eval"]
    best = torch.load(result.run_dir / "checkpoints" / "best.pt", weights_only=True)["best"]
    assert len(evals) >= 2 and best["loss"] == min(evals)  # best.pt: the lowest held-out loss, there is no top-1
    saved = vitlab.load(result.model_path)
    assert saved.cfg.num_classes == 0 and type(saved) is vitlab.VisionTransformer
    # stopped at step 13 and resumed: the same weights as the uninterrupted run
    real_step = loop.train_step

    def signalled_step(run, batches, step):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, batches, step)

    monkeypatch.setattr(loop, "train_step", signalled_step)
    with pytest.raises(RunStopped):
        pretrain_mae(cfg.replace(run_name="stopped"), objective=objective(), resume="auto")
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = pretrain_mae(cfg.replace(run_name="stopped"), objective=objective(), resume="auto")
    assert same_tensors(resumed.model_path, result.model_path) == []
    tuned = train(_digits_config(tmp_path, run_name="ft", steps=5, init_from=str(result.model_path)))
    assert tuned.model.cfg.num_classes == 10 and tuned.metrics["top1"] > 0


@pytest.mark.slow
def test_pretrain_mae_command(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from vitlab.cli import main

    code = main(["pretrain-mae", "--data", "digits", "--model", "vit_fmnist", "--img-size", "16", "--steps", "3",
                 "--batch-size", "32", "--threads", "1", "--out-dir", str(tmp_path), "--no-progress",
                 "--decoder-width", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--no-norm-pix-loss",
                 "--set", 'model_args={"embed_dim": 32, "num_heads": 2, "mlp_dim": 64, "depth": 1}'])
    out = capsys.readouterr().out
    assert code == 0 and "reconstruction loss" in out and "vitlab finetune --from" in out
    model = next(tmp_path.rglob("model.safetensors"))
    assert main(["finetune", "--from", str(model), "--data", "digits", "--steps", "2", "--batch-size", "32",
                 "--threads", "1", "--out-dir", str(tmp_path / "ft"), "--no-progress", "--img-size", "16"]) == 0
    assert main(["pretrain-mae", "--data", "digits", "--mask-ratio", "1.0"]) == 2


@pytest.mark.slow
def test_torchrun_two_processes_pretrain_and_evaluate_every_image(tmp_path):
    """DDP: every parameter of encoder and decoder gets a gradient (no unused-parameter error), the held-out loss
    counts each evaluation image once over both processes, and rank 0 alone writes the run."""
    import subprocess
    import sys

    from tests.train_runs import child_env

    cfg = _digits_config(tmp_path, run_name="dist", steps=4, out_dir=str(tmp_path / "runs"))
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitlab",
           "pretrain-mae", "--config", str(config_file), "--decoder-width", "32", "--decoder-depth", "1",
           "--decoder-heads", "2"]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = list((tmp_path / "runs").iterdir())
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["metrics"]["samples"] == 359  # 180 + 179: nothing padded
    assert result["metrics"]["patches"] == 12 * 359 and done.stdout.count("reconstruction loss") == 1
    assert type(vitlab.load(run / "model.safetensors")) is vitlab.VisionTransformer
