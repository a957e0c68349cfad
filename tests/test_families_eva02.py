"""EVA-02 (rope_kind='eva', mlp_norm) against timm's ``eva02_*`` (Eva). Tiny instances hold random weights; vitlab
reads their files (timm's state dict, a timm Hub repo, and BAAI's original layout made from the same weights and
checked through timm's own ``checkpoint_filter_fn``) and must give the same logits, tokens and intermediates within
1e-5, at the build size and at another, non-square size (the learned table resampled, the rotary embedding
recomputed for the grid). The registry entries have timm's parameter counts (built on the meta device)."""

import pytest
import safetensors.torch
import torch

import vitlab
from vitlab.checkpoints.family_layouts import detect_family_layout
from vitlab.errors import InvalidValueError, VitlabError
from vitlab.models import ViTConfig, get_config, model_from_config
from vitlab.models.vit import rope_eva

from .checkpoint_fixtures import randomize_weights_
from .hub_fixtures import lay_out_hub_cache, offline_hub_cache

timm = pytest.importorskip("timm")

SIZES = {"tiny": (192, 12), "small": (384, 12), "base": (768, 12), "large": (1024, 24)}  # width, depth
TUNED = {"tiny": 336, "small": 336, "base": 448, "large": 448}
# Ti (fused qkv, packed SwiGLU) and B (separate q / k / v, SwiGLU halves with the sub-LN): timm's two block layouts
ARCHS = ["eva02_tiny_patch14_224", "eva02_base_patch14_448"]
TINY = dict(embed_dim=128, depth=2, num_heads=2, img_size=56, num_classes=5)  # 4x4 grid of 14-pixel patches,
# head width 64 (the standard heads of width 128: a file without a name gives 2)
OTHER = (42, 70)  # another, non-square grid (3x5)


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def _images(size=(56, 56), n=2):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def _timm(name, **kw):
    model = timm.create_model(name, pretrained=False, **{**TINY, **kw})
    return randomize_weights_(model).eval()


def _save_timm(model, path):
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _baai_layout(ref, mim=False):
    """BAAI's names (EVA-02's modeling_finetune.py / modeling_pretrain.py) for a timm model's weights: the inverse
    of the renames in timm's checkpoint_filter_fn, plus the rotary tables BAAI's files carry."""
    sd = {}
    for k, v in ref.state_dict().items():
        k = k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.").replace("mlp.fc2.", "mlp.w3.")
        k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.norm.", "mlp.ffn_ln.")
        k = k.replace("attn.q_proj.bias", "attn.q_bias").replace("attn.v_proj.bias", "attn.v_bias")
        sd[k] = v.clone()
    head_dim = ref.embed_dim // ref.blocks[0].attn.num_heads
    sd["rope.freqs_cos"] = torch.ones(ref.patch_embed.num_patches, head_dim)
    sd["rope.freqs_sin"] = torch.zeros(ref.patch_embed.num_patches, head_dim)
    if mim:  # pre-training: the final norm on all tokens, a mask token and the MIM head, no classifier
        sd = {k.replace("fc_norm.", "norm."): v for k, v in sd.items() if not k.startswith("head.")}
        sd["mask_token"] = torch.zeros(1, 1, ref.embed_dim)
        sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(7, ref.embed_dim), torch.zeros(7)
    return {"model": sd}


def _compare(model, ref, sizes):
    for size in sizes:
        x = _images(size)
        with torch.no_grad():
            _close(model(x, dynamic_img_size=True), ref(x))
            _close(model.forward_features(x, dynamic_img_size=True), ref.forward_features(x))
            _close(model.forward_head(model.forward_features(x, dynamic_img_size=True), pre_logits=True),
                   ref.forward_head(ref.forward_features(x), pre_logits=True))
            for fmt in ("NCHW", "NLC"):
                ours = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, output_fmt=fmt,
                                                   norm=True, dynamic_img_size=True)
                theirs = ref.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, output_fmt=fmt,
                                                   norm=True)
                _close(ours[0], theirs[0])
                for (a, a_prefix), (b, b_prefix) in zip(ours[1], theirs[1]):
                    _close(a, b)
                    _close(a_prefix, b_prefix)


