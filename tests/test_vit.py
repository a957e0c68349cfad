"""The ViT model: parity with timm and Hugging Face on copied weights, and behaviour checks that can fail."""

import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.models import VisionTransformer, ViTConfig, sincos_2d_position_embedding

from .conftest import assert_checkpointing_keeps_gradients, randomize_

timm = pytest.importorskip("timm")

# (ours, timm name, parameter count): the counts of timm's models with 1000 classes (ViT-B/16: 86.6M, the paper's
# 86M in Table 1)
PARAM_COUNTS = [
    ("vit_ti16", "vit_tiny_patch16_224", 5_717_416),
    ("vit_s16", "vit_small_patch16_224", 22_050_664),
    ("vit_s32", "vit_small_patch32_224", 22_878_952),
    ("vit_b16", "vit_base_patch16_224", 86_567_656),
    ("vit_b32", "vit_base_patch32_224", 88_224_232),
    ("vit_b8", "vit_base_patch8_224", 86_576_872),
    ("vit_l16", "vit_large_patch16_224", 304_326_632),
    ("vit_base_patch16_384", "vit_base_patch16_384", 86_859_496),
]
# timm's defaults for L/32 and H/14 are the head-less ImageNet-21k models: the table's counts have no head
HEADLESS_COUNTS = [("vit_l32", "vit_large_patch32_224", 305_510_400), ("vit_h14", "vit_huge_patch14_224", 630_764_800)]


def _meta_params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize("ours,theirs,expected", PARAM_COUNTS)
def test_parameter_count_equals_timm_and_reference_table(ours, theirs, expected):
    assert _meta_params(lambda: vitlab.create_model(ours)) == expected
    assert _meta_params(lambda: timm.create_model(theirs, num_classes=1000)) == expected


@pytest.mark.parametrize("ours,theirs,expected", HEADLESS_COUNTS)
def test_parameter_count_headless_variants(ours, theirs, expected):
    assert _meta_params(lambda: vitlab.create_model(ours, num_classes=0)) == expected
    assert _meta_params(lambda: timm.create_model(theirs, num_classes=0)) == expected


def _copy_from_timm(ours: VisionTransformer, theirs: torch.nn.Module) -> None:
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize(
    "ours,theirs,kwargs,our_kwargs",
    [
        ("vit_ti16", "vit_tiny_patch16_224", {}, {}),
        ("vit_s32", "vit_small_patch32_224", {}, {}),
        ("vit_b16", "vit_base_patch16_224", {}, {}),
        ("vit_base_patch16_384", "vit_base_patch16_384", {}, {}),
        # global average pooling, timm style: mean over patch tokens, then fc_norm
        ("vit_s16", "vit_small_patch16_224", {"global_pool": "avg"}, {"pool": "gap", "norm_after_pool": True}),
        # global average pooling, big_vision style: no class token, norm on every token, then the mean
        ("vit_ti16", "vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False},
         {"pool": "gap", "class_token": False}),
    ],
)
def test_logits_match_timm_with_copied_weights(ours, theirs, kwargs, our_kwargs):
    reference = randomize_(timm.create_model(theirs, num_classes=7, **kwargs)).eval()
    model = vitlab.create_model(ours, num_classes=7, **our_kwargs).eval()
    _copy_from_timm(model, reference)
    x = torch.randn(2, 3, *model.cfg.img_size)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.abs().max() > 0.02  # a non-trivial output, not zeros compared with zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True),
                                   atol=1e-5, rtol=1e-5)


def test_logits_match_huggingface_vit_with_copied_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    hf_cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                                    image_size=64, patch_size=16, num_labels=5, layer_norm_eps=1e-6,
                                    hidden_act="gelu", qkv_bias=True)
    reference = randomize_(transformers.ViTForImageClassification(hf_cfg)).eval()
    model = vitlab.create_model("vit_ti16", depth=4, img_size=64, num_classes=5).eval()
    reference.save_pretrained(tmp_path)  # the on-disk names (transformers 5 renames modules in memory only)
    hf = load_file(tmp_path / "model.safetensors")
    ours = {
        "cls_token": hf["vit.embeddings.cls_token"],
        "pos_embed": hf["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["vit.layernorm.weight"],
        "norm.bias": hf["vit.layernorm.bias"],
        "head.weight": hf["classifier.weight"],
        "head.bias": hf["classifier.bias"],
    }
    for i in range(4):
        p = f"vit.encoder.layer.{i}."
        for part in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [hf[f"{p}attention.attention.{n}.{part}"] for n in ("query", "key", "value")])
            ours[f"blocks.{i}.attn.proj.{part}"] = hf[f"{p}attention.output.dense.{part}"]
            ours[f"blocks.{i}.norm1.{part}"] = hf[f"{p}layernorm_before.{part}"]
            ours[f"blocks.{i}.norm2.{part}"] = hf[f"{p}layernorm_after.{part}"]
            ours[f"blocks.{i}.mlp.fc1.{part}"] = hf[f"{p}intermediate.dense.{part}"]
            ours[f"blocks.{i}.mlp.fc2.{part}"] = hf[f"{p}output.dense.{part}"]
    model.load_state_dict(ours, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def _small(**kw) -> VisionTransformer:
    base = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_dim=64)
    base.update(kw)
    return randomize_(VisionTransformer(ViTConfig(**base)), std=0.2).eval()


