"""DINOv3 (pos_embed='rope') against its two ports: timm's ``vit_*_dinov3`` (Eva) and transformers'
``DINOv3ViTModel``. Tiny instances of each hold random weights; vitlab reads their files (and Meta's torch.hub
layout, made from the same weights and checked through timm's own converter) and must give the same tokens,
intermediates and pooled features within 1e-5, at the build size and at a non-square size (the rotary embedding
on another grid). The registry entries have timm's parameter counts (built on the meta device)."""

import pytest
import safetensors.torch
import torch

import vitlab
from vitlab.checkpoints.family_layouts import detect_family_layout
from vitlab.errors import VitlabError
from vitlab.models import get_config, model_from_config
from vitlab.models.vit import rope_2d

from .checkpoint_fixtures import randomize_weights_
from .hub_fixtures import lay_out_hub_cache, offline_hub_cache

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

NAMES = {"dinov3_s16": "vit_small_patch16_dinov3", "dinov3_s16plus": "vit_small_plus_patch16_dinov3",
         "dinov3_b16": "vit_base_patch16_dinov3", "dinov3_l16": "vit_large_patch16_dinov3",
         "dinov3_h16plus": "vit_huge_plus_patch16_dinov3", "dinov3_7b16": "vit_7b_patch16_dinov3"}
TINY = dict(embed_dim=128, depth=2, num_heads=2, img_size=64)  # 4x4 grid of 16-pixel patches, head width 64
OURS = dict(TINY, mlp_dim=512)  # the same in vitlab's fields (timm: mlp_ratio 4)
SIZES = [(64, 64), (48, 80)]  # the build size, and another, non-square grid (3x5)


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def _images(size=(64, 64), n=2):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def _timm(name, **kw):
    model = timm.create_model(name, pretrained=False, num_classes=0, **{**TINY, **kw})
    return randomize_weights_(model).eval()


def _save_timm(model, path):
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", sorted(NAMES))
def test_registry_entries_have_timms_parameter_counts(name):
    with torch.device("meta"):
        ours = vitlab.create_model(name)
        theirs = timm.create_model(NAMES[name], pretrained=False, num_classes=0)
        same = vitlab.create_model(NAMES[name])  # timm's name is an alias of the entry
    assert ours.num_params() == same.num_params() == sum(p.numel() for p in theirs.parameters())
    assert ours.cfg.img_size == tuple(theirs.patch_embed.img_size) == (256, 256)
    assert ours.cfg.num_prefix_tokens == theirs.num_prefix_tokens == 5
    assert ours.cfg.family_options()["pos_embed"] == "rope"


def test_qkvb_aliases_keep_the_query_and_value_biases():
    """timm's ``_qkvb`` models hold q and v biases; vitlab's fused bias adds the (masked, zero) key third."""
    with torch.device("meta"):
        ours = vitlab.create_model("vit_base_patch16_dinov3_qkvb")
        theirs = timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, num_classes=0)
    assert ours.cfg.qkv_bias
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) + 12 * 768


# ------------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3",
                                  "vit_small_patch16_dinov3_qkvb"])
