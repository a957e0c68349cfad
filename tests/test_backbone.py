"""ViT as a backbone: forward_intermediates against timm, hidden states against transformers, any input size at run
time (against timm's dynamic_img_size, transformers' interpolate_pos_encoding and a model built at that size), the
position-embedding cache, padding, bad input."""

import pytest
import torch

import vitlab
from vitlab.errors import VitlabError
from vitlab.models import VisionTransformer, ViTConfig
from vitlab.models.resample import resample_pos_embed

from .conftest import randomize_

timm = pytest.importorskip("timm")

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_dim=128, num_classes=5)


def _pair(**timm_kwargs):
    """A random timm ViT and a vitlab ViT with its weights (tiny: 4x4 grid, 4 blocks)."""
    theirs = randomize_(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=5,
        **timm_kwargs)).eval()
    return theirs


def _ours(theirs, **cfg):
    model = VisionTransformer(ViTConfig(**{**SMALL, **cfg})).eval()
    model.load_state_dict(theirs.state_dict(), strict=True)
    return model


def _assert_same(got, expected):
    if isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_same(g, e)
    elif isinstance(expected, dict):
        assert sorted(got) == sorted(expected)
        for k in expected:
            _assert_same(got[k], expected[k])
    else:
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("indices", [None, 2, [0, 2], [-1], (1, -3)])
@pytest.mark.parametrize("output_fmt", ["NCHW", "NLC"])
@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_equal_timm(indices, output_fmt, norm):
    theirs = _pair()
    ours = _ours(theirs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kwargs in ({}, {"intermediates_only": True}, {"return_prefix_tokens": True},
                       {"output_dict": True, "return_prefix_tokens": True}, {"stop_early": True,
                                                                              "intermediates_only": True}):
            expected = theirs.forward_intermediates(x, indices=indices, norm=norm, output_fmt=output_fmt, **kwargs)
            got = ours.forward_intermediates(x, indices=indices, norm=norm, output_fmt=output_fmt, **kwargs)
            _assert_same(got, expected)
    if output_fmt == "NCHW":
        maps = got if isinstance(got, list) else got[1]
        assert maps[0].shape == (2, 64, 4, 4)


@pytest.mark.parametrize("timm_kwargs,ours_kwargs", [
    ({"global_pool": "avg"}, {"pool": "gap", "norm_after_pool": True}),  # timm fc_norm: final norm is Identity
    ({"global_pool": "avg", "class_token": False, "fc_norm": False}, {"pool": "gap", "class_token": False}),
])
def test_forward_intermediates_equal_timm_for_gap_models(timm_kwargs, ours_kwargs):
    theirs = _pair(**timm_kwargs)
    ours = _ours(theirs, **ours_kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for norm in (False, True):
            _assert_same(ours.forward_intermediates(x, indices=[1, 3], norm=norm, return_prefix_tokens=True),
                         theirs.forward_intermediates(x, indices=[1, 3], norm=norm, return_prefix_tokens=True))


def test_prune_intermediate_layers_equal_timm():
    theirs = _pair()
    ours = _ours(theirs)
    assert ours.prune_intermediate_layers([0, 1]) == theirs.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(ours.blocks) == len(theirs.blocks) == 2 and ours.cfg.depth == 2 and ours.cfg.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_same(ours.forward_intermediates(x, indices=[0, 1]), theirs.forward_intermediates(x, indices=[0, 1]))
        assert ours(x).shape == (2, 64)  # head pruned: the pooled features


def _hf_pair(tmp_path, depth: int = 4, **cfg):
    """A random transformers ViT and a vitlab ViT read from its saved folder (on-disk names)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=depth,
                                    num_attention_heads=4, intermediate_size=128, num_labels=5,
                                    layer_norm_eps=1e-6)
    hf = randomize_(transformers.ViTForImageClassification(hf_cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    loaded = vitlab.load(tmp_path / "hf")
    ours = VisionTransformer(loaded.cfg.replace(**cfg)).eval()
    ours.load_state_dict(loaded.state_dict(), strict=True)
    return hf, ours


def test_hidden_states_equal_transformers_output_hidden_states(tmp_path):
    hf, ours = _hf_pair(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings + one per block
        final, blocks = ours.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
        assert len(hidden) == len(blocks) + 1
        torch.testing.assert_close(ours.embed(x), hidden[0], atol=1e-5, rtol=1e-5)
        for (patches, prefix), expected in zip(blocks, hidden[1:]):
            torch.testing.assert_close(torch.cat([prefix, patches], dim=1), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- dynamic size
@pytest.mark.parametrize("size", [(48, 48), (24, 40), (16, 64)])
def test_dynamic_size_matches_timm_dynamic_img_size(size):
    theirs = _pair(dynamic_img_size=True)
    ours = _ours(theirs, dynamic_img_size=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        _assert_same(ours.forward_intermediates(x, indices=2), theirs.forward_intermediates(x, indices=2))


@pytest.mark.parametrize("size", [(48, 48), (24, 40), (16, 16)])
def test_dynamic_size_matches_transformers_interpolate_pos_encoding(size, tmp_path):
    hf, ours = _hf_pair(tmp_path, depth=2, dynamic_img_size=True, dynamic_resample="bicubic_noaa")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = hf(pixel_values=x, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["bicubic", "bilinear_aligned", "bicubic_noaa", "nearest"])
@pytest.mark.parametrize("pos_embed", ["learned", "learned_2d", "sincos"])
def test_dynamic_size_equals_model_built_at_that_size(method, pos_embed):
    model = randomize_(VisionTransformer(ViTConfig(**SMALL, pos_embed=pos_embed, dynamic_img_size=True,
                                                   dynamic_resample=method))).eval()
    for size in ((48, 48), (24, 40)):
        built = VisionTransformer(ViTConfig(**{**SMALL, "img_size": size}, pos_embed=pos_embed)).eval()
        sd = dict(model.state_dict())
        grid = (size[0] // 8, size[1] // 8)
        if pos_embed == "learned":
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, (4, 4), 1, method)
        elif pos_embed == "learned_2d":
            from vitlab.models.resample import resample_1d
            sd["pos_embed_y"] = resample_1d(sd["pos_embed_y"], grid[0], method)
            sd["pos_embed_x"] = resample_1d(sd["pos_embed_x"], grid[1], method)
        built.load_state_dict(sd, strict=True)
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), built(x), atol=1e-5, rtol=1e-5)


def test_per_call_dynamic_size_on_a_fixed_model_and_class_slot_untouched():
    model = randomize_(VisionTransformer(ViTConfig(**SMALL))).eval()
    x = torch.randn(1, 3, 48, 32)
    with pytest.raises(VitlabError, match="dynamic_img_size=True"):
        model(x)
    with torch.no_grad():
        logits = model(x, dynamic_img_size=True)
        assert logits.shape == (1, 5)
        pos = model.position_embedding((6, 4))
    assert pos.shape == (1, 1 + 24, 64)
    torch.testing.assert_close(pos[:, :1], model.pos_embed[:, :1], rtol=0, atol=0)


def test_position_embedding_cache_reused_and_invalidated():
    model = randomize_(VisionTransformer(ViTConfig(**SMALL, dynamic_img_size=True))).eval()
    with torch.no_grad():
        first = model.position_embedding((6, 6))
        assert model.position_embedding((6, 6)) is first  # cached
        assert model.position_embedding((4, 4)) is model.pos_embed  # build grid: the parameter itself
        model.pos_embed.mul_(2.0)  # an in-place change (an optimiser step) invalidates the entry
        second = model.position_embedding((6, 6))
    assert second is not first
    torch.testing.assert_close(second[:, 1:], 2 * first[:, 1:])
    model.load_state_dict({**model.state_dict(), "pos_embed": torch.zeros_like(model.pos_embed)})
    with torch.no_grad():
        assert model.position_embedding((6, 6)).abs().max() == 0


def test_training_at_a_dynamic_size_sends_gradients_to_pos_embed():
    model = randomize_(VisionTransformer(ViTConfig(**SMALL, dynamic_img_size=True))).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 48, 40)
    before = model.pos_embed.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        assert model.pos_embed.grad is not None and model.pos_embed.grad[0, 1:].abs().sum() > 0
        opt.step()
    assert not torch.equal(before, model.pos_embed.detach())
    model.eval()
    with torch.no_grad():  # the cache now serves the trained values
        cached = model.position_embedding((6, 5))
        torch.testing.assert_close(cached, resample_pos_embed(model.pos_embed, (6, 5), (4, 4)))


def test_dynamic_img_pad_matches_timm():
    theirs = _pair(dynamic_img_size=True, dynamic_img_pad=True)
    ours = _ours(theirs, dynamic_img_size=True, dynamic_img_pad=True)
    x = torch.randn(2, 3, 30, 45)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        maps = ours.forward_intermediates(x, indices=1, intermediates_only=True)
    assert maps[0].shape == (2, 64, 4, 6)


def test_bad_input_gives_one_clear_error_each():
    model = VisionTransformer(ViTConfig(**SMALL, dynamic_img_size=True)).eval()
    with pytest.raises(VitlabError, match=r"input 4x32 is smaller than one 8x8 patch"):
        model(torch.randn(1, 3, 4, 32))
    with pytest.raises(VitlabError, match=r"input 36x32 is not a multiple of the 8x8 patch.*dynamic_img_pad"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(VitlabError, match=r"feature index 4 is out of range for 4 features"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[4])
    with pytest.raises(VitlabError, match=r"last-n count must be 1 to 4"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=5)
    with pytest.raises(VitlabError, match=r"expected input of shape \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    padded = VisionTransformer(ViTConfig(**SMALL, dynamic_img_size=True, dynamic_img_pad=True)).eval()
    with pytest.raises(VitlabError, match="smaller than one 8x8 patch"):
        padded(torch.randn(1, 3, 7, 32))


def test_hybrid_dynamic_size_and_intermediates_match_timm():
    theirs = randomize_(timm.create_model("vit_tiny_r_s16_p8_224", num_classes=7, dynamic_img_size=True)).eval()
    ours = vitlab.create_model("r_vit_ti16", num_classes=7, dynamic_img_size=True).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 96, 160)  # the token is 32 px (stem stride 4 x 8x8 patches): a 3x5 grid
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)
        _assert_same(ours.forward_intermediates(x, indices=[0, -1], norm=True),
                     theirs.forward_intermediates(x, indices=[0, -1], norm=True))
    with pytest.raises(VitlabError, match=r"not a multiple of the 32x32 token"):
        ours(torch.randn(1, 3, 96, 150))


# ----------------------------------------------------------------------------------------------- feature extractor
def test_feature_extractor_gives_nchw_maps_with_feature_info():
    from vitlab.models import FeatureExtractor

    model = randomize_(VisionTransformer(ViTConfig(**SMALL, dynamic_img_size=True))).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    backbone = FeatureExtractor(model, indices=(1, -2), output="dict")
    assert len(model.blocks) == 3 and model.cfg.num_classes == 0  # pruned after block 2, head dropped
    assert backbone.feature_info.channels() == [64, 64] and backbone.feature_info.reduction() == [8, 8]
    assert backbone.feature_info.module_name() == ["blocks.1", "blocks.2"]
    with torch.no_grad():
        maps = backbone(x)
    assert list(maps) == ["blocks.1", "blocks.2"]
    for got, want in zip(maps.values(), expected):
        assert got.shape == (2, 64, 6, 8)
        torch.testing.assert_close(got, want)


def test_bit_forward_intermediates_equal_timm():
    theirs = randomize_(timm.create_model("resnetv2_50x1_bit", num_classes=7)).eval()
    ours = vitlab.create_model("bit_r50x1", num_classes=7).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.feature_info == theirs.feature_info
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for indices in (None, 2, [0, -1]):
            for norm in (False, True):
                _assert_close_scaled(ours.forward_intermediates(x, indices=indices, norm=norm),
                                     theirs.forward_intermediates(x, indices=indices, norm=norm))


def _assert_close_scaled(got, expected):
    """Deep ResNet maps grow large: compare relative to each map's scale."""
    final, maps = got
    assert len(maps) == len(expected[1])
    for g, e in zip([final, *maps], [expected[0], *expected[1]]):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-5 * float(e.abs().max()), rtol=1e-4)


def test_hybrid_feature_extractor_offers_backbone_stages():
    from vitlab.models import FeatureExtractor

    model = vitlab.create_model("r_vit_fmnist", dynamic_img_size=True).eval()
    x = torch.randn(2, 1, 28, 56)
    with torch.no_grad():
        stages = model.patch_embed.backbone.forward_intermediates(x, intermediates_only=True)
        blocks = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
    backbone = FeatureExtractor(model, indices=[-1], backbone_indices=None)
    info = backbone.feature_info
    assert info.module_name() == ["patch_embed.backbone.stem.norm", "patch_embed.backbone.stages.0",
                                  "patch_embed.backbone.stages.1", f"blocks.{model.cfg.depth - 1}"]
    assert info.channels() == [32, 64, 128, 128] and info.reduction() == [1, 1, 2, 4]
    with torch.no_grad():
        maps = backbone(x)
    for got, want in zip(maps, [*stages, *blocks]):
        torch.testing.assert_close(got, want)
    assert [m.shape[-2:] for m in maps] == [(28, 56), (28, 56), (14, 28), (7, 14)]


# ----------------------------------------------------------------------------------------------- compute paths
def test_intermediates_same_with_sdpa_explicit_attention_and_gradient_checkpointing():
    model = randomize_(VisionTransformer(ViTConfig(**SMALL, dynamic_img_size=True)))
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        model.eval()
        fused = model.forward_intermediates(x, indices=[0, 3], intermediates_only=True)
        _, attn = model.forward_with_attention(x)
        assert attn[0].shape == (2, 4, 1 + 15, 1 + 15)  # the input's 5x3 grid
    model.train()
    model.set_grad_checkpointing(True)
    final, maps = model.forward_intermediates(x, indices=[0, 3])
    (final.sum() + sum(m.sum() for m in maps)).backward()
    assert model.pos_embed.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    for got, want in zip(maps, fused):
        torch.testing.assert_close(got.detach(), want)


def test_torch_compile_forward_intermediates_at_two_sizes():
    model = randomize_(VisionTransformer(ViTConfig(**{**SMALL, "depth": 2}, dynamic_img_size=True))).eval()
    compiled = torch.compile(model.forward_intermediates, backend="eager", dynamic=False)
    with torch.no_grad():
        for size in ((32, 32), (48, 40)):
            x = torch.randn(1, 3, *size)
            _assert_same(compiled(x, indices=[0, 1]), model.forward_intermediates(x, indices=[0, 1]))


# ----------------------------------------------------------------------------------------------- ONNX
@pytest.mark.slow
def test_onnx_export_of_a_dynamic_size_model_matches_pytorch_at_other_sizes(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.checkpoints import save
    from vitlab.cli import main
    from vitlab.compute.deploy import OnnxModel, check_parity, export_onnx

    model = randomize_(VisionTransformer(ViTConfig(**{**SMALL, "depth": 2}, dynamic_img_size=True)), std=0.1).eval()
    path = export_onnx(model, tmp_path / "dyn.onnx")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in (dims[0], dims[2], dims[3]))  # batch, height, width
    parity = check_parity(model, OnnxModel(path), batch_sizes=(2,), tolerance=1e-5, sizes=((48, 40), (16, 64)))
    assert set(parity.max_abs_diff) == {2, "48x40", "16x64"} and parity.ok, parity
    assert parity.max_abs_logit > 0.05
    save(model, tmp_path / "dyn.safetensors")
    assert main(["export-onnx", str(tmp_path / "dyn.safetensors"), str(tmp_path / "cli.onnx")]) == 0
    out = capsys.readouterr().out
    assert "dynamic batch, height and width" in out and "48x40" in out and "-> OK" in out


# ----------------------------------------------------------------------------------------------- attention tools
def test_attention_tools_follow_the_input_grid():
    from vitlab.inspect import attention_rollout, attention_statistics, mean_attention_distance

    model = randomize_(VisionTransformer(ViTConfig(**SMALL))).eval()
    images = torch.randn(3, 3, 40, 56)  # a 5x7 grid on a model built for 4x4
    stats = attention_statistics(model, images, rollout_images=2, dynamic_img_size=True)
    assert stats.grid_size == (5, 7) and stats.rollout.shape == (2, 5, 7)
    with torch.no_grad():
        _, attn = model.forward_with_attention(images, dynamic_img_size=True)
    torch.testing.assert_close(stats.mean_distance, mean_attention_distance(attn, (5, 7), (8, 8)))
    torch.testing.assert_close(stats.rollout, attention_rollout([a[:2] for a in attn], 1, (5, 7)))


@pytest.mark.slow
def test_inspect_command_at_another_image_size(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vitlab.cli import main

    model = vitlab.create_model("vit_fmnist", depth=2)
    vitlab.save(model, tmp_path / "m.safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (50, 60), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["inspect", str(tmp_path / "m.safetensors"), "--images", str(folder), "--out", str(tmp_path / "r"),
                 "--what", "distance,rollout", "--img-size", "36x44"]) == 0
    assert "at grid 9x11" in capsys.readouterr().out
    assert np.load(tmp_path / "r" / "inspection.npz")["rollout"].shape == (3, 9, 11)


def test_linear_probe_on_frozen_multi_layer_features_trains_only_the_head():
    """docs/backbone.md's worked example in small: four blocks' maps -> 1x1 conv -> upsampled per-pixel logits."""
    import torch.nn.functional as F

    from vitlab.models import FeatureExtractor

    model = randomize_(VisionTransformer(ViTConfig(**SMALL)))
    model.set_dynamic_img_size()
    backbone = FeatureExtractor(model, indices=4, norm=True).requires_grad_(False)
    head = torch.nn.Conv2d(sum(backbone.feature_info.channels()), 3, kernel_size=1)
    x, target = torch.randn(4, 3, 40, 48), torch.randint(0, 3, (4, 40, 48))
    with torch.no_grad():
        maps = backbone(x)
    logits = F.interpolate(head(torch.cat(maps, 1)), size=(40, 48), mode="bilinear")
    F.cross_entropy(logits, target).backward()
    assert logits.shape == (4, 3, 40, 48) and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(VitlabError, match="dynamic_resample"):
        model.set_dynamic_img_size(resample="cubic")


def test_position_embedding_cache_under_inference_mode():
    model = randomize_(VisionTransformer(ViTConfig(**SMALL, dynamic_img_size=True))).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.inference_mode():
        a = model(x)
        assert model.position_embedding((6, 6)) is model.position_embedding((6, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), a)
        assert not model.position_embedding((6, 6)).is_inference()


@pytest.mark.slow
def test_torch_compile_inductor_compiles_once_at_a_dynamic_size():
    model = randomize_(VisionTransformer(ViTConfig(**{**SMALL, "depth": 1}, dynamic_img_size=True))).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_forward_intermediates_equal_timm_where_the_cpu_fast_path_runs():
    """Width 192 and 260 token rows per product: large enough for the CPU fast path of the Linear layers."""
    theirs = randomize_(timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=5, dynamic_img_size=True)).eval()
    ours = VisionTransformer(ViTConfig(img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3, mlp_dim=768,
                                       num_classes=5, dynamic_img_size=True)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    from vitlab.compute.onednn import OneDnnLinear, onednn_linear_available, set_onednn_linear

    if not onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN inner product: there is no fast path to compare")
    set_onednn_linear(ours, True)  # explicitly: the machine's default depends on the CPU vendor
    assert isinstance(ours.blocks[0].attn.qkv, OneDnnLinear)
    x = torch.randn(4, 3, 64, 72)
    with torch.no_grad():
        _assert_same(ours.forward_intermediates(x, indices=[0, 1], norm=True),
                     theirs.forward_intermediates(x, indices=[0, 1], norm=True))


@pytest.mark.slow
def test_onnx_export_of_a_dynamic_size_hybrid_matches_pytorch_at_other_sizes(tmp_path):
    """A hybrid's token is the stem's stride times its patch: the exported height and width are multiples of that."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.compute.deploy import OnnxModel, check_parity, export_onnx

    model = randomize_(vitlab.create_model("r_vit_fmnist", depth=1, dynamic_img_size=True), std=0.1).eval()
    rh, rw = model.cfg.reduction
    path = export_onnx(model, tmp_path / "hybrid.onnx")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in (dims[0], dims[2], dims[3]))
    sizes = ((rh * 5, rw * 3), (rh * 2, rw * 8))
    parity = check_parity(model, OnnxModel(path), batch_sizes=(2,), tolerance=1e-4, sizes=sizes)
    assert parity.ok and parity.max_abs_logit > 0.05, parity
    assert set(parity.max_abs_diff) == {2, f"{rh * 5}x{rw * 3}", f"{rh * 2}x{rw * 8}"}
