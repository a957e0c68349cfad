"""ResNet + ViT hybrids: parameter counts and logits equal timm's on copied weights, SAME padding matters, the token
grid and the compute accounting follow the backbone's stride."""

import pytest
import torch

import vitlab
from vitlab.compute.flops import forward_macs, resnetv2_forward_macs
from vitlab.models import HybridConfig, HybridVisionTransformer, config_from_dict, family_of

from .conftest import randomize_
from .test_resnetv2 import count_conv_macs

timm = pytest.importorskip("timm")

# (ours, timm name, timm's parameter count with 1000 classes)
PARAM_COUNTS = [
    ("vit_base_r50_s16_384", "vit_base_r50_s16_384", 98_950_952),
    ("r26_vit_s32", "vit_small_r26_s32_224", 36_431_912),
    ("r_vit_ti16", "vit_tiny_r_s16_p8_224", 6_337_704),
    ("r50_vit_l32", "vit_large_r50_s32_224", None),
    ("r26_vit_b32", "vit_base_r26_s32_224", None),
]


def _meta_params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize("ours,theirs,expected", PARAM_COUNTS)
def test_parameter_count_equals_timm_and_reference_table(ours, theirs, expected):
    count = _meta_params(lambda: vitlab.create_model(ours, num_classes=1000))
    assert count == _meta_params(lambda: timm.create_model(theirs, num_classes=1000))
    if expected:
        assert count == expected


def _compare_with_timm(ours: str, theirs: str, **our_overrides):
    reference = randomize_(timm.create_model(theirs, num_classes=7)).eval()
    model = vitlab.create_model(ours, num_classes=7, **our_overrides).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, *model.cfg.img_size)
    with torch.no_grad():
        return model, reference, x, model(x), reference(x)


@pytest.mark.parametrize("ours,theirs", [
    ("vit_tiny_r_s16_p8_224", "vit_tiny_r_s16_p8_224"),
    ("vit_small_r26_s32_224", "vit_small_r26_s32_224"),
    pytest.param("vit_base_r50_s16_384", "vit_base_r50_s16_384", marks=pytest.mark.slow),
])
def test_logits_match_timm_with_copied_weights(ours, theirs):
    model, reference, x, got, expected = _compare_with_timm(ours, theirs)
    assert expected.abs().max() > 0.02
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), atol=1e-4, rtol=1e-4)


def test_same_padding_is_what_makes_the_hybrid_match():
    """The R+Ti/16 stem with BiT's symmetric padding instead of TF "SAME" gives other tokens (and logits) on the
    same weights, far outside the parity tolerance, so the parity test above checks the padding."""
    cfg = vitlab.get_config("r_vit_ti16", num_classes=7)
    wrong = HybridVisionTransformer(cfg.replace(backbone=cfg.backbone.replace(padding="bit"))).eval()
    model, reference, x, got, expected = _compare_with_timm("r_vit_ti16", "vit_tiny_r_s16_p8_224")
    wrong.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed(x), reference.patch_embed(x), atol=1e-5, rtol=1e-4)
        assert (wrong.patch_embed(x) - reference.patch_embed(x)).abs().max() > 1e-2
        assert (wrong(x) - expected).abs().max() > 10 * (got - expected).abs().max() + 1e-4


@pytest.mark.parametrize("name,grid,tokens", [
    ("vit_base_r50_s16_384", (24, 24), 577),
    ("vit_base_r50_s16_224", (14, 14), 197),
    ("r26_vit_s32", (7, 7), 50),
    ("vit_tiny_r_s16_p8_384", (12, 12), 145),
    ("r_vit_fmnist", (7, 7), 50),
])
def test_token_grid_follows_backbone_stride(name, grid, tokens):
    cfg = vitlab.get_config(name)
    assert cfg.grid_size == grid and cfg.num_patches + cfg.num_prefix_tokens == tokens
    assert cfg.backbone.img_size == cfg.img_size and cfg.backbone.num_classes == 0


def test_hybrid_compute_is_backbone_plus_transformer():
    cfg = vitlab.get_config("r_vit_fmnist")
    model = vitlab.create_model("r_vit_fmnist").eval()
    convs = count_conv_macs(model.patch_embed, torch.randn(1, 1, 28, 28))  # backbone convs + patch projection
    g, (ph, pw), D, C = cfg.num_patches, cfg.patch_size, cfg.embed_dim, cfg.backbone.num_features
    assert convs == resnetv2_forward_macs(cfg.backbone, include_head=False) + g * ph * pw * C * D
    # the same transformer on a 7x7 grid of 4x4 pixel patches
    plain = vitlab.get_config("vit_fmnist", embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                              mlp_dim=cfg.mlp_dim, pool=cfg.pool, class_token=cfg.class_token, pos_embed=cfg.pos_embed)
    assert forward_macs(cfg) - forward_macs(plain) == convs - plain.num_patches * 16 * plain.embed_dim


def test_config_overrides_round_trip_and_errors():
    cfg = vitlab.get_config("r50_vit_b16", img_size=384, num_classes=10, in_chans=1)
    assert isinstance(cfg, HybridConfig) and cfg.backbone.img_size == (384, 384) and cfg.backbone.in_chans == 1
    assert family_of(cfg).name == "hybrid"
    assert config_from_dict(cfg.to_dict(), "hybrid") == cfg
    with pytest.raises(ValueError, match="unknown ViT config keys"):
        vitlab.ViTConfig.from_dict(cfg.to_dict())  # a hybrid is never silently read as a plain ViT
    with pytest.raises(ValueError, match="backbone stride 16"):
        vitlab.get_config("r50_vit_b16", img_size=200)


def test_hybrid_trains_end_to_end_with_attention_and_checkpointing():
    model = randomize_(vitlab.create_model("r_vit_fmnist", depth=2), std=0.1).train()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits, maps = model.eval().forward_with_attention(x)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 50, 50)
    model.train()
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert model.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