def test_timm_state_dict_gives_timms_outputs_at_any_size(tmp_path, name):
    ref = _timm(name)
    assert detect_family_layout(ref.state_dict()) == "timm_dinov3"
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"))
    cfg = model.cfg
    assert (cfg.pos_embed, cfg.reg_tokens, cfg.pool, cfg.norm_eps, cfg.num_heads) == ("rope", 4, "gap", 1e-5, 2)
    assert cfg.mlp_type == ("swiglu" if "plus" in name else "mlp") and cfg.qkv_bias == name.endswith("qkvb")
    for size in SIZES:
        x = _images(size)
        with torch.no_grad():
            _close(model.forward_features(x), ref.forward_features(x))
            _close(model(x), ref(x))  # timm's default pooling: the mean patch token after the final norm
            ours = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, output_fmt="NCHW")
            theirs = ref.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, output_fmt="NCHW")
        _close(ours[0], theirs[0])
        for (a, a_prefix), (b, b_prefix) in zip(ours[1], theirs[1]):
            assert a.shape[-2:] == (size[0] // 16, size[1] // 16)
            _close(a, b)
            _close(a_prefix, b_prefix)


def test_the_rotary_embedding_and_the_key_mask_matter(tmp_path):
    """The comparison can fail: without the rotary embedding, with another base, or with the key bias added the
    outputs move far beyond the tolerance."""
    ref = _timm("vit_small_patch16_dinov3_qkvb")
    sd = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors")).state_dict()
    x = _images()
    with torch.no_grad():
        expected = ref.forward_features(x)
        for change in (dict(pos_embed="none", rope_rescale=None), dict(rope_base=50.0)):
            other = model_from_config(get_config("dinov3_s16", **OURS, qkv_bias=True, **change)).eval()
            other.load_state_dict(sd)
            assert (other.forward_features(x) - expected).abs().max() > 1e-3, change
        masked = model_from_config(get_config("dinov3_s16", **OURS, qkv_bias=True)).eval()
        biased = {k: v.clone() for k, v in sd.items()}
        for k in biased:
            if k.endswith("attn.qkv.bias"):
                biased[k][128:256] = 1.0  # the key third: left out of the sum (DINOv3's bias_mask)
        masked.load_state_dict(biased)
        _close(masked.forward_features(x), expected)


def test_timm_hub_repo_builds_the_architecture_with_timms_preprocessing(tmp_path, monkeypatch):
    hub = offline_hub_cache(tmp_path, monkeypatch)
    ref = _timm("vit_small_plus_patch16_dinov3")
    config = {"architecture": "vit_small_plus_patch16_dinov3", "num_classes": 0, "num_features": 128,
              "global_pool": "avg", "model_args": {"embed_dim": 128, "depth": 2, "num_heads": 2, "img_size": 64,
                                                                  "mlp_ratio": 4.0},
              "pretrained_cfg": {"input_size": [3, 64, 64], "interpolation": "bicubic", "crop_pct": 1.0,
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 0}}
    weights = _save_timm(ref, tmp_path / "model.safetensors").read_bytes()
    lay_out_hub_cache(hub, "timm/vit_small_plus_patch16_dinov3.test", {"config.json": config,
                                                                       "model.safetensors": weights})
    model = vitlab.load("hf-hub:timm/vit_small_plus_patch16_dinov3.test")
    pre = model.preprocessing
    assert (pre.img_size, pre.interpolation, pre.crop_pct, tuple(pre.mean)) == ((64, 64), "bicubic", 1.0,
                                                                                (0.485, 0.456, 0.406))
    x = _images((80, 48))
    with torch.no_grad():
        _close(model(x), ref(x))


# ------------------------------------------------------------------------------------------------- Meta's .pth
def _meta_layout(ref):
    """Meta's torch.hub names (dinov3/models/vision_transformer.py) for a timm model's weights: storage tokens, the
    masked q/k/v bias with its bias_mask (a non-zero key third, which the mask removes), the rotary periods in
    bfloat16, SwiGLU w1 / w2 / w3, the mask token."""
    swiglu = any(".fc1_g." in k for k in ref.state_dict())
    sd = {}
    for k, v in ref.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if swiglu:
            k = k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2").replace("mlp.fc2", "mlp.w3")
        sd[k] = v.clone()
    for i in range(len(ref.blocks)):
        D = ref.embed_dim
        q, v = sd.pop(f"blocks.{i}.attn.q_bias", None), sd.pop(f"blocks.{i}.attn.v_bias", None)
        if q is not None:
            sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.full((D,), 3.0), v])
            sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    head_dim = ref.embed_dim // ref.blocks[0].attn.num_heads
    sd["rope_embed.periods"] = (100.0 ** (4 * torch.arange(head_dim // 4) / head_dim)).to(torch.bfloat16)
    sd["mask_token"] = torch.zeros(1, ref.embed_dim)
    return sd


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3"])
def test_meta_release_pth_matches_timms_converter(tmp_path, name):
    from timm.models.eva import checkpoint_filter_fn

    ref = _timm(name, num_heads=4)  # four heads: the count comes from the rotary periods, not the width
    sd = _meta_layout(ref)
    assert detect_family_layout(sd) == "dinov3"
    torch.save(sd, tmp_path / "dinov3_vits16_pretrain_lvd1689m-test.pth")
    oracle = _timm(name, num_heads=4)
    oracle.load_state_dict(checkpoint_filter_fn(sd, oracle))  # timm's converter from Meta's layout
    model = vitlab.load(tmp_path / "dinov3_vits16_pretrain_lvd1689m-test.pth")
    assert model.cfg.num_heads == 4
    pre = model.preprocessing
    assert (pre.img_size, pre.crop_pct, pre.interpolation, tuple(pre.mean)) == ((256, 256), 1.0, "bicubic",
                                                                                (0.485, 0.456, 0.406))
    for size in SIZES:
        x = _images(size)
        with torch.no_grad():
            _close(model.forward_features(x), oracle.forward_features(x))
            _close(model(x), ref(x))


def test_meta_periods_of_another_base_are_refused(tmp_path):
    sd = _meta_layout(_timm("vit_small_patch16_dinov3"))
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 3
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(VitlabError, match="rope_embed.periods"):
        vitlab.load(tmp_path / "x.pth")


# ------------------------------------------------------------------------------------------------- transformers
def _hf(folder, gated=False, **kw):
    config = transformers.DINOv3ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4,
        image_size=64, patch_size=16, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", **kw)
    model = randomize_weights_(transformers.DINOv3ViTModel(config)).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_transformers_folder_gives_last_hidden_state_and_pooler_output(tmp_path, gated):
    ref = _hf(tmp_path, gated)
    model = vitlab.load(tmp_path)
    assert (model.cfg.num_heads, model.cfg.mlp_type) == (4, "swiglu" if gated else "mlp")
    token = model_from_config(model.cfg.replace(pool="token")).eval()  # upstream's pooling: the class token
    token.load_state_dict(model.state_dict())
    for size in SIZES:
        x = _images(size)
        with torch.no_grad():
            out = ref(pixel_values=x, output_hidden_states=True)
            _close(model.forward_features(x), out.last_hidden_state)
            _close(token(x), out.pooler_output)
            blocks = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
        _close(blocks[0], out.hidden_states[1][:, 5:])


def test_training_mode_coordinate_augmentations_match_transformers(tmp_path):
    """DINOv3's shift / jitter / rescale of the patch coordinates, drawn in the same order from the same seed."""
    ref = _hf(tmp_path, pos_embed_shift=0.2, pos_embed_jitter=1.5, pos_embed_rescale=2.0).train()
    model = vitlab.load(tmp_path).train()
    assert (model.cfg.rope_shift, model.cfg.rope_jitter, model.cfg.rope_rescale) == (0.2, 1.5, 2.0)
    x = _images()
    with torch.no_grad():
        torch.manual_seed(3)
        ours = model.forward_features(x)
        torch.manual_seed(3)
        theirs = ref(pixel_values=x).last_hidden_state
        _close(ours, theirs)
        torch.manual_seed(4)
        assert (model.forward_features(x) - theirs).abs().max() > 1e-4  # another draw, other positions
        model.eval()
        assert torch.equal(model.forward_features(x), model.forward_features(x))  # inference: no draws


def test_the_three_layouts_load_to_the_same_model(tmp_path):
    """Meta's .pth, timm's state dict and transformers' folder of the same weights: equal state dicts."""
    ref = _timm("vit_small_patch16_dinov3_qkvb", num_heads=4)
    from_timm = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"))
    torch.save(_meta_layout(ref), tmp_path / "meta.pth")
    from_meta = vitlab.load(tmp_path / "meta.pth")
    hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4,
        image_size=256, patch_size=16))
    sd = from_meta.state_dict()
    hf_sd = {"embeddings.cls_token": sd["cls_token"], "embeddings.register_tokens": sd["reg_token"],
             "embeddings.mask_token": torch.zeros(1, 1, 128), "norm.weight": sd["norm.weight"],
             "norm.bias": sd["norm.bias"], "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
             "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"]}
    for i in range(2):
        b = f"blocks.{i}."
        q, _, v = sd[b + "attn.qkv.weight"].chunk(3)
        k = sd[b + "attn.qkv.weight"].chunk(3)[1]
        qb, _, vb = sd[b + "attn.qkv.bias"].chunk(3)
        hf_sd.update({f"model.layer.{i}.attention.q_proj.weight": q, f"model.layer.{i}.attention.k_proj.weight": k,
                      f"model.layer.{i}.attention.v_proj.weight": v, f"model.layer.{i}.attention.q_proj.bias": qb,
                      f"model.layer.{i}.attention.v_proj.bias": vb,
                      f"model.layer.{i}.attention.o_proj.weight": sd[b + "attn.proj.weight"],
                      f"model.layer.{i}.attention.o_proj.bias": sd[b + "attn.proj.bias"],
                      f"model.layer.{i}.layer_scale1.lambda1": sd[b + "ls1.gamma"],
                      f"model.layer.{i}.layer_scale2.lambda1": sd[b + "ls2.gamma"],
                      f"model.layer.{i}.mlp.up_proj.weight": sd[b + "mlp.fc1.weight"],
                      f"model.layer.{i}.mlp.up_proj.bias": sd[b + "mlp.fc1.bias"],
                      f"model.layer.{i}.mlp.down_proj.weight": sd[b + "mlp.fc2.weight"],
                      f"model.layer.{i}.mlp.down_proj.bias": sd[b + "mlp.fc2.bias"]})
        for n in ("norm1", "norm2"):
            hf_sd.update({f"model.layer.{i}.{n}.{w}": sd[f"{b}{n}.{w}"] for w in ("weight", "bias")})
    hf.load_state_dict(hf_sd, strict=True)
    hf.save_pretrained(tmp_path / "hf")
    from_hf = vitlab.load(tmp_path / "hf")
    for other in (from_timm, from_hf):  # timm's file does not store the head count, transformers' LayerScale init
        assert other.cfg.replace(num_heads=4, layer_scale=1e-5) == from_meta.cfg
        theirs = other.state_dict()
        assert sorted(theirs) == sorted(sd)
        for k in sd:
            assert torch.equal(theirs[k], sd[k]), k


