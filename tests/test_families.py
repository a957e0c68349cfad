"""The post-2021 families (DeiT, DeiT III, DINOv2 with and without registers, SigLIP / SigLIP 2, CLIP image towers)
against timm: every registry entry has timm's parameter names, shapes and count (built on the meta device), and a
small instance of each family's timm model function (same options, tiny width and depth) holding random weights
loads strictly into vitlab and gives the same outputs, at its build size and at another size with
dynamic_img_size, and the same forward_intermediates prefix tokens."""

import pytest
import torch

import vitlab
from vitlab.errors import VitlabError
from vitlab.models import ViTConfig, get_config, model_from_config
from vitlab.models.registry import _ENTRIES

from .checkpoint_fixtures import randomize_weights_

timm = pytest.importorskip("timm")

FAMILY_PREFIXES = ("deit", "dinov2", "siglip", "clip")
FAMILY_ALIASES = [(entry.name, alias) for entry in _ENTRIES.values() if entry.name.startswith(FAMILY_PREFIXES)
                  for alias in entry.aliases]

# SigLIP was trained with the tanh GELU (big_vision's default, transformers' gelu_pytorch_tanh); timm's model functions
# of the first SigLIP release build an erf GELU, so the oracle is told the activation the weights were trained with
SIGLIP_ACT = {"act_layer": "gelu_tanh"}


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,alias", FAMILY_ALIASES, ids=[a for _, a in FAMILY_ALIASES])
def test_registry_entry_has_timm_names_shapes_and_parameter_count(name, alias):
    cfg = get_config(alias)
    with torch.device("meta"):
        ours = model_from_config(cfg)
        theirs = timm.create_model(alias, pretrained=False, num_classes=cfg.num_classes)
    assert _shapes(ours) == _shapes(theirs)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    assert cfg.img_size == tuple(theirs.patch_embed.img_size)
    assert cfg.num_prefix_tokens == theirs.num_prefix_tokens


def test_headline_parameter_counts_with_timm_pretrained_heads():
    """Against timm's tagged names, whose num_classes comes from the published weights (CLIP projections 512 / 768,
    DINOv2 and SigLIP headless, DeiT 1000 classes)."""
    for name, tagged in [("clip_b16_quickgelu", "vit_base_patch16_clip_quickgelu_224.openai"),
                         ("clip_l14", "vit_large_patch14_clip_224.laion2b"),
                         ("dinov2_s14_reg4", "vit_small_patch14_reg4_dinov2.lvd142m"),
                         ("siglip_so400m14", "vit_so400m_patch14_siglip_384.webli"),
                         ("deit_b16_distilled", "deit_base_distilled_patch16_384.fb_in1k")]:
        with torch.device("meta"):
            theirs = timm.create_model(tagged, pretrained=False)
            ours = vitlab.create_model(name, img_size=theirs.patch_embed.img_size)
        assert ours.num_params() == sum(p.numel() for p in theirs.parameters()), tagged


# family -> (vitlab name, timm model function, extra timm kwargs, vitlab overrides beyond SMALL);
# every case is the family's real timm function with a tiny width / depth / patch
SMALL_TIMM = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=7, img_size=28)
SMALL_OURS = dict(embed_dim=64, depth=2, num_heads=4, mlp_dim=128, patch_size=7, img_size=28)
CASES = {
    "deit": ("deit_s16", "deit_small_patch16_224", {}, {}),
    "deit_distilled": ("deit_s16_distilled", "deit_small_distilled_patch16_224", {}, {}),
    "deit3": ("deit3_b16", "deit3_base_patch16_224", {}, {}),
    "dinov2": ("dinov2_s14", "vit_small_patch14_dinov2", {}, {}),
    "dinov2_reg4": ("dinov2_b14_reg4", "vit_base_patch14_reg4_dinov2", {}, {}),
    "dinov2_swiglu_reg4": ("dinov2_g14_reg4", "vit_giant_patch14_reg4_dinov2", {"mlp_ratio": 4.0}, {}),
    "siglip": ("siglip_b16", "vit_base_patch16_siglip_224", SIGLIP_ACT, {}),
    "siglip_so400m_remainder": ("siglip_so400m14", "vit_so400m_patch14_siglip_384", {**SIGLIP_ACT, "img_size": 31},
                                {"img_size": 31}),
    "clip": ("clip_b16", "vit_base_patch16_clip_224", {}, {}),
    "clip_quickgelu": ("clip_l14_quickgelu", "vit_large_patch14_clip_quickgelu_224", {}, {}),
}


