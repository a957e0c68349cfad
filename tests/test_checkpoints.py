"""vitlab's own checkpoint format and timm state dicts: round trips, wrappers, resolution and head changes."""

import json
import struct

import pytest
import torch

import vitlab
from vitlab import load
from vitlab.checkpoints import read_checkpoint, resample_pos_embed, save
from vitlab.errors import VitlabError
from vitlab.models import FAMILIES, get_config, has_tokens
from vitlab.preprocessing import Preprocessing

from .checkpoint_fixtures import random_timm_vit
from .conftest import randomize_

timm = pytest.importorskip("timm")


def _small(**overrides):
    cfg = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
    cfg.update(overrides)
    return randomize_(vitlab.create_model("vit_ti16", **cfg)).eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------------------- vitlab format
def test_save_load_round_trip_is_exact_and_self_describing(tmp_path):
    model = _small(gelu="tanh", pos_embed="learned_2d", img_size=(32, 48))
    pre = Preprocessing((32, 48), resize="crop", crop_pct=0.875, interpolation="bicubic", mean=(0.1, 0.2, 0.3),
                        std=(0.4, 0.5, 0.6))
    path = save(model, tmp_path / "m.safetensors", preprocessing=pre, class_names=list("abcde"),
                metadata={"epoch": 3, "dataset": "toy"})
    loaded = load(path)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    assert loaded.preprocessing == pre
    assert loaded.class_names == list("abcde")
    x = torch.randn(2, 3, 32, 48)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    ckpt = read_checkpoint(path)
    assert ckpt.format == "vitlab" and ckpt.metadata == {"epoch": 3, "dataset": "toy"}
    # the config lives in the safetensors header, readable without vitlab
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_len])
    document = json.loads(header["__metadata__"]["vitlab"])
    assert document["config"] == model.cfg.to_dict() and document["class_names"] == list("abcde")


def test_save_uses_model_attributes_and_paper_default_preprocessing(tmp_path):
    model = _small(in_chans=1)
    loaded = load(save(model, tmp_path / "a.safetensors"))
    assert loaded.preprocessing == Preprocessing.for_model((32, 32), 1)
    assert loaded.class_names is None
    loaded.class_names = [f"c{i}" for i in range(5)]
    loaded.preprocessing = loaded.preprocessing.replace(interpolation="bicubic")
    again = load(save(loaded, tmp_path / "b.safetensors"))
    assert again.class_names == loaded.class_names and again.preprocessing.interpolation == "bicubic"


def test_model_metadata_is_declared_and_resolved_in_one_place(tmp_path):
    model = _small(in_chans=1)
    # declared on the class: a fresh model has none, and metadata_of supplies the paper's preprocessing
    assert model.preprocessing is None and model.class_names is None and model.loss is None
    meta = vitlab.metadata_of(model)
    assert meta.preprocessing == Preprocessing.for_model((32, 32), 1) and not meta.preprocessing_known
    assert meta.class_names is None and meta.loss is None
    pre = Preprocessing.for_model((32, 32), 1, interpolation="bicubic")
    loaded = load(save(model, tmp_path / "m.safetensors", preprocessing=pre, class_names=list("abcde")))
    meta = vitlab.metadata_of(loaded)
    assert meta.preprocessing == pre and meta.preprocessing_known and meta.class_names == list("abcde")
    # a wrapper that declares nothing (a plain module with a cfg) falls back the same way
    wrapper = torch.nn.Module()
    wrapper.cfg = model.cfg
    assert vitlab.metadata_of(wrapper).preprocessing == Preprocessing.for_model((32, 32), 1)