# ------------------------------------------------------------------------------------------------- the embedding
def test_rope_2d_coordinates_and_periods():
    """Patch centres in [-1, 1] per axis, periods 100 ** (4 j / head_dim): row 0 of a 2x4 grid at (-0.5, -0.75)."""
    rope = rope_2d((2, 4), 8, 100.0)
    sin, cos = rope.chunk(2, dim=-1)
    periods = torch.tensor([1.0, 10.0])
    angles = 2 * torch.pi * torch.tensor([-0.5, -0.5, -0.75, -0.75]) / periods.repeat(2)
    assert torch.allclose(sin[0], torch.cat([angles, angles]).sin(), atol=1e-6)
    assert torch.allclose(cos[0], torch.cat([angles, angles]).cos(), atol=1e-6)
    assert rope.shape == (8, 16)


# ------------------------------------------------------------------------------------------------- tools on RoPE
def _tiny():
    return model_from_config(get_config("dinov3_s16plus", **OURS)).eval()


def test_token_merging_refuses_rotary_models():
    from vitlab.compute.tome import merge_tokens

    with pytest.raises(VitlabError, match="rotary"):
        merge_tokens(_tiny(), 2)


def test_other_sizes_need_no_resampling_and_load_builds_any_size(tmp_path):
    ref = _timm("vit_small_patch16_dinov3")
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"), img_size=(96, 32))
    assert model.cfg.img_size == (96, 32) and not any("pos_embed" in k for k in model.state_dict())
    x = _images((96, 32))
    with torch.no_grad():
        _close(model(x), ref(x))