def _family_pair(case: str, num_classes: int = 5, **dynamic):
    name, fn, timm_extra, ours_extra = CASES[case]
    theirs = timm.create_model(fn, pretrained=False, num_classes=num_classes, **{**SMALL_TIMM, **timm_extra},
                               **dynamic)
    randomize_weights_(theirs.eval())
    ours = vitlab.create_model(name, num_classes=num_classes, **{**SMALL_OURS, **ours_extra}, **dynamic).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _assert_close(got, expected):
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * max(scale, 1e-6), (got - expected).abs().max().item()


@pytest.mark.parametrize("num_classes", [5, 0])
@pytest.mark.parametrize("case", list(CASES))
def test_family_outputs_equal_timm(case, num_classes):
    theirs, ours = _family_pair(case, num_classes)
    size = ours.cfg.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_close(ours(x), theirs(x))
        _assert_close(ours.forward_features(x), theirs.forward_features(x))
        _assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                      theirs.forward_head(theirs.forward_features(x), pre_logits=True))
    assert ours.num_prefix_tokens == theirs.num_prefix_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_family_dynamic_size_equals_timm(case):
    theirs, ours = _family_pair(case, dynamic_img_size=True)
    x = torch.randn(2, 3, 42, 35, generator=torch.Generator().manual_seed(1))  # a 6x5 grid
    with torch.no_grad():
        _assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("case", ["dinov2_reg4", "deit_distilled", "siglip", "clip"])
def test_forward_intermediates_prefix_tokens_equal_timm(case):
    theirs, ours = _family_pair(case)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, output_fmt="NLC",
                                         output_dict=True)
        expected = theirs.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, output_fmt="NLC",
                                                output_dict=True)
    assert sorted(got) == sorted(expected)
    for key in expected:
        values = expected[key] if isinstance(expected[key], list) else [expected[key]]
        mine = got[key] if isinstance(got[key], list) else [got[key]]
        for g, e in zip(mine, values):
            _assert_close(g, e)
    if ours.num_prefix_tokens:
        assert got["image_intermediates_prefix"][0].shape[1] == ours.cfg.num_prefix_tokens


def test_distilled_training_returns_both_heads_like_timm():
    theirs, ours = _family_pair("deit_distilled")
    theirs.set_distilled_training(True)
    ours.set_distilled_training(True)
    theirs.train()
    ours.train()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    got, expected = ours(x), theirs(x)
    assert isinstance(got, tuple) and len(got) == 2
    for g, e in zip(got, expected):
        _assert_close(g.detach(), e.detach())
    ours.eval()
    _assert_close(ours(x).detach(), ((expected[0] + expected[1]) / 2).detach())


def test_prefix_tokens_are_one_concept():
    cfg = get_config("dinov2_s14_reg4")
    assert cfg.num_prefix_tokens == 5 and cfg.prefix_token_names == ("class", "reg0", "reg1", "reg2", "reg3")
    assert cfg.num_pos_prefix == 0
    assert get_config("deit_b16_distilled").prefix_token_names == ("class", "dist")
    assert get_config("deit_b16_distilled").num_pos_prefix == 2
    assert get_config("siglip_b16").num_prefix_tokens == 0
    assert get_config("vit_b16").prefix_token_names == ("class",)


@pytest.mark.parametrize("changes,message", [
    ({"pool": "map", "mlp_type": "swiglu"}, "does not combine with mlp_type"),
    ({"distilled": True, "class_token": False, "pool": "gap"}, "distilled=True needs class_token"),
    ({"distilled": True, "reg_tokens": 2}, "does not combine with reg_tokens"),
    ({"layer_scale": 0.0}, "layer_scale must be"),
    ({"reg_tokens": -1}, "reg_tokens must be"),
    ({"gelu": "relu"}, "gelu must be"),
    ({"mlp_type": "geglu"}, "mlp_type must be"),
    ({"img_size": 30, "patch_size": 7}, "not a positive multiple"),
])
def test_bad_family_options_are_named(changes, message):
    with pytest.raises(VitlabError, match=message):
        ViTConfig(**{**SMALL_OURS, **changes})