def _manual_forward(model: VisionTransformer, x: torch.Tensor, scale: float) -> torch.Tensor:
    """An independent, loop-free restatement of the paper's equations (class token, 1D learned pos-emb)."""
    cfg = model.cfg
    P = cfg.patch_size[0]
    B, C, H, W = x.shape
    patches = x.unfold(2, P, P).unfold(3, P, P)  # (B, C, gh, gw, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * P * P)
    E = model.patch_embed.proj.weight.reshape(cfg.embed_dim, -1)
    z = patches @ E.T + model.patch_embed.proj.bias
    z = torch.cat([model.cls_token.expand(B, -1, -1), z], 1) + model.pos_embed
    for blk in model.blocks:
        h = F.layer_norm(z, (cfg.embed_dim,), blk.norm1.weight, blk.norm1.bias, cfg.norm_eps)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).chunk(3, dim=-1)
        heads = lambda t: t.reshape(B, -1, cfg.num_heads, cfg.embed_dim // cfg.num_heads).transpose(1, 2)
        a = ((heads(q) @ heads(k).transpose(-1, -2)) * scale).softmax(-1) @ heads(v)
        z = z + blk.attn.proj(a.transpose(1, 2).reshape(B, -1, cfg.embed_dim))
        h = F.layer_norm(z, (cfg.embed_dim,), blk.norm2.weight, blk.norm2.bias, cfg.norm_eps)
        z = z + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
    y = F.layer_norm(z[:, 0], (cfg.embed_dim,), model.norm.weight, model.norm.bias, cfg.norm_eps)
    return model.head(y)


def test_forward_equals_paper_equations_and_fails_on_wrong_attention_scale():
    model = _small()
    x = torch.randn(3, 3, 32, 32)
    head_dim = model.cfg.embed_dim // model.cfg.num_heads
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, _manual_forward(model, x, head_dim**-0.5), atol=1e-5, rtol=1e-4)
        wrong = _manual_forward(model, x, model.cfg.embed_dim**-0.5)  # scaling by the full width is a known bug
    assert (out - wrong).abs().max() > 1e-3


def test_position_embedding_layout_is_row_major_with_class_slot_first():
    """Moving a patch must change the output only through its position embedding: swapping two patches and their
    position-embedding rows (slot 0 is the class token) leaves the output unchanged; swapping the patches alone
    does not."""
    model = _small()
    x = torch.randn(1, 3, 32, 32)
    swapped = x.clone()
    # grid is 4x4 of 8x8 patches; patch (0, 1) is token 1+1, patch (2, 3) is token 1 + 2*4 + 3
    swapped[..., 0:8, 8:16], swapped[..., 16:24, 24:32] = x[..., 16:24, 24:32], x[..., 0:8, 8:16]
    with torch.no_grad():
        base = model(x)
        assert (model(swapped) - base).abs().max() > 1e-4
        pos = model.pos_embed.data
        pos[0, [2, 12]] = pos[0, [12, 2]]
        torch.testing.assert_close(model(swapped), base, atol=1e-5, rtol=1e-5)


def test_explicit_attention_probabilities_reproduce_fused_forward():
    model = _small(depth=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
        # the probabilities themselves give the first block's attention output
        blk = model.blocks[0]
        h = blk.norm1(model.embed(x))
        v = blk.attn.qkv(h).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)[2]
        out = blk.attn.proj((maps[0] @ v).transpose(1, 2).reshape(2, 17, 32))
        torch.testing.assert_close(out, blk.attn(h), atol=1e-5, rtol=1e-5)
    assert len(maps) == 3 and maps[0].shape == (2, 4, 17, 17)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 17))


def test_sincos_embedding_values_and_similarity_peak():
    pe = sincos_2d_position_embedding((3, 5), 16)
    assert pe.shape == (15, 16)
    # token (row 1, col 2): first quarter is sin(x * omega) with omega_0 = 1
    assert math.isclose(pe[1 * 5 + 2, 0].item(), math.sin(2.0), abs_tol=1e-6)
    assert math.isclose(pe[1 * 5 + 2, 8].item(), math.sin(1.0), abs_tol=1e-6)
    sim = F.normalize(pe, dim=1) @ F.normalize(pe, dim=1).T
    assert torch.equal(sim.argmax(dim=1), torch.arange(15))


