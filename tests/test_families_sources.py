"""DINOv2, DeiT, SigLIP and CLIP in every layout they are published in: transformers folders (``save_pretrained``),
the original releases' state dicts and big_vision ``.npz``. transformers and timm are the oracles."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from vitlab.checkpoints.family_layouts import detect_family_layout, to_timm_names

from .checkpoint_fixtures import randomize_weights_

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=16)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _saved(model, folder):
    randomize_weights_(model).eval()
    model.save_pretrained(folder)
    return model, load_file(folder / "model.safetensors")


def _timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**kwargs).eval()


def _timm_target(model, state_dict):
    model.load_state_dict(state_dict, strict=True)
    return model


# ------------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
def test_hf_dinov2_maps_onto_timm_names(tmp_path, registers, swiglu):
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
              use_swiglu_ffn=swiglu)
    if registers:
        ref, sd = _saved(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            **kw, num_register_tokens=registers)), tmp_path)
    else:
        ref, sd = _saved(transformers.Dinov2Model(transformers.Dinov2Config(**kw)), tmp_path)
    assert detect_family_layout(sd) == "hf_dinov2"
    mapped, notes = to_timm_names(sd, "hf_dinov2", "x")
    assert "mask_token" in notes[0]
    extra = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2 * 88 / 32) if swiglu else {}
    model = _timm_target(_timm_vit(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1.0,
                                   num_classes=0, reg_tokens=registers, no_embed_class=bool(registers), **extra),
                         mapped)
    x = _images(size=28)
    with torch.no_grad():
        out = ref(x)
        torch.testing.assert_close(model.forward_features(x), out.last_hidden_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x), out.pooler_output, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("teacher", [True, False])
def test_hf_deit_maps_onto_timm_distilled_names(tmp_path, teacher):
    from timm.models.deit import VisionTransformerDistilled

    cfg = transformers.DeiTConfig(**TOWER, num_labels=5)
    cls = transformers.DeiTForImageClassificationWithTeacher if teacher else transformers.DeiTForImageClassification
    ref, sd = _saved(cls(cfg), tmp_path)
    assert detect_family_layout(sd) == "hf_deit"
    mapped, _ = to_timm_names(sd, "hf_deit", "x")
    model = VisionTransformerDistilled(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                       num_classes=5, norm_layer=partial(torch.nn.LayerNorm, eps=1e-12)).eval()
    _timm_target(model, mapped)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("full", [False, True])
def test_hf_siglip_tower_maps_onto_timm_map_head(tmp_path, full):
    if full:
        ref, sd = _saved(transformers.SiglipModel(transformers.SiglipConfig(vision_config=TOWER, text_config=TEXT)),
                         tmp_path)
    else:
        ref, sd = _saved(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER)), tmp_path)
    assert detect_family_layout(sd) == "hf_siglip"
    mapped, notes = to_timm_names(sd, "hf_siglip", "x")
    assert bool(notes) == full
    model = _timm_target(_timm_vit(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                   class_token=False, global_pool="map", num_classes=0, act_layer="gelu_tanh"),
                         mapped)
    x = _images()
    with torch.no_grad():
        pooled = ref.get_image_features(pixel_values=x) if full else ref(x).pooler_output
        pooled = getattr(pooled, "pooler_output", pooled)
        torch.testing.assert_close(model(x), pooled, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["vision", "projection", "full"])
def test_hf_clip_tower_maps_onto_timm_pre_norm(tmp_path, kind):
    if kind == "full":
        ref, sd = _saved(transformers.CLIPModel(transformers.CLIPConfig(vision_config=TOWER, text_config=TEXT,
                                                                        projection_dim=24)), tmp_path)
    elif kind == "projection":
        ref, sd = _saved(transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**TOWER, projection_dim=24)), tmp_path)
    else:
        ref, sd = _saved(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER)), tmp_path)
    assert detect_family_layout(sd) == "hf_clip"
    mapped, _ = to_timm_names(sd, "hf_clip", "x")
    model = _timm_target(_timm_vit(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                   pre_norm=True, num_classes=0 if kind == "vision" else 24, act_layer="quick_gelu",
                                   norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)), mapped)
    x = _images()
    with torch.no_grad():
        if kind == "full":
            expected = ref.get_image_features(pixel_values=x)
            expected = getattr(expected, "pooler_output", expected)
        elif kind == "projection":
            expected = ref(x).image_embeds
        else:
            expected = ref(x).pooler_output
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
