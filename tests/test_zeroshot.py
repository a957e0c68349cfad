"""Zero-shot classifiers: the projection + L2-norm head option of the ViT, and classifiers built from an image-text
model's class-prompt embeddings (checked against the image-text model's own logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.errors import InvalidValueError
from vitlab.models import VisionTransformer, ViTConfig

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=3)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def test_head_projection_and_l2_norm_compute_scaled_cosines():
    model = _randomised(VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True)))
    x = torch.randn(4, 3, 32, 32)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (4, 32)  # pre-logits: before the projection
    embedded = F.normalize(pooled @ model.head_proj.weight.T, dim=-1)
    expected = embedded @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # every logit is bounded by its row's norm (a scaled cosine) plus the bias
    bound = model.head.weight.norm(dim=1) + model.head.bias.abs()
    assert (model(x).abs() <= bound + 1e-5).all()


def test_head_options_save_load_and_reset(tmp_path):
    model = _randomised(VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True)))
    x = torch.randn(2, 3, 32, 32)
    path = vitlab.save(model, tmp_path / "zs.safetensors", class_names=["a", "b", "c"], metadata={"loss": "sigmoid"})
    loaded = vitlab.load(path)
    assert loaded.cfg.head_proj_dim == 8 and loaded.cfg.head_l2_norm
    assert loaded.class_names == ["a", "b", "c"] and loaded.loss == "sigmoid"
    torch.testing.assert_close(loaded(x), model(x))
    # a new head for other classes keeps the projection and the norm (fine-tuning a cosine classifier)
    other = vitlab.load(path, num_classes=5)
    torch.testing.assert_close(other.head_proj.weight, model.head_proj.weight)
    assert other.cfg.head_l2_norm and other(x).abs().max() == 0  # zero-initialised new head
    # pruning the head for features drops the projection and norm too: the pooled features come out
    pruned = _randomised(VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True)))
    reference = pruned.forward_head(pruned.forward_features(x), pre_logits=True)
    pruned.prune_intermediate_layers(indices=1, prune_head=True)
    torch.testing.assert_close(pruned(x), reference)


def test_head_options_refused_where_a_layout_cannot_hold_them(tmp_path):
    model = VisionTransformer(ViTConfig(**TINY, head_proj_dim=8, head_l2_norm=True))
    for fmt in ("timm", "npz", "hf"):
        with pytest.raises(InvalidValueError, match="head_proj_dim|zero-shot head"):
            vitlab.convert(vitlab.save(model, tmp_path / "m.safetensors"), tmp_path / f"out.{fmt}.safetensors"
                           if fmt != "npz" else tmp_path / "out.npz", to=fmt)
    with pytest.raises(InvalidValueError, match="head_proj_dim must be"):
        ViTConfig(**TINY, head_proj_dim=-1)
    with pytest.raises(InvalidValueError, match="distilled=True does not combine with head_proj_dim"):
        ViTConfig(**{**TINY, "head_l2_norm": True, "distilled": True})
