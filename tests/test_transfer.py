"""Fine-tuning controls: freezing by pattern and by depth, the linear probe, layer-wise learning-rate decay (against
the analytic formula and timm's param_groups_layer_decay), adapting the input convolution to another channel count
(analytic identities and timm's adapt_input_conv), and the channel adaptation of a fine-tuning run."""

import json

import pytest
import torch

import vitlab
from tests.conftest import CLASS_TOKEN_VIT, randomize_
from vitlab.checkpoints.channels import adapt_input_conv, adapt_model_channels
from vitlab.cli import main as cli_main
from vitlab.errors import VitlabError
from vitlab.train import TrainConfig, apply_overrides, train
from vitlab.train import transfer as T
from vitlab.train.optim import build_optimizer, build_scheduler

timm = pytest.importorskip("timm")

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_dim=96, num_classes=5)


def small_vit(**changes):
    return randomize_(vitlab.create_model("vit_ti16", **{**SMALL, **changes}))


# ----- freezing
def test_patterns_select_prefixes_globs_and_ranges():
    model = small_vit(depth=12)
    assert T.matching_parameters(model, "patch_embed") == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert T.matching_parameters(model, ["pos_embed", "cls_token"]) == ["cls_token", "pos_embed"]
    ranged = T.matching_parameters(model, "blocks.0-1")
    assert {n.split(".")[1] for n in ranged} == {"0", "1"}  # not blocks.10 / blocks.11
    assert len(ranged) == 2 * len([n for n, _ in model.blocks[0].named_parameters()])
    attn = T.matching_parameters(model, "blocks.*.attn.qkv.weight")
    assert len(attn) == 12 and all(n.endswith("attn.qkv.weight") for n in attn)
    assert T.matching_parameters(model, "blocks.10-11.mlp,norm") == [
        n for n, _ in model.named_parameters()
        if n.startswith(("blocks.10.mlp.", "blocks.11.mlp.", "norm."))]
    with pytest.raises(VitlabError, match="'patch_emb' matches no parameter; the model's parts are blocks, cls"):
        T.matching_parameters(model, "patch_emb")
    with pytest.raises(VitlabError, match="range 5-2 is empty"):
        T.matching_parameters(model, "blocks.5-2")


def test_freeze_first_blocks_freezes_layers_0_to_n():
    model = small_vit()
    frozen = T.freeze_first_blocks(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"patch_embed.proj.weight", "cls_token", "pos_embed"} <= set(frozen)
    assert all(n.startswith(("blocks.2.", "blocks.3.", "norm.", "head.")) for n in trainable)
    assert any(n.startswith("blocks.2.") for n in trainable)
    with pytest.raises(VitlabError, match="between 0 and the model's depth 4, got 5"):
        T.freeze_first_blocks(small_vit(), 5)