# ------------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("size", sorted(SIZES))
def test_registry_entries_have_timms_parameter_counts(size):
    dim, depth = SIZES[size]
    for res in (224, TUNED[size]):
        name = f"eva02_{size}_patch14_{res}"
        with torch.device("meta"):
            ours = vitlab.create_model(name)
            theirs = timm.create_model(name, pretrained=False)
        # vitlab stores the key third of the q/k/v bias (zeros, held out of the sum); timm keeps q_bias / v_bias
        assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) + depth * dim
        assert ours.cfg.img_size == tuple(theirs.patch_embed.img_size) == (res, res)
        assert ours.cfg.num_classes == theirs.num_classes == (0 if res == 224 else 1000)
    short = vitlab.models.get_config(f"eva02_{size[0]}14")
    assert short == get_config(f"eva02_{size}_patch14_224")
    assert short.mlp_norm == (size in ("base", "large")) and short.rope_ref_grid == (16, 16)


# ------------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("name", ARCHS)
def test_timm_state_dict_gives_timms_outputs_at_the_build_and_another_size(tmp_path, name):
    ref = _timm(name)
    assert detect_family_layout(ref.state_dict()) == "timm_eva02"
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors")).eval()
    cfg = model.cfg
    assert (cfg.rope_kind, cfg.rope_base, cfg.rope_ref_grid, cfg.pos_embed, cfg.mlp_type) == \
        ("eva", 10000.0, (16, 16), "learned", "swiglu")
    assert (cfg.pool, cfg.norm_after_pool, cfg.mlp_norm, cfg.num_classes) == ("gap", True, "base" in name, 5)
    _compare(model, ref, [(56, 56)])
    dynamic = _timm(name, dynamic_img_size=True)  # timm resamples the table and recomputes RoPE per input
    dynamic.load_state_dict(ref.state_dict())
    _compare(model, dynamic, [(56, 56), OTHER])


@pytest.mark.parametrize("name", ARCHS)
def test_training_mode_forward_equals_timms_with_dropout_off(tmp_path, name):
    ref = _timm(name).train()
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors")).train()
    x = _images()
    _close(model(x), ref(x))


def test_rope_eva_equals_timms_rotary_embedding_cat():
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    for grid, ref_grid in (((4, 4), (16, 16)), ((32, 32), (16, 16)), ((3, 5), (16, 16)), ((3, 5), None)):
        theirs = RotaryEmbeddingCat(32, temperature=10000, in_pixels=False, ref_feat_shape=ref_grid).get_embed(grid)
        assert torch.equal(rope_eva(grid, 32, 10000.0, ref_grid), theirs)
    # the 448 px models see positions in steps of 1/2 of the 16x16 pre-training grid: row 31 at 15.5
    rope = rope_eva((32, 32), 32, 10000.0, (16, 16))
    assert rope[31 * 32, 0].item() == pytest.approx(torch.tensor(15.5).sin().item())  # the slowest-turning pair


def test_the_rotary_layout_base_and_reference_grid_matter(tmp_path):
    """The comparison can fail: rotating channel halves instead of interleaved pairs (DINOv3's layout), another
    base, unscaled positions, or no rotary embedding at all move the outputs far beyond the tolerance."""
    ref = _timm("eva02_base_patch14_448")
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"))
    sd, x = model.state_dict(), _images()
    with torch.no_grad():
        expected = ref(x)
        _close(model(x), expected)
        for block in model.blocks:
            block.attn.interleaved = False
        assert (model(x) - expected).abs().max() > 1e-3
        for change in (dict(rope_base=100.0), dict(rope_ref_grid=None), dict(rope_kind="dinov3", rope_ref_grid=None)):
            other = model_from_config(model.cfg.replace(**change)).eval()
            other.load_state_dict(sd)
            assert (other(x) - expected).abs().max() > 1e-3, change
        biased = {k: v.clone() for k, v in sd.items()}
        for k in biased:
            if k.endswith("attn.qkv.bias"):
                biased[k][128:256] = 1.0  # a key bias: left out of the sum (EVA-02 has none)
        model.load_state_dict(biased)
        for block in model.blocks:
            block.attn.interleaved = True
        _close(model(x), expected)