def test_existing_models_are_unchanged_by_the_new_options():
    """Defaults leave the paper's ViT as it was: no new parameters or modules with parameters."""
    model = vitlab.create_model("vit_ti16")
    keys = set(model.state_dict())
    assert not any(k.startswith(("reg_token", "dist_token", "norm_pre", "attn_pool", "head_dist")) or ".ls" in k
                   for k in keys)
    assert model.patch_embed.proj.bias is not None


def test_config_round_trip_keeps_the_family_options():
    cfg = get_config("siglip_so400m14", img_size=384)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    cfg = get_config("dinov2_g14_reg4")
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------------------------- inspection
def _by_hand_rollout(maps, first_patch: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """Rollout written out: A_l = (mean-over-heads attention + I) / 2, multiplied from the first layer; the class
    row (or ``start``, a row over the last layer's patch outputs), keeping the patch columns."""
    T = maps[0].shape[-1]
    rollout = torch.eye(T, dtype=torch.float64)
    for layer in maps:
        rollout = 0.5 * (layer.double().mean(dim=1) + torch.eye(T, dtype=torch.float64)) @ rollout
    row = rollout[:, 0] if start is None else (start.unsqueeze(1) @ rollout[:, first_patch:])[:, 0]
    return row[:, first_patch:]


def test_inspection_of_a_dinov2_reg_model_uses_the_patch_tokens_only():
    """Attention distance, rollout and position-embedding similarity of a model with a class token and 4 registers
    equal the same computations written out by hand on the patch tokens (5 prefix tokens left out)."""
    from vitlab.inspect import attention_statistics, position_embedding_similarity

    _, model = _family_pair("dinov2_reg4")
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    stats = attention_statistics(model, images, rollout_images=3)
    with torch.no_grad():
        _, maps = model.forward_with_attention(images)
    p, (gh, gw) = 5, model.cfg.grid_size
    assert maps[0].shape[-1] == p + gh * gw
    ys, xs = torch.meshgrid(torch.arange(gh) * 7.0, torch.arange(gw) * 7.0, indexing="ij")
    centres = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).double()
    dist = ((centres[:, None] - centres[None]) ** 2).sum(-1).sqrt()  # (N, N) pixels
    expected = []
    for layer in maps:
        patches = layer[..., p:, p:].double()
        patches = patches / patches.sum(-1, keepdim=True)
        expected.append((patches * dist).sum(-1).mean(dim=(0, 2)))  # (heads,)
    torch.testing.assert_close(stats.mean_distance, torch.stack(expected).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.rollout, _by_hand_rollout(maps, p).reshape(3, gh, gw).float(),
                               rtol=1e-5, atol=1e-6)
    pos = torch.nn.functional.normalize(model.pos_embed[0].detach().double(), dim=-1)  # patch rows only
    assert model.pos_embed.shape[1] == gh * gw
    torch.testing.assert_close(position_embedding_similarity(model), (pos @ pos.T).reshape(gh, gw, gh, gw).float())


def test_rollout_of_a_map_model_starts_from_the_pooling_probe():
    from vitlab.inspect import attention_statistics

    _, model = _family_pair("siglip", num_classes=0)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    stats = attention_statistics(model, images, rollout_images=2)
    with torch.no_grad():
        pooled, maps, probe = model.forward_with_attention(images, return_pool_attention=True)
        torch.testing.assert_close(pooled, model(images))
    start = probe.double().mean(dim=1)[:, 0]
    expected = _by_hand_rollout(maps, 0, start / start.sum(-1, keepdim=True))
    torch.testing.assert_close(stats.rollout, expected.reshape(2, 4, 4).float(), rtol=1e-5, atol=1e-6)


