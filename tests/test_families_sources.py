"""DINOv2, DeiT, SigLIP and CLIP in every layout they are published in: transformers folders (``save_pretrained``),
the original releases' state dicts and big_vision ``.npz``. transformers and timm are the oracles."""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import convert, read_checkpoint
from vitlab.checkpoints.family_layouts import detect_family_layout
from vitlab.errors import InvalidValueError, VitlabError

from .checkpoint_fixtures import randomize_weights_
from .hub_fixtures import offline_hub_cache

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


def _close(actual, expected, tol=1e-4):
    """Within ``tol`` relative to the output's scale (outputs of random weights are O(1))."""
    assert expected.abs().max() > 0.05
    torch.testing.assert_close(actual, expected, atol=tol * max(1.0, float(expected.abs().max())), rtol=tol)


def _dinov2(folder, registers=0, swiglu=False, **kw):
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
               use_swiglu_ffn=swiglu, **kw)
    if registers:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            **cfg, num_register_tokens=registers))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**cfg))
    return _saved(model, folder)


def _siglip(folder, full=False, **kw):
    tower = {**TOWER, **kw}
    if full:
        return _saved(transformers.SiglipModel(transformers.SiglipConfig(vision_config=tower, text_config=TEXT)),
                      folder)
    return _saved(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**tower)), folder)


def _clip(folder, kind="vision", **kw):
    tower = {**TOWER, **kw}
    if kind == "full":
        return _saved(transformers.CLIPModel(transformers.CLIPConfig(vision_config=tower, text_config=TEXT,
                                                                     projection_dim=24)), folder)
    if kind == "projection":
        return _saved(transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**tower, projection_dim=24)), folder)
    return _saved(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**tower)), folder)


def _image_features(ref, x):
    out = ref.get_image_features(pixel_values=x)
    return getattr(out, "pooler_output", out)


# ------------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
def test_hf_dinov2_folder_gives_transformers_hidden_states_and_pooled_output(tmp_path, registers, swiglu):
    ref, sd = _dinov2(tmp_path, registers, swiglu)
    assert detect_family_layout(sd) == "hf_dinov2"
    model = vitlab.load(tmp_path)
    cfg = model.cfg
    assert (cfg.reg_tokens, cfg.no_embed_class, cfg.mlp_type) == (registers, bool(registers),
                                                                  "swiglu" if swiglu else "mlp")
    assert cfg.layer_scale == 1.0 and cfg.num_classes == 0 and cfg.img_size == (28, 28)
    x = _images(size=28)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        _close(model.forward_features(x), out.last_hidden_state)
        _close(model(x), out.pooler_output)
        blocks = model.forward_intermediates(x, indices=[0], norm=False, output_fmt="NLC", intermediates_only=True)
    prefix = 1 + registers
    _close(blocks[0], out.hidden_states[1][:, prefix:])


@pytest.mark.parametrize("teacher", [True, False])
def test_hf_deit_folder_gives_transformers_logits(tmp_path, teacher):
    cls = transformers.DeiTForImageClassificationWithTeacher if teacher else transformers.DeiTForImageClassification
    ref, _ = _saved(cls(transformers.DeiTConfig(**TOWER, num_labels=5)), tmp_path)
    model = vitlab.load(tmp_path)
    assert model.cfg.distilled and model.cfg.num_classes == 5 and model.cfg.norm_eps == 1e-12
    x = _images()
    with torch.no_grad():
        _close(model(x), ref(x).logits)
        _close(model.forward_features(x), ref.deit(x).last_hidden_state)


@pytest.mark.parametrize("full", [False, True])
def test_hf_siglip_folder_gives_transformers_pooled_output(tmp_path, full):
    ref, sd = _siglip(tmp_path, full)
    assert detect_family_layout(sd) == "hf_siglip"
    ckpt = read_checkpoint(tmp_path)
    assert any("text tower" in n for n in ckpt.notes) == full
    model = vitlab.load(tmp_path)
    assert (model.cfg.pool, model.cfg.gelu, model.cfg.class_token) == ("map", "tanh", False)
    x = _images()
    with torch.no_grad():
        tower = ref.vision_model(x) if full else ref(x)
        _close(model.forward_features(x), tower.last_hidden_state)
        _close(model(x), _image_features(ref, x) if full else tower.pooler_output)