def test_families_say_which_models_have_tokens():
    assert FAMILIES["vit"].tokens and FAMILIES["hybrid"].tokens and not FAMILIES["resnetv2"].tokens
    assert has_tokens(get_config("vit_ti16")) and has_tokens(_small())
    assert has_tokens(get_config("r50_vit_b16")) and not has_tokens(get_config("bit_r50x1"))


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    import vitlab.checkpoints.files

    model = _small()
    path = save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(vitlab.checkpoints.files, "save_file", broken)
    with pytest.raises(VitlabError, match="disk full; the previous file, if any, is unchanged"):
        save(_small(num_classes=3), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


def test_save_rejects_mismatched_class_names_and_bad_suffix(tmp_path):
    model = _small()
    with pytest.raises(ValueError, match="3 class names"):
        save(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=".safetensors"):
        save(model, tmp_path / "m.pth")
    assert list(tmp_path.iterdir()) == []


def test_new_head_is_zero_and_body_is_kept(tmp_path):
    model = _small()
    loaded = load(save(model, tmp_path / "m.safetensors", class_names=list("abcde")), num_classes=3)
    assert loaded.cfg.num_classes == 3 and loaded.class_names is None
    assert not loaded.head.weight.any() and not loaded.head.bias.any()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x), pre_logits=True),
                                   model.forward_head(model.forward_features(x), pre_logits=True), atol=0, rtol=0)


def test_drop_pre_logits_gives_paper_fine_tuning_head(tmp_path):
    model = _small(representation_size=64)
    path = save(model, tmp_path / "m.safetensors")
    kept = load(path, num_classes=10)
    assert kept.cfg.representation_size == 64 and torch.equal(kept.pre_logits.fc.weight, model.pre_logits.fc.weight)
    dropped = load(path, num_classes=10, drop_pre_logits=True)
    assert dropped.cfg.representation_size is None and dropped.head.weight.shape == (10, 192)
    assert not dropped.head.weight.any()


# ------------------------------------------------------------------------------------------------- timm state dicts
@pytest.mark.parametrize("wrap", ["plain", "module", "compile+module", "state_dict", "model", "model_ema"])
def test_timm_state_dict_wrappers_load_with_timm_logits(tmp_path, wrap):
    reference = random_timm_vit()
    sd = reference.state_dict()
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "compile+module":
        obj = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    elif wrap == "plain":
        obj = sd
    elif wrap == "model_ema":
        obj = {"model_ema": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    else:
        obj = {wrap: sd, "epoch": 3}
    torch.save(obj, tmp_path / "ckpt.pth")
    model = load(tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 32, 32)
    expected = _logits(reference, x)
    assert expected.abs().max() > 0.02
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)
    assert model.preprocessing.resize == "crop" and model.preprocessing.interpolation == "bicubic"
    assert model.preprocessing.crop_pct == 0.9


def test_timm_prefers_ema_only_when_asked(tmp_path):
    a, b = random_timm_vit(seed=1), random_timm_vit(seed=2)
    torch.save({"model": a.state_dict(), "model_ema": b.state_dict()}, tmp_path / "both.pth")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_logits(load(tmp_path / "both.pth"), x), _logits(a, x))
    torch.testing.assert_close(_logits(load(tmp_path / "both.pth", prefer_ema=True), x), _logits(b, x))
    notes = read_checkpoint(tmp_path / "both.pth").notes
    assert any("EMA" in n for n in notes)


def test_asking_for_ema_weights_of_a_file_without_them_is_an_error(tmp_path, capsys):
    """``--ema`` used to give the plain weights without a word when the file held no EMA copy."""
    from vitlab.cli import main

    a = random_timm_vit(seed=1)
    torch.save({"model": a.state_dict(), "epoch": 3}, tmp_path / "plain.pth")
    torch.save(a.state_dict(), tmp_path / "bare.pth")
    vitlab.save(vitlab.create_model("vit_ti16", depth=1, img_size=32, num_classes=10), tmp_path / "m.safetensors")
    for name in ("plain.pth", "bare.pth", "m.safetensors"):
        with pytest.raises(VitlabError, match="holds none"):
            load(tmp_path / name, prefer_ema=True)
        assert main(["info", str(tmp_path / name), "--ema"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}: --ema / prefer_ema asks for EMA weights" in err
    load(tmp_path / "plain.pth")  # without the flag the plain weights load as before


def test_timm_safetensors_and_gap_fc_norm(tmp_path):
    from safetensors.torch import save_file

    reference = random_timm_vit(global_pool="avg")
    save_file(reference.state_dict(), str(tmp_path / "gap.safetensors"))
    model = load(tmp_path / "gap.safetensors")
    assert model.cfg.pool == "gap" and model.cfg.norm_after_pool
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), atol=1e-5, rtol=1e-5)