def test_timm_hub_repo_builds_the_architecture_with_timms_preprocessing(tmp_path, monkeypatch):
    hub = offline_hub_cache(tmp_path, monkeypatch)
    ref = _timm("eva02_base_patch14_448")
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    config = {"architecture": "eva02_base_patch14_448", "num_classes": 5, "num_features": 128, "global_pool": "avg",
              "model_args": {"embed_dim": 128, "depth": 2, "num_heads": 2, "img_size": 56, "num_classes": 5,
                             "mlp_ratio": 4 * 2 / 3},
              "pretrained_cfg": {"input_size": [3, 56, 56], "interpolation": "bicubic", "crop_pct": 1.0,
                                 "crop_mode": "squash", "mean": clip_mean, "std": clip_std, "num_classes": 5}}
    weights = _save_timm(ref, tmp_path / "model.safetensors").read_bytes()
    lay_out_hub_cache(hub, "timm/eva02_base_patch14_448.test", {"config.json": config,
                                                                "model.safetensors": weights})
    model = vitlab.load("hf-hub:timm/eva02_base_patch14_448.test")
    pre = model.preprocessing
    assert (pre.img_size, pre.interpolation, pre.resize, tuple(pre.mean), tuple(pre.std)) == \
        ((56, 56), "bicubic", "squash", tuple(clip_mean), tuple(clip_std))
    assert model.cfg.mlp_norm and model.cfg.rope_kind == "eva"
    x = _images()
    with torch.no_grad():
        _close(model(x), ref(x))


def test_a_bare_file_gets_eva02s_preprocessing(tmp_path):
    pre = vitlab.load(_save_timm(_timm("eva02_tiny_patch14_224"), tmp_path / "t.safetensors")).preprocessing
    assert (pre.interpolation, pre.crop_pct, pre.mean[0], pre.std[0]) == ("bicubic", 0.9, 0.48145466, 0.26862954)


# ------------------------------------------------------------------------------------------------- BAAI's layout
@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("mim", [False, True])
def test_baai_release_matches_timms_converter(tmp_path, name, mim):
    ref = _timm(name)
    original = _baai_layout(ref, mim=mim)
    assert detect_family_layout(original["model"]) == "eva02"
    # the fixture is BAAI's layout as timm reads it: timm's converter loads it strictly into the same model
    converted = _timm(name, num_classes=0 if mim else 5)
    converted.load_state_dict(timm.models.eva.checkpoint_filter_fn(original, converted), strict=True)
    torch.save(original, tmp_path / "eva02.pt")
    model = vitlab.load(tmp_path / "eva02.pt").eval()
    assert model.cfg.num_classes == (0 if mim else 5) and model.cfg.norm_after_pool
    _compare(model, converted, [(56, 56)])


def test_every_layout_loads_to_the_same_model(tmp_path):
    ref = _timm("eva02_base_patch14_448")
    torch.save(_baai_layout(ref), tmp_path / "eva02.pt")
    from_timm = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"))
    vitlab.save(from_timm, tmp_path / "model.vitlab.safetensors")
    models = [from_timm, vitlab.load(tmp_path / "eva02.pt"), vitlab.load(tmp_path / "model.vitlab.safetensors")]
    for other in models[1:]:
        assert other.cfg == from_timm.cfg
        for k, v in from_timm.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("name", ARCHS)
def test_convert_to_timm_writes_what_timms_eva02_loads(tmp_path, name):
    ref = _timm(name)
    torch.save(_baai_layout(ref), tmp_path / "eva02.pt")
    vitlab.convert(tmp_path / "eva02.pt", tmp_path / "back.safetensors", to="timm")
    again = _timm(name)
    again.load_state_dict(safetensors.torch.load_file(str(tmp_path / "back.safetensors")), strict=True)
    x = _images()
    with torch.no_grad():
        _close(again(x), ref(x))


@pytest.mark.parametrize("name", ["eva02_t14", "eva02_b14"])
def test_timm_hub_layout_builds_in_timm_and_reads_back(tmp_path, name):
    """`vitlab push` (auto picks the timm layout): timm's eva02_* name plus Eva keywords, which timm builds from the
    folder, and which vitlab's hf-hub: reader turns back into the same config."""
    from vitlab.factory import hub_folder
    from vitlab.models.timm_args import config_overrides, timm_architecture

    model = randomize_weights_(vitlab.create_model(name, embed_dim=128, depth=2, num_heads=2, img_size=56,
                                                   mlp_dim=341, num_classes=3)).eval()
    architecture, model_args = timm_architecture(model.cfg)
    assert architecture.startswith("eva02_") and (("base" in architecture) == model.cfg.mlp_norm)
    assert get_config(architecture).replace(**config_overrides(model_args)) == model.cfg
    folder = hub_folder(model, tmp_path / "repo", repo_id="me/eva02-test")
    assert folder["layout"] == "timm"
    back = timm.create_model(f"local-dir:{tmp_path / 'repo'}", pretrained=True).eval()
    x = _images()
    with torch.no_grad():
        _close(back(x), model(x))