@pytest.mark.parametrize("kind", ["vision", "projection", "full"])
def test_hf_clip_folder_gives_transformers_image_embeddings(tmp_path, kind):
    ref, sd = _clip(tmp_path, kind)
    assert detect_family_layout(sd) == "hf_clip"
    model = vitlab.load(tmp_path)
    cfg = model.cfg
    assert (cfg.pre_norm, cfg.patch_bias, cfg.gelu, cfg.norm_eps) == (True, False, "quick", 1e-5)
    assert cfg.num_classes == (0 if kind == "vision" else 24)
    x = _images()
    with torch.no_grad():
        if kind == "full":
            expected = _image_features(ref, x)
        elif kind == "projection":
            expected = ref(x).image_embeds
        else:
            expected = ref(x).pooler_output
        _close(model(x), expected)
        tower = (ref.vision_model if kind == "full" else ref)(pixel_values=x, output_hidden_states=True)
        blocks = model.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC", intermediates_only=True)
    _close(blocks[0], tower.hidden_states[2][:, 1:])


# ------------------------------------------------------------------------------------------------- original releases
_GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=_GEN) / max(shape[-1], 1) ** 0.5


def _norm(sd, key, dim):
    sd[f"{key}.weight"], sd[f"{key}.bias"] = 1 + 0.1 * _rand(dim) * dim**0.5, 0.1 * _rand(dim) * dim**0.5


def _linear(sd, key, out, inp, bias=True):
    sd[f"{key}.weight"] = _rand(out, inp)
    if bias:
        sd[f"{key}.bias"] = 0.1 * _rand(out) * out**0.5


def dinov2_release(dim=128, depth=2, grid=2, patch=14, registers=0, swiglu_hidden=0):
    """A DINOv2 torch.hub state dict (dinov2/models/vision_transformer.py names) with random weights."""
    sd = {"cls_token": _rand(1, 1, dim), "pos_embed": _rand(1, 1 + grid * grid, dim), "mask_token": _rand(1, dim),
          "patch_embed.proj.weight": _rand(dim, 3, patch, patch), "patch_embed.proj.bias": _rand(dim)}
    if registers:
        sd["register_tokens"] = _rand(1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}"
        _norm(sd, f"{b}.norm1", dim)
        _linear(sd, f"{b}.attn.qkv", 3 * dim, dim)
        _linear(sd, f"{b}.attn.proj", dim, dim)
        sd[f"{b}.ls1.gamma"], sd[f"{b}.ls2.gamma"] = 0.5 + _rand(dim), 0.5 + _rand(dim)
        _norm(sd, f"{b}.norm2", dim)
        if swiglu_hidden:
            _linear(sd, f"{b}.mlp.w12", 2 * swiglu_hidden, dim)
            _linear(sd, f"{b}.mlp.w3", dim, swiglu_hidden)
        else:
            _linear(sd, f"{b}.mlp.fc1", 4 * dim, dim)
            _linear(sd, f"{b}.mlp.fc2", dim, 4 * dim)
    _norm(sd, "norm", dim)
    return sd


def clip_release(dim=128, depth=2, grid=2, patch=16, proj=24, text=True):
    """An OpenAI CLIP / OpenCLIP state dict (``visual.`` image tower + a text tower) with random weights."""
    sd = {"visual.conv1.weight": _rand(dim, 3, patch, patch), "visual.class_embedding": _rand(dim),
          "visual.positional_embedding": _rand(1 + grid * grid, dim), "visual.proj": _rand(dim, proj)}
    _norm(sd, "visual.ln_pre", dim)
    for i in range(depth):
        b = f"visual.transformer.resblocks.{i}"
        _norm(sd, f"{b}.ln_1", dim)
        sd[f"{b}.attn.in_proj_weight"], sd[f"{b}.attn.in_proj_bias"] = _rand(3 * dim, dim), 0.1 * _rand(3 * dim)
        _linear(sd, f"{b}.attn.out_proj", dim, dim)
        _norm(sd, f"{b}.ln_2", dim)
        _linear(sd, f"{b}.mlp.c_fc", 4 * dim, dim)
        _linear(sd, f"{b}.mlp.c_proj", dim, 4 * dim)
    _norm(sd, "visual.ln_post", dim)
    if text:
        sd.update({"token_embedding.weight": _rand(10, dim), "positional_embedding": _rand(7, dim),
                   "text_projection": _rand(dim, proj), "logit_scale": torch.tensor(4.6)})
        _norm(sd, "ln_final", dim)
    return sd