def test_linear_probe_trains_the_head_only_with_fixed_features():
    model = small_vit(dropout=0.2, attn_dropout=0.2, drop_path_rate=0.3)
    T.linear_probe(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    model.train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    with pytest.raises(VitlabError, match="no head"):
        T.linear_probe(small_vit(num_classes=0))
    model = small_vit()
    with pytest.raises(VitlabError, match="every parameter is frozen"):
        T.apply_controls(model, patterns="*")


def test_finetune_records_the_model_it_starts_from_not_the_configs_default(tmp_path):
    """The config's ``model`` (default vit_fmnist) does not build a fine-tuned model; the run folder's name and its
    config.json name the registered model the checkpoint is."""
    source = randomize_(vitlab.create_model("r_vit_fmnist", img_size=8))
    path = vitlab.save(source, tmp_path / "src.safetensors")
    assert T.source_model_name(str(path)) == "r_vit_fmnist"
    config = TrainConfig().replace(
        data="digits", init_from=str(path), img_size=8, epochs=None, steps=1, batch_size=16, augment="none",
        out_dir=str(tmp_path / "runs"), threads=1, progress=False, eval_every_epochs=0)
    assert config.model == "vit_fmnist"
    result = train(config)
    assert result.run_dir.name.startswith("digits-r_vit_fmnist-")
    assert json.loads((result.run_dir / "config.json").read_text())["model"] == "r_vit_fmnist"


def test_finetune_from_a_bit_checkpoint_with_new_classes(tmp_path):
    """Fine-tuning a BiT (convolutional) checkpoint onto new classes was an AttributeError (its config has no
    pre-logits field)."""
    source = randomize_(vitlab.create_model("bit_fmnist", img_size=8, num_classes=3))
    path = vitlab.save(source, tmp_path / "bit.safetensors")
    config = TrainConfig().replace(
        data="digits", init_from=str(path), img_size=8, epochs=None, steps=1, batch_size=16, augment="none",
        out_dir=str(tmp_path / "runs"), threads=1, progress=False, eval_every_epochs=0)
    result = train(config)
    model = vitlab.load(result.model_path)
    assert type(model).__name__ == "ResNetV2" and model.cfg.num_classes == 10


def test_frozen_parameters_get_no_optimizer_state_and_stay_bit_identical(tmp_path):
    """A fine-tuning run with AdamW and weight decay: the frozen tensors come out bit for bit as loaded, have no
    optimiser state in the checkpoint, and the rest trains."""
    source = randomize_(vitlab.create_model("vit_fmnist", **{**CLASS_TOKEN_VIT, "img_size": 8, "patch_size": 2,
                                                              "embed_dim": 32, "depth": 3, "num_heads": 2,
                                                              "mlp_dim": 64, "num_classes": 10}))
    path = vitlab.save(source, tmp_path / "src.safetensors")
    config = TrainConfig().replace(
        data="digits", init_from=str(path), img_size=8, epochs=None, steps=6, batch_size=64, lr=3e-3,
        weight_decay=0.1, optimizer="adamw", augment="none", out_dir=str(tmp_path / "runs"), threads=1,
        progress=False, eval_every_epochs=0, freeze=["patch_embed", "pos_embed", "cls_token", "blocks.0"],
        reset_head="never")
    result = train(config)
    loaded = dict(source.named_parameters())
    frozen = {n for n in loaded if n.startswith(("patch_embed.", "pos_embed", "cls_token", "blocks.0."))}
    for name, param in result.model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), loaded[name].detach()), name
        else:
            assert not torch.equal(param.detach(), loaded[name].detach()), name
    state = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["optimizer"]["state"]) == {n for n in loaded if n not in frozen}
    log = (result.run_dir / "log.txt").read_text()
    assert "frozen by pattern: patch_embed, pos_embed, cls_token, blocks.0" in log


# ----- layer-wise learning-rate decay
def _timm_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=4, num_heads=3, mlp_ratio=2.0, num_classes=5)


def test_layer_decay_groups_match_the_formula_and_timm():
    from timm.optim import param_groups_layer_decay

    lr, decay, wd, L = 0.01, 0.75, 0.05, 4
    ours = small_vit()
    reference = _timm_vit()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    optimizer = build_optimizer(ours, "adamw", lr, wd, layer_decay=decay)
    got = T.parameter_lrs(ours, optimizer)
    assert len(got) == len(list(ours.parameters()))
    expected_layer = {"patch_embed.proj.weight": 0, "cls_token": 0, "pos_embed": 0, "blocks.0.attn.qkv.weight": 1,
                      "blocks.3.mlp.fc2.bias": 4, "norm.weight": 5, "head.weight": 5}
    for name, layer in expected_layer.items():
        assert got[name][0] == pytest.approx(lr * decay ** (L + 1 - layer), rel=1e-12), name
    names = {id(p): n for n, p in reference.named_parameters()}
    timm_groups = param_groups_layer_decay(reference, weight_decay=wd, layer_decay=decay,
                                           no_weight_decay_list=reference.no_weight_decay())
    theirs = {names[id(p)]: (lr * g["lr_scale"], g["weight_decay"]) for g in timm_groups for p in g["params"]}
    assert set(theirs) == set(got)
    for name in got:
        if name.startswith("norm."):  # timm puts the final norm with the last block; BEiT and MAE with the head
            assert theirs[name][0] == pytest.approx(got[name][0] * decay, rel=1e-12)
            assert theirs[name][1] == got[name][1]
            continue
        assert got[name] == pytest.approx(theirs[name], rel=1e-12), name
    # the schedule scales every group alike, so the ratios hold at every step
    scheduler = build_scheduler(optimizer, 20, 5, "cosine")
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    now = T.parameter_lrs(ours, optimizer)
    factor = now["head.weight"][0] / lr
    assert 0 < factor < 1
    for name in got:
        assert now[name][0] == pytest.approx(got[name][0] * factor, rel=1e-9)
    assert optimizer.param_groups[0]["lr"] == max(g["lr"] for g in optimizer.param_groups)