def test_a_block_without_its_rotary_embedding_is_refused():
    model = _tiny()
    x = torch.randn(1, 21, 128)
    with pytest.raises(VitlabError, match="rotary"):
        model.blocks[0](x)


def test_patch_dropout_and_mae_run_with_the_kept_patches_positions():
    """Keeping every patch in a shuffled order gives the model's own features (each token keeps its rotation)."""
    from vitlab.train.patch_dropout import PatchDropoutForward

    model = _tiny()
    x = _images()
    wrapped = PatchDropoutForward(model, keep=0.5).train()
    model.train()
    out = wrapped(x)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    model.eval()
    keep = torch.stack([torch.randperm(16) for _ in range(2)])
    with torch.no_grad():
        tokens = model.embed_tokens(model.patch_embed(x), keep=keep)
        rope = model.rotary_embedding(keep=keep)
        for block in model.blocks:
            tokens = block(tokens, rope=rope)
        full = model.forward_features(x)
    patches = model.norm(tokens)[:, 5:]
    expected = full[:, 5:].gather(1, keep.unsqueeze(-1).expand(-1, -1, 128))
    _close(patches, expected)


# ------------------------------------------------------------------------------------------------- writing
def test_convert_writes_timms_and_transformers_layouts_that_they_load_with_equal_outputs(tmp_path):
    ref = _timm("vit_small_plus_patch16_dinov3_qkvb", num_heads=4)
    torch.save(_meta_layout(ref), tmp_path / "meta.pth")
    model = vitlab.load(tmp_path / "meta.pth")  # four heads, from the rotary periods
    vitlab.convert(tmp_path / "meta.pth", tmp_path / "back.safetensors", to="timm")
    again = _timm("vit_small_plus_patch16_dinov3_qkvb", num_heads=4)
    again.load_state_dict(safetensors.torch.load_file(str(tmp_path / "back.safetensors")), strict=True)
    vitlab.convert(tmp_path / "meta.pth", tmp_path / "hf", to="hf")
    hf = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf").eval()
    x = _images((48, 80))
    with torch.no_grad():
        _close(again(x), ref(x))
        _close(hf(pixel_values=x).last_hidden_state, model.forward_features(x))