def _timm_oracle(model, sd):
    from timm.models.vision_transformer import checkpoint_filter_fn

    model.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in sd.items()}, model), strict=True)
    return model.eval()


@pytest.mark.parametrize("registers,swiglu", [(0, 0), (4, 0), (0, 24)])
def test_dinov2_release_pth_loads_strictly_and_matches_timms_converter(tmp_path, registers, swiglu):
    sd = dinov2_release(registers=registers, swiglu_hidden=swiglu)
    torch.save(sd, tmp_path / "dinov2_vits14.pth")
    model = vitlab.load(tmp_path / "dinov2_vits14.pth", num_classes=0)
    ckpt = read_checkpoint(tmp_path / "dinov2_vits14.pth")
    assert ckpt.format == "dinov2" and any("mask_token" in n for n in ckpt.notes)
    assert (model.cfg.reg_tokens, model.cfg.no_embed_class) == (registers, bool(registers))
    extra = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2 * swiglu / 128) if swiglu \
        else {}
    oracle = _timm_oracle(_timm_vit(img_size=28, patch_size=14, embed_dim=128, depth=2, num_heads=2,
                                    init_values=1e-5, num_classes=0, reg_tokens=registers,
                                    no_embed_class=bool(registers), **extra), sd)
    x = _images(size=28)
    with torch.no_grad():
        _close(model.forward_features(x), oracle.forward_features(x), 1e-5)
    assert model.preprocessing.mean == (0.485, 0.456, 0.406) and model.preprocessing.interpolation == "bicubic"


def test_dinov2_training_checkpoint_with_chunked_blocks_loads_like_the_hub_file(tmp_path):
    sd = dinov2_release()
    torch.save(sd, tmp_path / "hub.pth")
    # dinov2's block_chunks: blocks.{chunk}.{i}. with i counted over the whole model (2 chunks of one block here)
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{m.group(1)}.{m.group(1)}.", k): v for k, v in sd.items()}
    assert "blocks.1.1.norm1.weight" in chunked
    torch.save(chunked, tmp_path / "chunked.pth")
    x = _images(size=28)
    with torch.no_grad():
        _close(vitlab.load(tmp_path / "chunked.pth")(x), vitlab.load(tmp_path / "hub.pth")(x), 1e-6)


@pytest.mark.parametrize("text", [True, False])
def test_openai_clip_state_dict_loads_the_image_tower_like_timms_converter(tmp_path, text):
    sd = clip_release(text=text)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "clip.pt")  # OpenCLIP training
    model = vitlab.load(tmp_path / "clip.pt")
    assert (model.cfg.gelu, model.cfg.pre_norm, model.cfg.num_classes) == ("quick", True, 24)
    oracle = _timm_oracle(_timm_vit(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2, pre_norm=True,
                                    num_classes=24, act_layer="quick_gelu",
                                    norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)), sd)
    x = _images()
    with torch.no_grad():
        _close(model(x), oracle(x), 1e-5)
    # OpenCLIP's LAION towers use exact GELU: the caller says so
    exact = vitlab.load(tmp_path / "clip.pt", gelu="exact")
    assert exact.cfg.gelu == "exact"


@pytest.mark.parametrize("distilled", [True, False])
def test_deit_release_pth_with_model_key_matches_timm(tmp_path, distilled):
    from timm.models.deit import VisionTransformerDistilled

    cls = VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    # 128 wide: 2 heads, what vitlab assumes for a fused-qkv file of that width (width / 64)
    reference = randomize_weights_(cls(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2,
                                       num_classes=5)).eval()
    torch.save({"model": reference.state_dict(), "optimizer": {}, "epoch": 299}, tmp_path / "deit.pth")
    model = vitlab.load(tmp_path / "deit.pth")
    assert model.cfg.distilled == distilled
    x = _images()
    with torch.no_grad():
        _close(model(x), reference(x), 1e-5)