def test_layer_decay_leaves_frozen_parameters_out_and_covers_hybrids():
    model = small_vit()
    T.freeze_first_blocks(model, 1)
    got = T.parameter_lrs(model, build_optimizer(model, "sgd", 0.1, 0.0, layer_decay=0.5))
    assert not any(n.startswith(("patch_embed", "blocks.0.", "pos_embed", "cls_token")) for n in got)
    assert got["blocks.1.norm1.weight"][0] == pytest.approx(0.1 * 0.5**3)
    hybrid = vitlab.create_model("r_vit_fmnist")
    depth = len(hybrid.blocks)
    stem = [n for n, _ in hybrid.named_parameters() if n.startswith("patch_embed.backbone.")]
    assert stem and all(T.layer_id(n, depth) == 0 for n in stem)
    lines = []
    T.apply_controls(small_vit(), freeze_blocks=1, layer_decay=0.5, log=lines.append)
    assert lines[0].startswith("fine-tuning controls: embedding and first 1 block(s) frozen: ")
    assert lines[1] == "layer-wise lr decay 0.5: layer l of 0..5 trains at lr x 0.5^(5 - l), from x0.0312 (patch " \
                       "embedding) to x1 (head)"
    with pytest.raises(VitlabError, match="needs a transformer"):
        build_optimizer(vitlab.create_model("bit_fmnist"), "sgd", 0.1, layer_decay=0.7)
    with pytest.raises(ValueError, match=r"layer_decay = 1.5: takes a number in \(0, 1\]"):
        TrainConfig(layer_decay=1.5)


# ----- adapting the input convolution
@pytest.mark.parametrize("source, target", [(3, 1), (3, 2), (3, 4), (3, 6), (1, 3), (1, 2)])
def test_adapt_input_conv_matches_timm(source, target):
    from timm.models import adapt_input_conv as timm_adapt

    weight = torch.randn(16, source, 4, 4)
    expected = timm_adapt(target, weight.clone(), base_chans=source)
    torch.testing.assert_close(adapt_input_conv(weight, target), expected, rtol=0, atol=0)


def test_rgb_checkpoint_on_grey_images_equals_the_grey_image_replicated(tmp_path):
    rgb = small_vit()
    path = vitlab.save(rgb, tmp_path / "rgb.safetensors")
    grey_model = vitlab.load(path, in_chans=1)
    assert grey_model.cfg.in_chans == 1 and grey_model.preprocessing.channels == 1
    assert grey_model.preprocessing.mean == (0.5,)
    grey = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey_model(grey), rgb.eval()(grey.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    # the same logits as timm's adapt_input_conv applied to the same weights in a timm model
    reference = _timm_vit()
    reference.load_state_dict(rgb.state_dict())
    state = reference.state_dict()
    from timm.models import adapt_input_conv as timm_adapt

    state["patch_embed.proj.weight"] = timm_adapt(1, state["patch_embed.proj.weight"])
    grey_timm = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                                  depth=4, num_heads=3, mlp_ratio=2.0, num_classes=5, in_chans=1).eval()
    grey_timm.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(grey_model(grey), grey_timm(grey), rtol=1e-5, atol=1e-5)


def test_grey_checkpoint_on_rgb_images_sees_the_channel_mean(tmp_path):
    grey_source = small_vit(in_chans=1)
    path = vitlab.save(grey_source, tmp_path / "grey.safetensors")
    rgb_model = vitlab.load(path, in_chans=3)
    assert rgb_model.preprocessing.channels == 3 and rgb_model.preprocessing.std == (0.5, 0.5, 0.5)
    grey = torch.randn(2, 1, 32, 32)
    colour = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        grey_source.eval()
        torch.testing.assert_close(rgb_model(grey.expand(-1, 3, -1, -1)), grey_source(grey), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rgb_model(colour), grey_source(colour.mean(1, keepdim=True)), rtol=1e-5,
                                   atol=1e-5)


def test_hybrid_and_resnet_stems_are_adapted():
    for name in ("r_vit_fmnist", "bit_fmnist"):
        grey = randomize_(vitlab.create_model(name)).eval()
        rgb = adapt_model_channels(grey, 3)
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            # weight standardisation normalises each kernel, so the scaled copy gives the same output up to eps
            torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), grey(x), rtol=1e-3, atol=1e-4)


