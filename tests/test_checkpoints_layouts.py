"""Hugging Face, torchvision and timm layouts in both directions: the libraries themselves are the oracles."""

import pytest
import torch

import vitlab
from vitlab.checkpoints import convert, inspect_checkpoint, read_checkpoint

from .checkpoint_fixtures import random_timm_vit, randomize_weights_

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
tv_models = pytest.importorskip("torchvision.models")


def _images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _hf_model(act="gelu", eps=1e-12, num_labels=7, id2label=None, image_size=32):
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=384,
                                 image_size=image_size, patch_size=8, num_labels=num_labels, hidden_act=act,
                                 layer_norm_eps=eps, id2label=id2label, label2id=None if id2label is None else
                                 {v: k for k, v in id2label.items()})
    return randomize_weights_(transformers.ViTForImageClassification(cfg)).eval()


def _tv_model(num_classes=7, representation_size=None):
    model = tv_models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=192,
                                        mlp_dim=384, num_classes=num_classes, representation_size=representation_size)
    return randomize_weights_(model).eval()


def _vitlab_model(**overrides):
    cfg = dict(img_size=32, patch_size=8, depth=2, mlp_dim=384, num_classes=7)
    cfg.update(overrides)
    return randomize_weights_(vitlab.create_model("vit_ti16", **cfg)).eval()


# ------------------------------------------------------------------------------------------------- Hugging Face in
@pytest.mark.parametrize("act,eps", [("gelu", 1e-12), ("gelu_pytorch_tanh", 1e-6)])
def test_hf_folder_loads_with_transformers_logits(tmp_path, act, eps):
    names = {i: f"class{i}" for i in range(7)}
    reference = _hf_model(act, eps, id2label=names)
    reference.save_pretrained(tmp_path / "hf")
    model = vitlab.load(tmp_path / "hf")
    assert model.cfg.gelu == ("exact" if act == "gelu" else "tanh") and model.cfg.norm_eps == eps
    assert model.class_names == list(names.values())
    x = _images()
    expected = _logits(reference, x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)
    assert read_checkpoint(tmp_path / "hf").format == "hf"


def test_hf_backbone_with_pooler_loads_as_the_google_in21k_repos_are(tmp_path):
    """``google/vit-*-in21k`` are ``ViTModel`` folders: no classifier, a tanh pooler. They load as a headless ViT
    whose pre-logits layer is the pooler: tokens and pooled features equal transformers'; ``num_classes`` adds a
    zero head on top of the pooler, as fine-tuning from them does."""
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=384,
                                 image_size=32, patch_size=8)
    reference = randomize_weights_(transformers.ViTModel(cfg)).eval()
    reference.save_pretrained(tmp_path / "in21k")
    model = vitlab.load(tmp_path / "in21k")
    assert model.cfg.num_classes == 0 and model.cfg.representation_size == 192
    x = _images()
    with torch.no_grad():
        expected = reference(pixel_values=x)
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    assert expected.pooler_output.abs().max() > 0.1
    torch.testing.assert_close(tokens, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected.pooler_output, atol=1e-5, rtol=1e-5)
    tuned = vitlab.load(tmp_path / "in21k", num_classes=5)
    assert tuned.cfg.num_classes == 5 and torch.count_nonzero(tuned.head.weight) == 0
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_head(tuned.forward_features(x), pre_logits=True), pooled)


def test_hf_safetensors_file_alone_uses_transformers_defaults(tmp_path):
    reference = _hf_model()
    reference.save_pretrained(tmp_path / "hf")
    model = vitlab.load(tmp_path / "hf" / "model.safetensors")  # no config.json: eps 1e-12, exact GELU
    torch.testing.assert_close(_logits(model, _images()), _logits(reference, _images()), atol=1e-5, rtol=1e-5)
    assert model.preprocessing.resize == "squash" and model.preprocessing.interpolation == "bilinear"


# ------------------------------------------------------------------------------------------------- torchvision in
@pytest.mark.parametrize("representation_size", [None, 96])
def test_torchvision_state_dict_loads_with_torchvision_logits(tmp_path, representation_size):
    reference = _tv_model(representation_size=representation_size)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    model = vitlab.load(tmp_path / "tv.pth")
    assert model.cfg.representation_size == representation_size
    x = _images()
    expected = _logits(reference, x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)
    pre = model.preprocessing
    assert pre.mean == (0.485, 0.456, 0.406) and pre.resize == "crop" and pre.crop_pct == 224 / 256


