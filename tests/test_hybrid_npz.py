"""Hybrid (ResNet + ViT) ``.npz`` files in the vit_jax layout: vitlab reads them into the same tensors as timm's npz
loader and computes the same logits; the hybrid and BiT families save and load in vitlab's format."""

import numpy as np
import pytest
import torch

import vitlab
from vitlab.checkpoints import read_checkpoint
from vitlab.checkpoints.hybrid_npz import with_timm_numerics
from vitlab.errors import VitlabError
from vitlab.models import HybridVisionTransformer

from .checkpoint_fixtures import save_npz, vit_jax_arrays
from .conftest import randomize_

timm = pytest.importorskip("timm")


def _kernel(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(2, 3, 1, 0).astype(np.float32)  # (out, in, kh, kw) -> (kh, kw, in, out)


def hybrid_arrays(model: torch.nn.Module, old_gn_root: bool = False) -> dict[str, np.ndarray]:
    """The vit_jax arrays of a timm hybrid, written from vit_jax's parameter names (not with vitlab's code)."""
    out = vit_jax_arrays(model)
    backbone = model.patch_embed.backbone
    stem = backbone.stem if hasattr(backbone, "stem") else backbone
    out["conv_root/kernel"] = _kernel(stem.conv.weight)
    scale, bias = stem.norm.weight.detach().numpy(), stem.norm.bias.detach().numpy()
    if old_gn_root:
        scale, bias = scale.reshape(1, 1, 1, -1), bias.reshape(1, 1, 1, -1)
    out["gn_root/scale"], out["gn_root/bias"] = scale, bias
    for s, stage in enumerate(getattr(backbone, "stages", []), start=1):
        for u, block in enumerate(stage.blocks, start=1):
            p = f"block{s}/unit{u}/"
            for r in (1, 2, 3):
                out[f"{p}conv{r}/kernel"] = _kernel(getattr(block, f"conv{r}").weight)
                out[f"{p}gn{r}/scale"] = getattr(block, f"norm{r}").weight.detach().numpy()
                out[f"{p}gn{r}/bias"] = getattr(block, f"norm{r}").bias.detach().numpy()
            if block.downsample is not None:
                out[f"{p}conv_proj/kernel"] = _kernel(block.downsample.conv.weight)
                out[f"{p}gn_proj/scale"] = block.downsample.norm.weight.detach().numpy()
                out[f"{p}gn_proj/bias"] = block.downsample.norm.bias.detach().numpy()
    return out


def _timm_hybrid(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, num_classes=7, img_size=64, depth=2, **kwargs)


CASES = {  # timm name, extra kwargs (a narrower transformer keeps the test fast), old-style gn_root
    "r50_b16": ("vit_base_r50_s16_224", {"embed_dim": 192, "num_heads": 3}, False),
    "r26_s32": ("vit_small_r26_s32_224", {}, True),
    "r_ti16": ("vit_tiny_r_s16_p8_224", {}, False),
}


@pytest.fixture(params=list(CASES))
def hybrid_npz(request, tmp_path):
    name, kwargs, old = CASES[request.param]
    source = randomize_(_timm_hybrid(name, **kwargs)).eval()
    path = tmp_path / f"{request.param}.npz"
    save_npz(path, hybrid_arrays(source, old_gn_root=old))
    reference = _timm_hybrid(name, **kwargs).eval()
    reference.load_pretrained(str(path))  # timm's own npz loader (vision_transformer._load_weights)
    return path, reference


def test_hybrid_npz_reads_the_tensors_timm_reads_and_gives_its_logits(hybrid_npz):
    path, reference = hybrid_npz
    ckpt = read_checkpoint(path)
    assert ckpt.architecture.name == "hybrid" and ckpt.config.img_size == (64, 64)
    expected_sd = reference.state_dict()
    assert set(ckpt.state_dict) == set(expected_sd)
    for key, value in ckpt.state_dict.items():
        torch.testing.assert_close(value, expected_sd[key], atol=0, rtol=0, msg=key)
    model = HybridVisionTransformer(with_timm_numerics(ckpt.config)).eval()
    model.load_state_dict(ckpt.state_dict, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        assert expected.abs().max() > 0.02
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
        # vitlab.load computes as vit_jax does (std + 1e-5, GroupNorm 1e-6, tanh GELU): close to timm, not equal
        faithful = vitlab.load(path)
        cfg = faithful.cfg
        assert (cfg.gelu, cfg.backbone.ws_eps_mode, cfg.backbone.gn_eps) == ("tanh", "std", 1e-6)
        diff = (faithful(x) - expected).abs().max().item()
        assert 0 < diff < 0.05


def test_hybrid_npz_config_follows_the_arrays(tmp_path):
    source = randomize_(_timm_hybrid(CASES["r50_b16"][0], **CASES["r50_b16"][1])).eval()
    path = tmp_path / "r50.npz"
    save_npz(path, hybrid_arrays(source))
    cfg = read_checkpoint(path).config
    assert cfg.backbone.layers == (3, 4, 9) and cfg.backbone.num_features == 1024 and cfg.backbone.stride == 16
    assert cfg.patch_size == (1, 1) and cfg.grid_size == (4, 4) and cfg.in_chans == 3
    # a named model is checked against the arrays; a new resolution resamples the position embedding on the grid
    with pytest.raises(VitlabError, match="not a r50_vit_b16: embed_dim 192"):
        read_checkpoint(path, model_name="r50_vit_b16")
    model = vitlab.load(path, img_size=96)
    assert model.cfg.grid_size == (6, 6) and model.pos_embed.shape == (1, 37, 192)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_hybrid_npz_with_missing_or_inconsistent_arrays_is_refused(tmp_path):
    source = randomize_(_timm_hybrid(CASES["r26_s32"][0], **CASES["r26_s32"][1])).eval()
    arrays = hybrid_arrays(source)
    broken = {k: v for k, v in arrays.items() if k != "block2/unit2/gn3/bias"}
    save_npz(tmp_path / "missing.npz", broken)
    with pytest.raises(VitlabError, match="missing arrays: block2/unit2/gn3/bias"):
        read_checkpoint(tmp_path / "missing.npz")
    stray = dict(arrays, **{"block1/unit1/conv_proj2/kernel": arrays["block1/unit1/conv_proj/kernel"]})
    save_npz(tmp_path / "stray.npz", stray)
    with pytest.raises(VitlabError, match="unexpected arrays: block1/unit1/conv_proj2/kernel"):
        read_checkpoint(tmp_path / "stray.npz")
    short = {k: v for k, v in arrays.items() if not k.startswith("block4/")}  # embedding still reads 2048 channels
    save_npz(tmp_path / "short.npz", short)
    with pytest.raises(VitlabError, match="reads 2048 channels but the backbone"):
        read_checkpoint(tmp_path / "short.npz")


@pytest.mark.parametrize("name,overrides", [
    ("r_vit_fmnist", {"depth": 1}),
    ("bit_fmnist", {"layers": (1, 1), "channels": (128, 256)}),
])
def test_hybrid_and_bit_round_trip_in_vitlab_format(tmp_path, name, overrides):
    model = randomize_(vitlab.create_model(name, **overrides)).eval()
    path = vitlab.save(model, tmp_path / "m.safetensors", class_names=[str(i) for i in range(10)])
    loaded = vitlab.load(path)
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    retargeted = vitlab.load(path, num_classes=3)
    assert retargeted(x).shape == (2, 3) and torch.count_nonzero(retargeted(x)) == 0


def test_info_names_hybrids_and_bit_by_their_backbone(tmp_path):
    from vitlab.checkpoints.inspection import inspect_checkpoint, matching_model
    from vitlab.cli.info import format_info

    # R26+B/32 and R50+B/16 share the transformer and the 1x1 patch: only the backbone tells them apart
    assert matching_model(vitlab.get_config("r26_vit_b32", img_size=384)) == "r26_vit_b32"
    assert matching_model(vitlab.get_config("vit_base_r50_s16_384")) == "r50_vit_b16"
    assert matching_model(vitlab.get_config("resnetv2_101x1_bit", num_classes=5)) == "bit_r101x1"
    for name in ("bit_fmnist", "r_vit_fmnist"):
        path = vitlab.save(vitlab.create_model(name), tmp_path / f"{name}.safetensors")
        info = inspect_checkpoint(path)
        assert info["model"] == name
        assert ("convolutional" in format_info(info)) == (name == "bit_fmnist")