def test_layouts_without_eva02_are_refused_by_name(tmp_path):
    torch.save(_baai_layout(_timm("eva02_tiny_patch14_224")), tmp_path / "eva02.pt")
    for to, dst, what in (("npz", "x.npz", "rope_kind"), ("torchvision", "x.pth", "rope_kind"),
                          ("hf", "hf", "EVA-02")):
        with pytest.raises(VitlabError, match=what):
            vitlab.convert(tmp_path / "eva02.pt", tmp_path / dst, to=to)
    odd = vitlab.create_model("eva02_t14", embed_dim=128, depth=2, num_heads=2, img_size=56, mlp_dim=341,
                              norm_eps=1e-5)
    from vitlab.models.timm_args import timm_architecture

    with pytest.raises(InvalidValueError, match="LayerNorm eps"):
        timm_architecture(odd.cfg)


def test_token_merging_refuses_eva02():
    from vitlab.compute.tome import merge_tokens

    model = vitlab.create_model("eva02_t14", embed_dim=128, depth=2, num_heads=2, img_size=56, mlp_dim=341)
    with pytest.raises(VitlabError, match="rope_kind='eva'"):
        merge_tokens(model, 2)


def test_eva01_and_eva_clip_towers_are_refused_by_name(tmp_path):
    eva01 = timm.create_model("eva_giant_patch14_224", pretrained=False, embed_dim=64, depth=1, num_heads=2,
                              img_size=56, mlp_ratio=4.0)
    _save_timm(eva01, tmp_path / "eva01.safetensors")
    with pytest.raises(VitlabError, match="EVA-01"):
        vitlab.load(tmp_path / "eva01.safetensors")
    clip = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, embed_dim=64, depth=1, num_heads=2,
                             img_size=64, num_classes=0)
    _save_timm(clip, tmp_path / "clip.safetensors")
    with pytest.raises(VitlabError, match="inner LayerNorm"):
        vitlab.load(tmp_path / "clip.safetensors")


def test_config_checks_name_the_rope_fields():
    with pytest.raises(InvalidValueError, match="rope_ref_grid needs rope_kind='eva'"):
        ViTConfig(rope_ref_grid=(16, 16))
    with pytest.raises(InvalidValueError, match="rope_kind must be"):
        ViTConfig(rope_kind="cat")
    with pytest.raises(InvalidValueError, match="no coordinate augmentations"):
        ViTConfig(pos_embed="rope", rope_kind="eva", rope_rescale=2.0)
    cfg = get_config("eva02_b14")
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.family_options() == {"mlp_type": "swiglu", "mlp_norm": True, "rope_kind": "eva",
                                    "rope_ref_grid": (16, 16), "rope_base": 10000.0}


def test_kept_patches_keep_their_learned_position_and_rotation():
    """Patch dropout / MAE path: keeping every patch in a shuffled order gives the model's own tokens (each keeps
    its learned position and its rotation); a training step with patch dropout runs."""
    from vitlab.train.patch_dropout import PatchDropoutForward

    model = randomize_weights_(vitlab.create_model("eva02_b14", embed_dim=128, depth=2, num_heads=2, img_size=56,
                                                   mlp_dim=341, num_classes=3))
    x = _images()
    out = PatchDropoutForward(model, keep=0.5).train()(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    model.eval()
    keep = torch.stack([torch.randperm(16) for _ in range(2)])
    with torch.no_grad():
        tokens = model.embed_tokens(model.patch_embed(x), keep=keep)
        rope = model.rotary_embedding(keep=keep)
        for block in model.blocks:
            tokens = block(tokens, rope=rope)
        full = model.forward_features(x)
    _close(tokens[:, 1:], full[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, 128)))


def test_catalog_names_resolve_through_timms_aliases():
    from vitlab.models.pretrained import get_pretrained

    assert get_pretrained("eva02_base_patch14_448.mim_in22k_ft_in1k").name == "eva02_b14.mim_in22k_ft_in1k_448"
    assert get_pretrained("eva02_l14").name == "eva02_l14.mim_m38m_ft_in22k_in1k_448"
    entry = get_pretrained("eva02_b14.mim_in22k")
    assert (entry.num_classes, entry.preprocessing.crop_pct, entry.sources[0].spec) == \
        (0, 0.9, "hf-hub:timm/eva02_base_patch14_224.mim_in22k")