def test_torchvision_old_mlp_names_are_read(tmp_path):
    reference = _tv_model()
    sd = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
          for k, v in reference.state_dict().items()}
    torch.save(sd, tmp_path / "old.pth")
    torch.testing.assert_close(_logits(vitlab.load(tmp_path / "old.pth"), _images()), _logits(reference, _images()),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- out and back
def test_export_to_hf_is_read_by_transformers_and_round_trips(tmp_path):
    model = _vitlab_model()
    model.class_names = [f"c{i}" for i in range(7)]
    vitlab.save(model, tmp_path / "m.safetensors")
    summary = convert(tmp_path / "m.safetensors", tmp_path / "hf", to="hf")
    assert summary["notes"] == []
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and dict(processor.size) == {"height": 32, "width": 32}
    assert hf.config.id2label[3] == "c3"
    x = _images()
    expected = _logits(model, x)
    diff = (_logits(hf, x) - expected).abs().max().item()
    assert diff < 1e-5, diff
    back = vitlab.load(tmp_path / "hf")
    assert torch.equal(_logits(back, x), expected)
    assert back.class_names == model.class_names


def test_export_to_torchvision_is_read_by_torchvision_and_round_trips(tmp_path):
    model = _vitlab_model(representation_size=96)
    vitlab.save(model, tmp_path / "m.safetensors")
    convert(tmp_path / "m.safetensors", tmp_path / "tv.pth", to="torchvision")
    tv = tv_models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=192,
                                     mlp_dim=384, num_classes=7, representation_size=96)
    tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)
    x = _images()
    expected = _logits(model, x)
    torch.testing.assert_close(_logits(tv.eval(), x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(vitlab.load(tmp_path / "tv.pth"), x), expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_to_timm_is_read_by_timm_and_round_trips(tmp_path, suffix):
    model = _vitlab_model()
    vitlab.save(model, tmp_path / "m.safetensors")
    dst = tmp_path / f"timm{suffix}"
    convert(tmp_path / "m.safetensors", dst, to="timm")
    reference = random_timm_vit(seed=5)
    timm.models.load_checkpoint(reference, str(dst), strict=True)  # timm's own file reader
    x = _images()
    expected = _logits(model, x)
    torch.testing.assert_close(_logits(reference, x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(vitlab.load(dst), x), expected)


def test_convert_with_new_resolution_and_classes(tmp_path):
    reference = _tv_model()
    torch.save({"model": reference.state_dict(), "epoch": 9}, tmp_path / "tv.pth")
    summary = convert(tmp_path / "tv.pth", tmp_path / "ft.safetensors", to="vitlab", img_size=48, num_classes=3)
    assert summary["resampled"] and summary["new_head"] and summary["from"] == "torchvision"
    model = vitlab.load(tmp_path / "ft.safetensors")
    assert model.cfg.img_size == (48, 48) and model.cfg.num_classes == 3 and not model.head.weight.any()
    assert model.preprocessing.img_size == (48, 48) and model.preprocessing.mean == (0.485, 0.456, 0.406)
    info = inspect_checkpoint(tmp_path / "ft.safetensors")
    assert info["metadata"]["converted_from"] == {"path": "tv.pth", "format": "torchvision"}


@pytest.mark.parametrize("to,overrides,message", [
    ("hf", dict(pool="gap", class_token=False), "global-average pooling"),
    ("hf", dict(representation_size=64), "pre-logits"),
    ("torchvision", dict(img_size=(32, 48)), "non-square"),
    ("timm", dict(pos_embed="learned_2d"), "learned 1D"),
])
def test_export_refuses_what_the_target_cannot_express(tmp_path, to, overrides, message):
    model = _vitlab_model(**overrides)
    dst = tmp_path / ("out" if to == "hf" else "out.pth")
    with pytest.raises(ValueError, match=message):
        vitlab.checkpoints.export(model, dst, to)
    assert list(tmp_path.iterdir()) == []