def test_timm_heads_come_from_model_name_when_width_is_not_standard(tmp_path):
    reference = random_timm_vit(width=96, heads=4, mlp=192)
    torch.save(reference.state_dict(), tmp_path / "w96.pth")
    # width 96 is not a standard size: without a name the head count is a guess (96 / 64 -> 1), and the notes say so
    ckpt = read_checkpoint(tmp_path / "w96.pth")
    assert any("head count" in n for n in ckpt.notes)
    if "test_vit_w96" not in vitlab.list_models("test_vit_w96"):
        vitlab.models.register(vitlab.models.ModelEntry(
            "test_vit_w96", vitlab.ViTConfig(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=4,
                                             mlp_dim=192, num_classes=7), "test model"))
    model = load(tmp_path / "w96.pth", model_name="test_vit_w96")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(VitlabError, match="not a vit_ti16"):
        load(tmp_path / "w96.pth", model_name="vit_ti16")


# ------------------------------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("method,timm_kwargs", [("bicubic", dict(interpolation="bicubic", antialias=True)),
                                                ("bilinear", dict(interpolation="bilinear", antialias=False))])
def test_pos_embed_resampling_matches_timm(tmp_path, method, timm_kwargs):
    from timm.layers import resample_abs_pos_embed

    reference = random_timm_vit(img_size=224, patch=16, depth=1)
    torch.save(reference.state_dict(), tmp_path / "r224.pth")
    model = load(tmp_path / "r224.pth", img_size=384, resample=method)
    expected = resample_abs_pos_embed(reference.pos_embed.detach(), (24, 24), num_prefix_tokens=1, **timm_kwargs)
    assert model.pos_embed.shape == (1, 577, 192)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-6, rtol=1e-6)
    # the rest of the network is untouched, and the timm model built at 384 with the same embedding agrees
    big = random_timm_vit(img_size=384, patch=16, depth=1)
    sd = reference.state_dict()
    sd["pos_embed"] = expected
    big.load_state_dict(sd)
    x = torch.randn(1, 3, 384, 384)
    torch.testing.assert_close(_logits(model, x), _logits(big, x), atol=1e-5, rtol=1e-5)
    assert model.preprocessing.img_size == (384, 384)


def test_resample_non_square_grid_and_identity():
    pos = torch.randn(1, 1 + 4 * 6, 8)
    same = resample_pos_embed(pos, (4, 6), (4, 6))
    assert torch.equal(same, pos)
    out = resample_pos_embed(pos, (8, 3), (4, 6), method="bilinear_aligned")
    assert out.shape == (1, 1 + 24, 8) and torch.equal(out[:, :1], pos[:, :1])
    grid = pos[0, 1:].reshape(4, 6, 8)
    # aligned corners keep the four corner rows exactly
    out_grid = out[0, 1:].reshape(8, 3, 8)
    for (r, c), (r2, c2) in [((0, 0), (0, 0)), ((0, 5), (0, 2)), ((3, 0), (7, 0)), ((3, 5), (7, 2))]:
        torch.testing.assert_close(out_grid[r2, c2], grid[r, c])
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(pos, (5, 5))
    with pytest.raises(ValueError, match="unknown resampling method"):
        resample_pos_embed(pos, (5, 5), (4, 6), method="lanczos")


def test_save_unwraps_compile_and_data_parallel(tmp_path):
    model = _small()
    wrapped = torch.nn.DataParallel(model)
    loaded = load(save(wrapped, tmp_path / "dp.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    with pytest.raises(VitlabError, match="register_family"):
        save(torch.nn.Sequential(model), tmp_path / "seq.safetensors")