@pytest.mark.parametrize("kind", ["learned", "learned_2d", "sincos", "none"])
def test_every_position_embedding_kind_on_non_square_grid(kind):
    model = _small(img_size=(24, 40), patch_size=(8, 4), pos_embed=kind)
    x = torch.randn(2, 3, 24, 40)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 3 * 10, 32)
    pos = model.position_embedding()
    if kind == "none":
        assert pos is None
    else:
        assert pos.shape[1] in (30, 31)
    if kind == "learned_2d":  # rows share their Y half, columns their X half
        assert torch.equal(pos[0, 0, :16], pos[0, 9, :16]) and torch.equal(pos[0, 0, 16:], pos[0, 10, 16:])
    model(x).sum().backward()


def test_learned_2d_needs_fewer_parameters_than_1d():
    one = _meta_params(lambda: vitlab.create_model("vit_b16", pos_embed="learned"))
    two = _meta_params(lambda: vitlab.create_model("vit_b16", pos_embed="learned_2d"))
    assert one - two == 197 * 768 - (14 + 14) * 384


def test_gelu_tanh_option_changes_output_slightly():
    exact, approx = _small(), _small(gelu="tanh")
    approx.load_state_dict(exact.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (exact(x) - approx(x)).abs().max().item()
    assert 0 < diff < 0.05
    assert approx.blocks[0].mlp.act.approximate == "tanh"


def test_reset_head_is_zero_initialised_and_drops_pre_logits():
    model = _small(representation_size=24)
    assert model.head.in_features == 24
    model.reset_head(3)
    assert isinstance(model.pre_logits, torch.nn.Identity) and model.cfg.representation_size is None
    assert model.head.out_features == 3 and model.head.in_features == 32
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head(torch.ones(1, 32))) == 0
    assert model.cfg.num_classes == 3


def test_pre_logits_is_dense_tanh():
    model = _small(representation_size=24)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        rep = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(rep, torch.tanh(model.pre_logits.fc(feats[:, 0])))
        torch.testing.assert_close(model(x), model.head(rep))


def test_dropout_and_stochastic_depth_are_active_only_in_training():
    model = _small(dropout=0.5, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert (model(x) - model(x)).abs().max() > 1e-4
    assert model.blocks[0].drop_path_rate == 0.0 and model.blocks[-1].drop_path_rate == 0.5


def test_gradient_checkpointing_gives_same_gradients():
    assert_checkpointing_keeps_gradients(_small().train(), torch.randn(2, 3, 32, 32))


def test_input_channels_and_shape_errors():
    model = _small(in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="expected input of shape"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not a positive multiple"):
        ViTConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(embed_dim=30, num_heads=4)


def test_autocast_and_compile_run_and_agree():
    model = _small()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.1)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = _small()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_registry_names_aliases_and_overrides():
    assert "vit_b16" in vitlab.list_models() and "vit_base_patch16_384" in vitlab.list_models(aliases=True)
    assert vitlab.get_config("vit_base_patch16_384").img_size == (384, 384)
    assert vitlab.get_config("vit_huge_patch14_518").num_patches == 37 * 37
    cfg = vitlab.get_config("vit_l16", num_classes=10, img_size=(256, 128))
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.grid_size) == (24, 1024, 16, 4096, (16, 8))
    with pytest.raises(KeyError, match="did you mean"):
        vitlab.create_model("vit_b61")
    with pytest.raises(ValueError, match="unknown ViT config keys"):
        vitlab.get_config("vit_b16", num_class=3)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


def test_key_biases_are_found_and_change_nothing_the_model_computes():
    """key_bias_slices finds the key part of every fused attention bias (the blocks' qkv, a MAP head's kv); any
    value there leaves the outputs as they are (softmax ignores a shift shared by all keys), which is why training
    may hold them still. Changing a query bias instead changes the outputs."""
    from vitlab.models import key_bias_slices

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64,
                                        num_classes=5, class_token=False, pool="map")).eval()
    randomize_(model, std=0.3)  # attention far from uniform, so a query bias matters
    found = key_bias_slices(model)
    assert [(tuple(b.shape), s) for b, s in found] == [((96,), slice(32, 64))] * 2 + [((64,), slice(0, 32))]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for bias, keys in found:
            bias[keys] += torch.randn(bias[keys].shape) * 3
        torch.testing.assert_close(model(x), before, atol=2e-5, rtol=1e-5)
        model.blocks[0].attn.qkv.bias[:32] += 1.0
        assert (model(x) - before).abs().max() > 1e-2
    model.blocks[1].attn.qkv.bias.requires_grad_(False)  # frozen biases are left out
    assert len(key_bias_slices(model)) == 2