def test_deit3_release_gamma_names_load_as_layer_scale(tmp_path):
    from timm.models.deit import checkpoint_filter_fn

    reference = randomize_weights_(_timm_vit(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2,
                                             num_classes=5, init_values=1e-6, no_embed_class=True))
    release = {re.sub(r"ls([12])\.gamma", r"gamma_\1", k): v for k, v in reference.state_dict().items()}
    assert "blocks.0.gamma_1" in release
    torch.save({"model": release}, tmp_path / "deit_3_small_224_1k.pth")
    model = vitlab.load(tmp_path / "deit_3_small_224_1k.pth")
    assert model.cfg.no_embed_class and model.cfg.layer_scale
    oracle = _timm_vit(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2, num_classes=5,
                       init_values=1e-6, no_embed_class=True)
    oracle.load_state_dict(checkpoint_filter_fn(release, oracle, adapt_layer_scale=True), strict=True)
    x = _images()
    with torch.no_grad():
        _close(model(x), oracle(x), 1e-5)


@pytest.mark.parametrize("change,named", [
    (lambda sd: sd.pop("blocks.1.ls2.gamma"), "blocks.1.ls2.gamma"),
    (lambda sd: sd.__setitem__("blocks.0.ls1.gama", sd.pop("blocks.0.ls1.gamma")), "blocks.0.ls1.gama"),
    (lambda sd: sd.__setitem__("register_tokens", torch.zeros(1, 4, 7)), "reg_token"),
])
def test_a_wrong_or_missing_release_key_is_named_in_one_line(tmp_path, change, named):
    sd = dinov2_release(registers=4)
    change(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(VitlabError) as err:
        vitlab.load(tmp_path / "bad.pth")
    message = str(err.value)
    assert named in message and "\n" not in message


def siglip_big_vision_npz(path, dim=64, heads=2, depth=2, mlp=96, grid=2, patch=16, scanned=True):
    """A SigLIP image tower as big_vision saves it: ``params/img/`` (Linen names, top-level ``pos_embedding``, no
    class token, ``MAPHead_0``), optionally the scanned encoder, next to a text tower and the loss's ``t`` / ``b``."""
    import numpy as np

    gen = np.random.default_rng(0)

    def r(*shape):
        return (gen.standard_normal(shape) / max(shape[0], 1) ** 0.5).astype(np.float32)

    def ln(prefix, out):
        out[f"{prefix}/scale"] = (1 + 0.1 * gen.standard_normal(dim)).astype(np.float32)
        out[f"{prefix}/bias"] = (0.1 * gen.standard_normal(dim)).astype(np.float32)

    def mha(prefix, out):
        for name in ("query", "key", "value"):
            out[f"{prefix}/{name}/kernel"], out[f"{prefix}/{name}/bias"] = r(dim, heads, dim // heads), \
                0.1 * r(heads, dim // heads)
        out[f"{prefix}/out/kernel"], out[f"{prefix}/out/bias"] = r(heads, dim // heads, dim), 0.1 * r(dim)

    def mlp_block(prefix, out):
        out[f"{prefix}/Dense_0/kernel"], out[f"{prefix}/Dense_0/bias"] = r(dim, mlp), 0.1 * r(mlp)
        out[f"{prefix}/Dense_1/kernel"], out[f"{prefix}/Dense_1/bias"] = r(mlp, dim), 0.1 * r(dim)

    img = {"embedding/kernel": r(patch, patch, 3, dim), "embedding/bias": 0.1 * r(dim),
           "pos_embedding": r(1, grid * grid, dim)}
    blocks = []
    for _ in range(depth):
        b = {}
        ln("LayerNorm_0", b)
        mha("MultiHeadDotProductAttention_0", b)
        ln("LayerNorm_1", b)
        mlp_block("MlpBlock_0", b)
        blocks.append(b)
    if scanned:
        img.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        img.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    ln("Transformer/encoder_norm", img)
    img["MAPHead_0/probe"] = r(1, 1, dim)
    mha("MAPHead_0/MultiHeadDotProductAttention_0", img)
    ln("MAPHead_0/LayerNorm_0", img)
    mlp_block("MAPHead_0/MlpBlock_0", img)
    arrays = {f"params/img/{k}": v for k, v in img.items()}
    arrays.update({"params/txt/Embed_0/embedding": r(10, dim), "params/t": np.ones(1, np.float32),
                   "params/b": np.zeros(1, np.float32)})
    np.savez(path, **arrays)


@pytest.mark.parametrize("scanned", [True, False])
def test_siglip_big_vision_npz_with_map_head_matches_timms_npz_loader(tmp_path, scanned):
    from timm.models.vision_transformer import _load_weights

    siglip_big_vision_npz(tmp_path / "webli_en_b16_224.npz", scanned=scanned)
    model = vitlab.load(tmp_path / "webli_en_b16_224.npz")
    assert (model.cfg.pool, model.cfg.class_token, model.cfg.gelu, model.cfg.num_classes) == ("map", False, "tanh", 0)
    oracle = _timm_vit(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=1.5,
                       class_token=False, global_pool="map", num_classes=0, act_layer="gelu_tanh")
    _load_weights(oracle, str(tmp_path / "webli_en_b16_224.npz"))
    x = _images()
    with torch.no_grad():
        _close(model(x), oracle.eval()(x), 1e-5)


# ------------------------------------------------------------------------------------------------- vitlab convert
def _transformers_out(folder, x):
    import json

    name = json.loads((folder / "config.json").read_text())["architectures"][0]
    ref = getattr(transformers, name).from_pretrained(folder).eval()
    with torch.no_grad():
        out = ref(pixel_values=x)
    if name == "CLIPVisionModelWithProjection":
        return out.image_embeds
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg", "dinov2_swiglu", "deit", "siglip", "clip", "clip_proj"])
def test_convert_writes_transformers_folders_that_transformers_loads_with_equal_outputs(tmp_path, family):
    src = tmp_path / "src"
    size = 28 if family.startswith("dinov2") else 32
    if family.startswith("dinov2"):
        _dinov2(src, registers=4 if family == "dinov2_reg" else 0, swiglu=family == "dinov2_swiglu")
    elif family == "deit":
        _saved(transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TOWER, num_labels=5)),
               src)
    elif family == "siglip":
        _siglip(src, full=True)
    else:
        _clip(src, "full" if family == "clip_proj" else "vision")
    x = _images(size=size)
    model = vitlab.load(src)
    with torch.no_grad():
        expected = model(x)
    summary = convert(src, tmp_path / "hf", to="hf")
    assert any("written as transformers" in n for n in summary["notes"])
    _close(_transformers_out(tmp_path / "hf", x), expected)
    _close(vitlab.load(tmp_path / "hf")(x), expected)
    convert(src, tmp_path / "timm.safetensors", to="timm")  # timm's names are vitlab's own
    written = load_file(tmp_path / "timm.safetensors")
    assert written.keys() == model.state_dict().keys()
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())


def test_bare_transformers_weights_without_config_take_the_config_classes_defaults(tmp_path):
    # 128 wide with 2 heads: what vitlab assumes for fused layouts of that width (a bare file records no heads)
    ref, _ = _clip(tmp_path / "folder", "projection", hidden_size=128, intermediate_size=256)
    model = vitlab.load(tmp_path / "folder" / "model.safetensors")
    assert (model.cfg.gelu, model.cfg.norm_eps, model.cfg.num_heads) == ("quick", 1e-5, 2)
    x = _images()
    with torch.no_grad():
        _close(model(x), ref(pixel_values=x).image_embeds)


def test_vitlab_convert_command_writes_a_transformers_folder(tmp_path, capsys):
    from vitlab.cli import main

    ref, _ = _dinov2(tmp_path / "src", registers=4)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "hf"]) == 0
    x = _images(size=28)
    with torch.no_grad():
        _close(_transformers_out(tmp_path / "out", x), ref(x).pooler_output)


