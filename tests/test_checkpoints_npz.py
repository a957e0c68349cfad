"""Official Google .npz checkpoints (vit_jax and big_vision layouts), built in code from their published key names.

Oracles: timm's own npz loader (``model.load_pretrained(path)``, exact GELU) and a plain numpy forward written in the
JAX layout with tanh GELU (tests/checkpoint_fixtures.py).
"""

import warnings

import numpy as np
import pytest
import torch

import vitlab
from vitlab.checkpoints import CheckpointWarning, convert, inspect_checkpoint, read_checkpoint
from vitlab.errors import VitlabError
from vitlab.preprocessing import Preprocessing

from .checkpoint_fixtures import (
    bfloat16_round,
    jax_reference_logits,
    random_timm_vit,
    save_npz,
    to_big_vision,
    vit_jax_arrays,
)

timm = pytest.importorskip("timm")

IMG = 32


def _images(n=2, size=(IMG, IMG), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=gen)


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _timm_npz_logits(path, x, **kwargs):
    """timm's own npz loader on a fresh model of the same architecture (exact GELU)."""
    model = random_timm_vit(seed=99, **kwargs)  # different weights: everything must come from the file
    model.load_pretrained(str(path))
    return _logits(model.eval(), x), model


def _jax_logits(arrays, x, **kwargs):
    return torch.from_numpy(jax_reference_logits(arrays, x.permute(0, 2, 3, 1).numpy(), **kwargs)).float()


# ------------------------------------------------------------------------------------------------- vit_jax
def test_vit_jax_layout_matches_timm_loader_and_jax_reference(tmp_path):
    reference = random_timm_vit()
    arrays = vit_jax_arrays(reference)
    assert len(arrays) == 2 + 2 + 2 + 16 * 2 + 2  # embedding, cls + pos, final norm, 16 per block, head (B/16: 200)
    path = tmp_path / "ViT-Ti_8.npz"
    save_npz(path, arrays)
    x = _images()
    timm_logits, _ = _timm_npz_logits(path, x)
    exact = vitlab.load(path, gelu="exact")
    diff = (_logits(exact, x) - timm_logits).abs().max().item()
    assert timm_logits.abs().max() > 0.05 and diff < 1e-5
    model = vitlab.load(path)  # npz default: tanh GELU, as Flax computes
    assert model.cfg.gelu == "tanh"
    jax_logits = _jax_logits(arrays, x)
    torch.testing.assert_close(_logits(model, x), jax_logits, atol=1e-5, rtol=1e-5)
    assert (_logits(exact, x) - jax_logits).abs().max() > 1e-4  # the GELU flavour is visible at this scale
    assert model.preprocessing == Preprocessing.for_model((IMG, IMG))  # squash, bilinear, [-1, 1]


def test_architecture_is_inferred_from_the_arrays(tmp_path):
    reference = random_timm_vit(width=192, heads=6, mlp=256, depth=3, patch=4, img_size=24, num_classes=11)
    rep = np.random.default_rng(0).standard_normal((192, 40)).astype(np.float32) * 0.05
    save_npz(tmp_path / "a.npz", vit_jax_arrays(reference, representation=(rep, np.zeros(40, np.float32))))
    cfg = read_checkpoint(tmp_path / "a.npz").config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.grid_size) == (
        3, 192, 6, 256, (4, 4), (6, 6))
    assert (cfg.pool, cfg.representation_size, cfg.num_classes, cfg.img_size) == ("token", 40, 11, (24, 24))


def test_pre_logits_files_load_features_like_timm_and_logits_like_jax(tmp_path):
    reference = random_timm_vit()
    rng = np.random.default_rng(3)
    rep = (rng.standard_normal((192, 192)) * 0.05).astype(np.float32), (rng.standard_normal(192) * 0.05).astype(
        np.float32)
    arrays = vit_jax_arrays(reference, representation=rep)
    assert len(arrays) == 40 + 2  # like 202 vs 200 for ViT-B/16: pre_logits kernel and bias
    save_npz(tmp_path / "pre.npz", arrays)
    x = _images()
    model = vitlab.load(tmp_path / "pre.npz")
    assert model.cfg.representation_size == 192
    torch.testing.assert_close(_logits(model, x), _jax_logits(arrays, x), atol=1e-5, rtol=1e-5)
    # timm drops the representation layer: compare the pooled, normalised class token
    timm_model = random_timm_vit(seed=99, num_classes=0)
    timm_model.load_pretrained(str(tmp_path / "pre.npz"))
    exact = vitlab.load(tmp_path / "pre.npz", gelu="exact")
    with torch.no_grad():
        torch.testing.assert_close(exact.forward_features(x)[:, 0], timm_model(x), atol=1e-5, rtol=1e-5)
    dropped = vitlab.load(tmp_path / "pre.npz", num_classes=10, drop_pre_logits=True)
    assert dropped.cfg.representation_size is None and not dropped.head.weight.any()