# ----- in a run and on the command line
def test_finetune_adapts_an_rgb_checkpoint_to_grey_data_and_says_so(tmp_path):
    rgb = randomize_(vitlab.create_model("vit_fmnist", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                                         mlp_dim=64, in_chans=3, num_classes=10))
    path = vitlab.save(rgb, tmp_path / "rgb.safetensors")
    config = TrainConfig().replace(
        data="digits", init_from=str(path), img_size=8, epochs=None, steps=3, batch_size=32, optimizer="sgd",
        lr=0.01, augment="none", out_dir=str(tmp_path / "runs"), threads=1, progress=False, eval_every_epochs=0,
        linear_probe=True, model_args={"dropout": 0.1})
    result = train(config)
    assert result.model.cfg.in_chans == 1
    log = (result.run_dir / "log.txt").read_text()
    assert "the checkpoint takes 3-channel images, the data have 1: input convolution adapted" in log
    assert "linear probe (head only; dropout and drop-path off): 330 of" in log
    reloaded = vitlab.load(result.model_path)
    assert reloaded.cfg.in_chans == 1 and reloaded.preprocessing.channels == 1


def test_cli_flags_and_set_keys_reach_the_config(capsys):
    assert cli_main(["finetune", "--from", "x.safetensors", "--data", "digits", "--linear-probe", "--freeze",
                     "patch_embed,pos_embed", "--freeze", "blocks.0-5", "--freeze-blocks", "2", "--layer-decay",
                     "0.65", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["linear_probe"] is True and shown["freeze_blocks"] == 2 and shown["layer_decay"] == 0.65
    assert shown["freeze"] == ["patch_embed", "pos_embed", "blocks.0-5"]
    cfg = apply_overrides(TrainConfig(), ["freeze=patch_embed,blocks.0-1", "layer_decay=0.75", "freeze_blocks=3"])
    assert cfg.freeze == ["patch_embed", "blocks.0-1"] and cfg.layer_decay == 0.75 and cfg.freeze_blocks == 3
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="freeze_blocks = -1: takes an integer >= 0"):
        apply_overrides(TrainConfig(), ["freeze_blocks=-1"])
    for bad in (["--layer-decay", "1.5"], ["--freeze-blocks", "-2"], ["--set", "freeze=3"]):
        assert cli_main(["finetune", "--from", "x.safetensors", "--data", "digits", *bad, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vitlab finetune: error: "), err


def test_layer_decay_optimizer_state_round_trips_through_the_checkpoint_functions():
    """What a resumed run does: the full (DCP) optimiser state of layer-decay groups loads into a fresh optimiser
    with the same per-group learning rates and moments."""
    from vitlab.train import distributed as D

    model = small_vit()
    T.freeze_first_blocks(model, 1)
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.05, layer_decay=0.75)
    scheduler = build_scheduler(optimizer, 10, 2, "cosine")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler.step()
    model_sd, optim_sd = D.full_state_dicts(model, optimizer)
    model.zero_grad(set_to_none=True)  # as in a new process
    fresh = build_optimizer(model, "adamw", 1e-3, 0.05, layer_decay=0.75)
    fresh_scheduler = build_scheduler(fresh, 10, 2, "cosine")
    D.load_full_state_dicts(model, fresh, model_sd, optim_sd)
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    assert T.parameter_lrs(model, fresh) == T.parameter_lrs(model, optimizer)
    for a, b in zip(optimizer.param_groups, fresh.param_groups):
        for p, q in zip(a["params"], b["params"]):
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], fresh.state[q]["exp_avg"], rtol=0, atol=0)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_image_folders_are_decoded_to_the_checkpoint_channels_unless_asked_for_grey(tmp_path):
    """An RGB checkpoint fine-tuned on a folder gets colour images (no adaptation); model_args.in_chans=1 asks for
    grey decoding and adapts the checkpoint instead."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "images" / split / cls / f"{i}.png")
    rgb = randomize_(vitlab.create_model("vit_fmnist", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                         mlp_dim=32, in_chans=3, num_classes=2))
    path = vitlab.save(rgb, tmp_path / "rgb.safetensors")
    base = dict(data=str(tmp_path / "images"), init_from=str(path), epochs=None, steps=1, batch_size=4, lr=0.01,
                augment="none", threads=1, progress=False, num_workers=0, eval_every_epochs=0)
    colour = train(TrainConfig().replace(**base, out_dir=str(tmp_path / "runs1")))
    assert colour.model.cfg.in_chans == 3
    grey = train(TrainConfig().replace(**base, out_dir=str(tmp_path / "runs2"), model_args={"in_chans": 1}))
    assert grey.model.cfg.in_chans == 1
    assert "input convolution adapted" in (grey.run_dir / "log.txt").read_text()