def test_features_for_few_shot_on_register_and_map_models():
    from vitlab.evaluate.features import output_function

    _, reg = _family_pair("dinov2_reg4", num_classes=0)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = reg.forward_features(x)
        torch.testing.assert_close(output_function(reg, "cls_token")(x), tokens[:, 0])
        torch.testing.assert_close(output_function(reg, "gap")(x), tokens[:, 5:].mean(dim=1))
    _, siglip = _family_pair("siglip", num_classes=0)
    with pytest.raises(VitlabError, match="needs a model with a class token"):
        output_function(siglip, "cls_token")


# ----------------------------------------------------------------------------------------------- timm files
@pytest.mark.parametrize("case", list(CASES))
def test_timm_state_dict_file_of_each_family_loads_with_the_right_architecture(case, tmp_path):
    """A timm state dict (no name given) is read into the family's options from its keys and shapes alone; the
    numerics a state dict cannot show (GELU kind, LayerNorm eps) are timm's defaults, so outputs are compared where
    those are the family's."""
    from safetensors.torch import save_file

    theirs, ours = _family_pair(case)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    loaded = vitlab.load(path)
    structural = ("class_token", "reg_tokens", "distilled", "no_embed_class", "pre_norm", "patch_bias", "pool",
                  "mlp_type", "mlp_dim", "num_classes", "embed_dim", "depth")
    assert {f: getattr(loaded.cfg, f) for f in structural} == {f: getattr(ours.cfg, f) for f in structural}
    assert (loaded.cfg.layer_scale is None) == (ours.cfg.layer_scale is None)
    if ours.cfg.gelu == "exact" and ours.cfg.norm_eps == 1e-6 and not ours.cfg.drop_remainder:
        # a fused qkv does not record the head count (the loader assumes width / 64): set the test's 4 heads
        rebuilt = model_from_config(loaded.cfg.replace(num_heads=4)).eval()
        rebuilt.load_state_dict(loaded.state_dict(), strict=True)
        x = torch.randn(2, 3, 28, 28)
        with torch.no_grad():
            _assert_close(rebuilt(x), theirs(x))


@pytest.mark.slow  # a full-width ViT-S (22M parameters) through a Hub cache: about 15 s here
def test_timm_hub_repo_of_a_dinov2_reg_model_loads_by_its_timm_architecture(tmp_path, monkeypatch):
    """``hf-hub:timm/vit_small_patch14_reg4_dinov2...``-style: timm's config.json names the architecture, which
    resolves to ``dinov2_s14_reg4``; the weights load strictly and give timm's features (full width and depth at a
    56 px grid to keep it small)."""
    from safetensors.torch import save_file

    from .hub_fixtures import lay_out_hub_cache

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "vitlab-home"))
    monkeypatch.delenv("VITLAB_OFFLINE", raising=False)
    theirs = randomize_weights_(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56)).eval()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(weights))
    config = {"architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0, "num_features": 384,
              "global_pool": "token",
              "pretrained_cfg": {"tag": "lvd142m", "input_size": [3, 56, 56], "interpolation": "bicubic",
                                 "crop_pct": 1.0, "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "num_classes": 0}}
    lay_out_hub_cache(tmp_path / "hf-hub", "timm/vit_small_patch14_reg4_dinov2.lvd142m",
                      {"config.json": config, "model.safetensors": weights.read_bytes()})
    ours = vitlab.load("hf-hub:timm/vit_small_patch14_reg4_dinov2.lvd142m")
    assert ours.cfg == get_config("dinov2_s14_reg4", img_size=56)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _assert_close(ours(x), theirs(x))
        # a larger input, as DINOv2 features are used: resampled at run time like timm's dynamic_img_size
        ours.set_dynamic_img_size(True)
        big = torch.randn(1, 3, 70, 70)
        dyn = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, dynamic_img_size=True).eval()
        dyn.load_state_dict(theirs.state_dict())
        _assert_close(ours(big), dyn(big))


# ----------------------------------------------------------------------------------------------- other tools
def test_vitlab_format_round_trip_and_flexivit_patch_resample_of_a_register_model(tmp_path):
    _, model = _family_pair("dinov2_reg4")
    vitlab.save(model, tmp_path / "reg.safetensors")
    back = vitlab.load(tmp_path / "reg.safetensors")
    assert back.cfg == model.cfg
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    flexi = vitlab.load(tmp_path / "reg.safetensors", patch_size=14, img_size=56)  # FlexiViT kernel resize
    assert flexi.cfg.grid_size == (4, 4) and flexi.cfg.reg_tokens == 4
    with torch.no_grad():
        assert flexi(torch.randn(1, 3, 56, 56)).shape == (1, 5)


def test_feature_extractor_and_training_controls_know_the_prefix_tokens():
    from vitlab.models import FeatureExtractor
    from vitlab.train.transfer import layer_id, linear_probe

    _, model = _family_pair("dinov2_reg4")
    maps = FeatureExtractor(model, indices=[0, 1])(torch.randn(2, 3, 28, 28))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 4)] * 2
    assert layer_id("reg_token", 2) == 0 and layer_id("norm_pre.weight", 2) == 0 and layer_id("dist_token", 2) == 0
    _, distilled = _family_pair("deit_distilled")
    frozen = linear_probe(distilled)
    trained = {n for n, p in distilled.named_parameters() if p.requires_grad}
    assert trained == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"} and "dist_token" in frozen