def test_feature_extractor_gives_timms_intermediate_maps(tmp_path):
    from vitlab.models.features import FeatureExtractor

    ref = _timm("eva02_base_patch14_448", dynamic_img_size=True)
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"))
    model.set_dynamic_img_size(True)
    extractor = FeatureExtractor(model, indices=[0, 1])
    x = _images(OTHER)
    with torch.no_grad():
        ours = extractor(x)
        theirs = ref.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
    for a, b in zip(ours, theirs):
        assert a.shape == (2, 128, 3, 5)
        _close(a, b)


@pytest.mark.slow
def test_onnx_export_with_dynamic_size_resamples_the_table_and_recomputes_the_rotation(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from vitlab.compute.deploy import export_onnx

    model = randomize_weights_(vitlab.create_model("eva02_b14", embed_dim=128, depth=2, num_heads=2, img_size=56,
                                                   mlp_dim=341, num_classes=3)).eval()
    export_onnx(model, tmp_path / "eva02.onnx", dynamic_size=True)
    session = ort.InferenceSession(str(tmp_path / "eva02.onnx"))
    for size in ((56, 56), OTHER):
        x = _images(size, n=3)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            _close(torch.from_numpy(out), model(x, dynamic_img_size=True))


def test_loading_at_another_resolution_matches_timms_converter(tmp_path):
    """`vitlab.load(..., img_size=84)` resamples the learned table once (timm's antialiased bicubic) and the rotation
    follows the new 6x6 grid on the same 16x16 reference, as timm's checkpoint_filter_fn builds it."""
    ref = _timm("eva02_base_patch14_448")
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"), img_size=84).eval()
    assert model.cfg.grid_size == (6, 6) and model.cfg.rope_ref_grid == (16, 16)
    bigger = _timm("eva02_base_patch14_448", img_size=84)
    bigger.load_state_dict(timm.models.eva.checkpoint_filter_fn(ref.state_dict(), bigger), strict=True)
    x = _images((84, 84))
    with torch.no_grad():
        _close(model(x), bigger(x))


@pytest.mark.parametrize("name", ["vit_medium_patch16_rope_reg1_gap_256", "vit_small_patch16_rope_ape_224",
                                  "vit_small_patch16_dinov3_qkvb"])
def test_timms_other_eva_vits_are_not_taken_for_eva02(name):
    with torch.device("meta"):
        sd = timm.create_model(name, pretrained=False).state_dict()
    assert detect_family_layout(sd) not in ("eva02", "timm_eva02")


def test_gradients_equal_timms_in_training_mode(tmp_path):
    """One training step's gradients reach the same tensors as in timm: the fused q/k/v weight, the query / value
    biases, the learned table and the class token."""
    ref = _timm("eva02_tiny_patch14_224").train()
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors")).train()
    x = _images()
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    theirs = dict(ref.named_parameters())
    ours = dict(model.named_parameters())
    for name in ("blocks.0.attn.qkv.weight", "pos_embed", "cls_token", "blocks.1.mlp.fc1.weight", "fc_norm.weight"):
        _close(ours[name].grad, theirs[name].grad, tol=1e-4)
    bias = ours["blocks.0.attn.qkv.bias"].grad
    _close(bias[:128], theirs["blocks.0.attn.q_bias"].grad, tol=1e-4)
    _close(bias[256:], theirs["blocks.0.attn.v_bias"].grad, tol=1e-4)
    # the key third: the bias is added and taken back out, so only rounding noise reaches it, which vitlab's
    # trainer zeroes (key_bias_slices finds the slice)
    assert bias[128:256].abs().max() < 1e-6 * bias.abs().max()
    from vitlab.models.vit import key_bias_slices

    assert [(p is ours["blocks.0.attn.qkv.bias"], s) for p, s in key_bias_slices(model)][0] == (True, slice(128, 256))


def test_cli_convert_to_timm_and_refusal(tmp_path):
    from vitlab.cli import main

    ref = _timm("eva02_base_patch14_448")
    torch.save(_baai_layout(ref), tmp_path / "eva02.pt")
    assert main(["convert", str(tmp_path / "eva02.pt"), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 0
    again = _timm("eva02_base_patch14_448")
    again.load_state_dict(safetensors.torch.load_file(str(tmp_path / "t.safetensors")), strict=True)
    assert main(["convert", str(tmp_path / "eva02.pt"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert not (tmp_path / "hf").exists()