def test_zeroed_imagenet21k_head_is_reported_not_used_silently(tmp_path):
    save_npz(tmp_path / "in21k.npz", vit_jax_arrays(random_timm_vit(), zero_head=True))
    with pytest.warns(CheckpointWarning, match="all zeros"):
        vitlab.load(tmp_path / "in21k.npz")
    info = inspect_checkpoint(tmp_path / "in21k.npz")
    assert info["facts"]["zeroed_head"] and any("ImageNet-21k" in n for n in info["notes"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = vitlab.load(tmp_path / "in21k.npz", num_classes=3)  # a new head: nothing to warn about
    assert model.cfg.num_classes == 3


# ------------------------------------------------------------------------------------------------- big_vision
@pytest.mark.parametrize("prefix,scanned", [("params/", False), ("opt/target/", True), ("params/img/", True),
                                            ("", False)])
def test_big_vision_token_layout_matches_timm_and_jax(tmp_path, prefix, scanned):
    reference = random_timm_vit()
    arrays = vit_jax_arrays(reference)
    bv = to_big_vision(arrays, prefix=prefix, scanned=scanned)
    assert bv[f"{prefix}pos_embedding"].shape == (1, 16, 192)  # no class slot
    if scanned:
        assert bv[f"{prefix}Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 192, 384)
    path = tmp_path / "bv.npz"
    save_npz(path, bv)
    x = _images()
    ckpt = read_checkpoint(path)
    assert ckpt.format == "big_vision" and ckpt.facts["scanned"] == scanned
    # timm reads the class-slot-free embedding into a no_embed_class model
    timm_logits, _ = _timm_npz_logits(path, x, no_embed_class=True)
    torch.testing.assert_close(_logits(vitlab.load(path, gelu="exact"), x), timm_logits, atol=1e-5, rtol=1e-5)
    canonical = dict(arrays)
    canonical["Transformer/posembed_input/pos_embedding"] = arrays["Transformer/posembed_input/pos_embedding"][:, 1:]
    torch.testing.assert_close(_logits(vitlab.load(path), x), _jax_logits(canonical, x, pos_has_class_slot=False),
                               atol=1e-5, rtol=1e-5)


def test_big_vision_gap_without_class_token(tmp_path):
    reference = random_timm_vit(class_token=False, global_pool="avg", fc_norm=False)
    arrays = vit_jax_arrays(reference)
    assert "cls" not in arrays
    path = tmp_path / "gap.npz"
    save_npz(path, to_big_vision(arrays, scanned=True))
    model = vitlab.load(path)
    assert (model.cfg.pool, model.cfg.class_token, model.cfg.norm_after_pool) == ("gap", False, False)
    x = _images()
    timm_logits, _ = _timm_npz_logits(path, x, class_token=False, global_pool="avg", fc_norm=False)
    torch.testing.assert_close(_logits(vitlab.load(path, gelu="exact"), x), timm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, x), _jax_logits(arrays, x, pool="gap"), atol=1e-5, rtol=1e-5)


def test_big_vision_bfloat16_void_arrays(tmp_path):
    reference = random_timm_vit()
    arrays = vit_jax_arrays(reference)
    bv = to_big_vision(arrays, scanned=True, bfloat16=True)
    assert all(v.dtype == np.dtype("V2") for v in bv.values())
    save_npz(tmp_path / "bf16.npz", bv)
    rounded = {k: bfloat16_round(v) for k, v in arrays.items()}
    save_npz(tmp_path / "f32.npz", to_big_vision(rounded, scanned=True))  # the same values in float32, for timm
    x = _images()
    timm_logits, _ = _timm_npz_logits(tmp_path / "f32.npz", x, no_embed_class=True)
    model = vitlab.load(tmp_path / "bf16.npz", gelu="exact")
    assert model.pos_embed.dtype == torch.float32
    torch.testing.assert_close(_logits(model, x), timm_logits, atol=1e-5, rtol=1e-5)
    assert inspect_checkpoint(tmp_path / "bf16.npz")["facts"]["bfloat16"]


def test_an_incomplete_map_head_is_named(tmp_path):
    """'map' pooling is read (tests/test_families_sources.py); a probe without the rest of MAPHead_0 is named."""
    arrays = to_big_vision(vit_jax_arrays(random_timm_vit()))
    arrays["params/MAPHead_0/probe"] = np.zeros((1, 1, 192), np.float32)
    save_npz(tmp_path / "map.npz", arrays)
    with pytest.raises(VitlabError, match="unexpected arrays: MAPHead_0/probe"):
        vitlab.load(tmp_path / "map.npz")


def test_unexpected_and_missing_arrays_are_listed(tmp_path):
    arrays = vit_jax_arrays(random_timm_vit())
    arrays["Transformer/encoderblock_1/extra/kernel"] = np.zeros((2, 2), np.float32)
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    save_npz(tmp_path / "odd.npz", arrays)
    with pytest.raises(VitlabError, match=r"missing arrays: Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias;"
                                          r" unexpected arrays: Transformer/encoderblock_1/extra/kernel"):
        vitlab.load(tmp_path / "odd.npz")


# ------------------------------------------------------------------------------------------------- resolution
def test_npz_resampling_default_is_vit_jax_bilinear_aligned_corners(tmp_path):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    reference = random_timm_vit(img_size=224, patch=16, depth=1)
    arrays = vit_jax_arrays(reference)
    save_npz(tmp_path / "r224.npz", arrays)
    model = vitlab.load(tmp_path / "r224.npz", img_size=384)
    pos = arrays["Transformer/posembed_input/pos_embedding"][0]
    grid = pos[1:].reshape(14, 14, -1)
    zoomed = scipy_ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1)  # vit_jax's rule
    expected = np.concatenate([pos[:1], zoomed.reshape(576, -1)])[None]
    diff = np.abs(model.pos_embed.detach().numpy() - expected).max()
    assert diff < 1e-5, diff
    # timm's npz loader resamples bilinearly without aligned corners; the same method gives the same model
    x = _images(1, (384, 384))
    timm_logits, _ = _timm_npz_logits(tmp_path / "r224.npz", x, img_size=384, patch=16, depth=1)
    bilinear = vitlab.load(tmp_path / "r224.npz", img_size=384, resample="bilinear", gelu="exact")
    torch.testing.assert_close(_logits(bilinear, x), timm_logits, atol=1e-5, rtol=1e-5)


def test_npz_non_square_target_resolution(tmp_path):
    save_npz(tmp_path / "sq.npz", vit_jax_arrays(random_timm_vit()))
    model = vitlab.load(tmp_path / "sq.npz", img_size=(32, 64))
    assert model.cfg.grid_size == (4, 8) and model.pos_embed.shape == (1, 33, 192)
    assert _logits(model, _images(1, (32, 64))).shape == (1, 7)


# ------------------------------------------------------------------------------------------------- export
def test_export_npz_is_the_vit_jax_layout_and_round_trips_exactly(tmp_path):
    reference = random_timm_vit()
    model = vitlab.create_model("vit_ti16", img_size=IMG, patch_size=8, depth=2, mlp_dim=384, num_classes=7,
                                gelu="tanh")
    model.load_state_dict(reference.state_dict())
    model.eval()
    vitlab.save(model, tmp_path / "m.safetensors")
    summary = convert(tmp_path / "m.safetensors", tmp_path / "m.npz", to="npz")
    assert summary["notes"] == []
    with np.load(tmp_path / "m.npz", allow_pickle=False) as data:
        written = {k: data[k] for k in data.files}
    expected = vit_jax_arrays(reference)
    assert sorted(written) == sorted(expected)
    for key in expected:
        assert written[key].dtype == np.float32 and np.array_equal(written[key], expected[key]), key
    back = vitlab.load(tmp_path / "m.npz")
    x = _images()
    assert torch.equal(_logits(back, x), _logits(model, x))
    timm_logits, _ = _timm_npz_logits(tmp_path / "m.npz", x)  # timm reads vitlab's npz too
    torch.testing.assert_close(_logits(vitlab.load(tmp_path / "m.npz", gelu="exact"), x), timm_logits, atol=1e-5,
                               rtol=1e-5)


def test_big_vision_export_back_to_vit_jax_keeps_logits(tmp_path):
    arrays = vit_jax_arrays(random_timm_vit())
    save_npz(tmp_path / "bv.npz", to_big_vision(arrays, scanned=True))
    convert(tmp_path / "bv.npz", tmp_path / "vj.npz", to="npz")
    x = _images()
    torch.testing.assert_close(_logits(vitlab.load(tmp_path / "vj.npz"), x), _logits(vitlab.load(tmp_path / "bv.npz"),
                               x), atol=1e-6, rtol=1e-6)
    assert read_checkpoint(tmp_path / "vj.npz").format == "vit_jax"


def test_export_npz_refuses_what_vit_jax_cannot_express(tmp_path):
    model = vitlab.create_model("vit_ti16", img_size=IMG, patch_size=8, depth=1, pool="gap", norm_after_pool=True)
    with pytest.raises(ValueError, match="gap pooling"):
        vitlab.checkpoints.export_npz(model, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


# ------------------------------------------------------------------------------------------------- backbone plug-in
class _StemViT(vitlab.VisionTransformer):
    """A toy 'hybrid': a 1x1 convolution in front of the patch embedding, to exercise the npz backbone hook."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stem = torch.nn.Conv2d(cfg.in_chans, cfg.in_chans, 1)

    def embed(self, x, dynamic_img_size=None):
        return super().embed(self.stem(x), dynamic_img_size)


def test_npz_backbone_plug_in_maps_extra_arrays(tmp_path, monkeypatch):
    from vitlab.checkpoints import NpzBackbone, NpzRule, npz
    from vitlab.models import FAMILIES, ModelFamily, register_family

    monkeypatch.setattr(npz, "NPZ_BACKBONES", [])
    monkeypatch.setitem(FAMILIES, "stem_vit", ModelFamily("stem_vit", vitlab.ViTConfig, _StemViT))
    register_family(ModelFamily("stem_vit", vitlab.ViTConfig, _StemViT))  # same entry again: accepted

    def rules(arrays):
        return [NpzRule("stem.weight", ("conv_root/kernel",),
                        lambda a: torch.from_numpy(a.transpose(3, 2, 0, 1).copy()),
                        lambda t: (t.numpy().transpose(2, 3, 1, 0),)),
                NpzRule("stem.bias", ("conv_root/bias",), lambda a: torch.from_numpy(a.copy()), lambda t: (t.numpy(),))]

    npz.register_npz_backbone(NpzBackbone("toy stem", "stem_vit", lambda a: "conv_root/kernel" in a, rules,
                                          lambda fields, arrays: vitlab.ViTConfig(**fields)))
    reference = random_timm_vit()
    arrays = vit_jax_arrays(reference)
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    save_npz(tmp_path / "stem.npz", {"params/conv_root/kernel": kernel, "params/conv_root/bias": bias,
                                     **{f"params/{k}": v for k, v in to_big_vision(arrays, prefix="").items()}})
    model = vitlab.load(tmp_path / "stem.npz", gelu="exact")
    assert type(model) is _StemViT
    x = _images()
    stem_x = torch.einsum("nchw,cd->ndhw", x, torch.from_numpy(kernel[0, 0])) + torch.from_numpy(bias)[:, None, None]
    timm_model = random_timm_vit(seed=99, no_embed_class=True)
    timm_model.load_pretrained(str(tmp_path / "stem.npz"))
    torch.testing.assert_close(_logits(model, x), _logits(timm_model, stem_x), atol=1e-5, rtol=1e-5)
    again = vitlab.load(vitlab.save(model, tmp_path / "stem.safetensors"))  # the registered architecture round-trips
    assert type(again) is _StemViT and torch.equal(_logits(again, x), _logits(model, x))