def test_forward_macs_count_the_swiglu_and_map_head_products():
    from vitlab.compute.counting import count_config_macs
    from vitlab.compute.flops import forward_macs

    for name in ("dinov2_g14", "siglip_b16", "dinov2_s14_reg4"):
        cfg = get_config(name, img_size=56 if name.startswith("dinov2") else 64, depth=2)
        assert forward_macs(cfg) == count_config_macs(cfg, include_head=True), name


@pytest.mark.slow
def test_onnx_export_of_register_and_map_models_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.compute.deploy import OnnxModel, check_parity, export_onnx

    for case in ("dinov2_reg4", "siglip", "deit_distilled"):
        _, model = _family_pair(case)
        path = export_onnx(model, tmp_path / f"{case}.onnx")
        parity = check_parity(model, OnnxModel(path), batch_sizes=(1, 3), tolerance=1e-4)
        assert parity.ok, (case, parity)


def test_timm_hub_repo_of_a_drop_remainder_model_keeps_the_published_size(tmp_path, monkeypatch):
    """SigLIP So400m/14 at 384 px: its weights show a 27x27 grid (378 px), its repo says 384 px; the loaded model
    takes 384 px images like timm's. A small stand-in family entry keeps the file small."""
    from safetensors.torch import save_file

    from vitlab.models import ModelEntry, register
    from vitlab.models.registry import _ALIASES

    from .hub_fixtures import lay_out_hub_cache

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "vitlab-home"))
    theirs, ours = _family_pair("siglip_so400m_remainder", num_classes=0)
    register(ModelEntry("test_tiny_so400m14", ours.cfg.replace(img_size=28), "test stand-in",
                        ("vit_test_tiny_siglip_31",)))
    try:
        weights = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(weights))
        config = {"architecture": "vit_test_tiny_siglip_31", "num_classes": 0,
                  "pretrained_cfg": {"input_size": [3, 31, 31], "interpolation": "bicubic", "crop_pct": 1.0,
                                     "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 0}}
        lay_out_hub_cache(tmp_path / "hf-hub", "timm/vit_test_tiny_siglip_31.webli",
                          {"config.json": config, "model.safetensors": weights.read_bytes()})
        loaded = vitlab.load("hf-hub:timm/vit_test_tiny_siglip_31.webli")
    finally:
        _ENTRIES.pop("test_tiny_so400m14")
        _ALIASES.pop("vit_test_tiny_siglip_31")
    assert loaded.cfg.img_size == (31, 31) and loaded.cfg.grid_size == (4, 4) and loaded.cfg.gelu == "tanh"
    assert loaded.preprocessing.img_size == (31, 31)
    x = torch.randn(2, 3, 31, 31)
    with torch.no_grad():
        _assert_close(loaded(x), theirs(x))


def test_serve_explains_a_map_model_from_its_pooling_probe():
    from vitlab.inspect import attention_statistics
    from vitlab.serve.engine import Engine

    _, model = _family_pair("siglip")
    engine = Engine(model, name="siglip-tiny")
    assert engine.can_explain and engine.rollout_source == "probe"
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    probs, maps = engine.explain(images)
    assert probs.shape == (2, 5)
    torch.testing.assert_close(maps, attention_statistics(model, images, rollout_images=2).rollout)