def test_convert_refuses_layouts_without_rotary_embeddings(tmp_path):
    torch.save(_meta_layout(_timm("vit_small_patch16_dinov3")), tmp_path / "meta.pth")
    for to, dst in (("npz", "x.npz"), ("torchvision", "x.pth")):
        with pytest.raises(VitlabError, match="rope"):
            vitlab.convert(tmp_path / "meta.pth", tmp_path / dst, to=to)


def test_feature_extractor_gives_timms_intermediate_maps(tmp_path):
    from vitlab.models.features import FeatureExtractor

    ref = _timm("vit_small_patch16_dinov3")
    extractor = FeatureExtractor(vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors")), indices=[0, 1])
    x = _images((48, 80))
    with torch.no_grad():
        ours = extractor(x)
        theirs = ref.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
    for a, b in zip(ours, theirs):
        assert a.shape == (2, 128, 3, 5)
        _close(a, b)


@pytest.mark.slow
def test_onnx_export_with_dynamic_size_computes_the_rotary_embedding_per_grid(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from vitlab.compute.deploy import export_onnx

    model = randomize_weights_(_tiny())
    export_onnx(model, tmp_path / "dinov3.onnx", dynamic_size=True)
    session = ort.InferenceSession(str(tmp_path / "dinov3.onnx"))
    for size in SIZES:
        x = _images(size, n=3)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            _close(torch.from_numpy(out), model(x))


def test_training_with_gradient_checkpointing_leaves_the_masked_key_bias_alone():
    model = randomize_weights_(model_from_config(get_config("dinov3_s16", **OURS, qkv_bias=True)))
    x = _images((48, 80))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(0)  # the same rope_rescale draw
        model.train()(x, dynamic_img_size=True).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        _close(grads[1][name], grads[0][name])
    bias = grads[0]["blocks.0.attn.qkv.bias"]
    assert bias[128:256].abs().max() < 1e-6 < bias[:128].abs().max()  # q and v biases train, the key third not


@pytest.mark.parametrize("name", ["dinov3_s16", "dinov3_s16plus"])
def test_timm_hub_layout_of_a_dinov3_model_builds_in_timm_and_reads_back(tmp_path, name):
    """`vitlab push --layout timm` (auto picks it): timm's architecture name plus Eva keywords, which timm builds
    from the folder, and which vitlab's hf-hub: reader turns back into the same config."""
    from vitlab.factory import hub_folder
    from vitlab.models.timm_args import config_overrides, timm_architecture

    model = randomize_weights_(vitlab.create_model(name, **OURS, num_classes=3, qkv_bias=True)).eval()
    architecture, model_args = timm_architecture(model.cfg)
    assert architecture.endswith("_dinov3") and ("plus" in architecture) == ("plus" in name)  # the MLP kind
    assert get_config(architecture).replace(**config_overrides(model_args)).replace(rope_rescale=None) == \
        model.cfg.replace(rope_rescale=None)
    folder = hub_folder(model, tmp_path / "repo", repo_id="me/dinov3-test")
    assert folder["layout"] == "timm"
    back = timm.create_model(f"local-dir:{tmp_path / 'repo'}", pretrained=True).eval()
    x = _images((48, 80))
    with torch.no_grad():
        _close(back(x), model(x))


def test_transformers_hub_repo_loads_with_its_processors_preprocessing(tmp_path, monkeypatch):
    """facebook/dinov3-*: config.json + model.safetensors + DINOv3ViTImageProcessor's preprocessor_config.json."""
    hub = offline_hub_cache(tmp_path, monkeypatch)
    folder = tmp_path / "repo"
    ref = _hf(folder)
    transformers.DINOv3ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    lay_out_hub_cache(hub, "facebook/dinov3-test", {p.name: p.read_bytes() for p in folder.iterdir()})
    model = vitlab.load("hf-hub:facebook/dinov3-test")
    pre = model.preprocessing
    assert (pre.resize, pre.img_size, pre.interpolation, tuple(pre.mean)) == ("squash", (64, 64), "bilinear",
                                                                              (0.485, 0.456, 0.406))
    x = _images()
    with torch.no_grad():
        _close(model.forward_features(x), ref(pixel_values=x).last_hidden_state)


def test_bfloat16_weights_rotate_in_float32_and_stay_close():
    model = randomize_weights_(_tiny())
    x = _images((48, 80))
    with torch.no_grad():
        expected = model.forward_features(x)
        low = model.to(torch.bfloat16).forward_features(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    _close(low.float(), expected, tol=5e-2)


def test_another_patch_size_resamples_the_patch_embedding_as_timms_converter(tmp_path):
    """FlexiViT-style patch resize (timm's resample_patch_embed in checkpoint_filter_fn); no table to resample."""
    from timm.models.eva import checkpoint_filter_fn

    ref = _timm("vit_small_patch16_dinov3")
    model = vitlab.load(_save_timm(ref, tmp_path / "timm.safetensors"), patch_size=8, img_size=64)
    oracle = _timm("vit_small_patch16_dinov3", patch_size=8)
    oracle.load_state_dict(checkpoint_filter_fn(ref.state_dict(), oracle))
    x = _images((48, 80))
    with torch.no_grad():
        _close(model(x), oracle(x))


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_224", "vit_small_patch16_rope_mixed_224",
                                  "vit_medium_patch16_rope_reg1_gap_256"])
def test_timms_other_rope_vits_are_not_taken_for_dinov3(name):
    with torch.device("meta"):
        keys = timm.create_model(name, pretrained=False).state_dict()
    assert detect_family_layout(keys) not in ("dinov3", "timm_dinov3", "hf_dinov3")


@pytest.mark.slow
def test_a_full_size_transformers_config_loads_as_the_registry_model(tmp_path):
    """DINOv3ViTConfig's defaults are ViT-S/16's (facebook/dinov3-vits16-pretrain-lvd1689m): with its q / v biases
    it is the ``vit_small_patch16_dinov3_qkvb`` alias; the outputs are transformers'."""
    config = transformers.DINOv3ViTConfig(num_register_tokens=4, image_size=224)
    ref = transformers.DINOv3ViTModel(config).eval()
    ref.save_pretrained(tmp_path)
    model = vitlab.load(tmp_path, model_name="vit_small_patch16_dinov3_qkvb")
    reference = vitlab.create_model("vit_small_patch16_dinov3_qkvb")  # the name's 256 px (any size runs)
    assert model.cfg == reference.cfg.replace(layer_scale=1.0)  # transformers' LayerScale init value
    assert model.num_params() == reference.num_params()
    x = _images((224, 224), n=1)
    with torch.no_grad():
        _close(model.forward_features(x), ref(pixel_values=x).last_hidden_state)