def test_dinov2_release_converts_to_a_transformers_folder_with_registers(tmp_path):
    sd = dinov2_release(registers=4)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    oracle = _timm_oracle(_timm_vit(img_size=28, patch_size=14, embed_dim=128, depth=2, num_heads=2,
                                    init_values=1e-5, num_classes=0, reg_tokens=4, no_embed_class=True), sd)
    convert(tmp_path / "dinov2_vits14_reg4_pretrain.pth", tmp_path / "hf", to="hf")
    x = _images(size=28)
    with torch.no_grad():
        _close(_transformers_out(tmp_path / "hf", x), oracle(x), 1e-5)


def test_convert_refuses_what_no_transformers_class_computes(tmp_path):
    reference = randomize_weights_(_timm_vit(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2,
                                             num_classes=5, init_values=1e-6, no_embed_class=True))
    torch.save(reference.state_dict(), tmp_path / "deit3.pth")
    with pytest.raises(InvalidValueError, match="transformers has no DeiT III"):
        convert(tmp_path / "deit3.pth", tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------- hf-hub: names
@pytest.fixture
def hub(tmp_path, monkeypatch):
    return offline_hub_cache(tmp_path, monkeypatch)


def _repo_files(folder, processor):
    processor.save_pretrained(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("family", ["dinov2_reg", "siglip", "clip"])
def test_hf_hub_repos_of_the_families_load_with_their_processors_preprocessing(hub, tmp_path, family):
    from tests.hub_fixtures import lay_out_hub_cache

    folder = tmp_path / "repo"
    if family == "dinov2_reg":  # facebook/dinov2-with-registers-*: BitImageProcessor, 256 -> 224 crop
        ref, _ = _dinov2(folder, registers=4)
        processor = transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                                   do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                                   image_std=[0.229, 0.224, 0.225], resample=3)
        expected = (("crop", 28 / 32, "bicubic"), (0.485, 0.456, 0.406))
    elif family == "siglip":  # google/siglip-*: the full SiglipModel, squash, bicubic, [-1, 1]
        ref, _ = _siglip(folder, full=True)
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
        expected = (("squash", 1.0, "bicubic"), (0.5, 0.5, 0.5))
    else:  # openai/clip-vit-*: the full CLIPModel, shortest edge + centre crop, CLIP's statistics
        ref, _ = _clip(folder, "full")
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        expected = (("crop", 1.0, "bicubic"), (0.48145466, 0.4578275, 0.40821073))
    lay_out_hub_cache(hub, f"org/{family}-test", _repo_files(folder, processor))
    model = vitlab.load(f"hf-hub:org/{family}-test")
    pre = model.preprocessing
    assert ((pre.resize, pre.crop_pct, pre.interpolation), tuple(pre.mean)) == expected
    x = _images(size=28 if family == "dinov2_reg" else 32)
    with torch.no_grad():
        _close(model(x), ref(x).pooler_output if family == "dinov2_reg" else _image_features(ref, x))


def test_hf_hub_siglip_repo_downloads_from_a_loopback_hub(hub, tmp_path, monkeypatch):
    from tests.hub_fixtures import LoopbackHub

    ref, _ = _siglip(tmp_path / "repo")
    files = _repo_files(tmp_path / "repo", transformers.SiglipImageProcessor(size={"height": 32, "width": 32}))
    server = LoopbackHub({"google/siglip-test": files})
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model = vitlab.load("hf-hub:google/siglip-test")
    finally:
        server.stop()
    x = _images()
    with torch.no_grad():
        _close(model(x), ref(x).pooler_output)


# ------------------------------------------------------------------------------------------------- full size
FULL_SIZE = {  # transformers config.json values of the published repos (one per family), the registry name
    "dinov2_s14": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518, patch_size=14,
        layerscale_value=1.0)), 518),  # facebook/dinov2-small
    "dinov2_s14_reg4": (lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518, patch_size=14,
        num_register_tokens=4)), 518),  # facebook/dinov2-with-registers-small
    "deit_ti16_distilled": (lambda: transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224,
        patch_size=16, num_labels=1000)), 224),  # facebook/deit-tiny-distilled-patch16-224
    "siglip_b16": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
        patch_size=16)), 224),  # the vision tower of google/siglip-base-patch16-224
    "clip_b32_quickgelu": (lambda: transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
        patch_size=32, projection_dim=512)), 224),  # the vision tower of openai/clip-vit-base-patch32
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_transformers_configs_load_as_the_registry_models(tmp_path, name):
    build, size = FULL_SIZE[name]
    ref, _ = _saved(build(), tmp_path)
    model = vitlab.load(tmp_path, model_name=name)  # the architecture fields are checked against the name
    reference = vitlab.create_model(name, img_size=size)
    assert model.num_params() == reference.num_params()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in
                                                                   reference.state_dict().items()}
    x = _images(n=1, size=size)
    with torch.no_grad():
        out = ref(pixel_values=x)
        expected = out.image_embeds if hasattr(out, "image_embeds") else (
            out.logits if hasattr(out, "logits") else out.pooler_output)
        _close(model(x), expected)
