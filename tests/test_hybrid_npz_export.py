"""``vitlab convert --to npz`` for hybrids: the vit_jax layout (conv_root, gn_root, block{s}/unit{u}/...) that
vitlab reads back to equal logits and that timm's own npz loader reads into its hybrid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlab
from tests.conftest import randomize_
from vitlab.checkpoints import export_npz
from vitlab.checkpoints.hybrid_npz import TIMM_BACKBONE_NUMERICS, VIT_JAX_BACKBONE_NUMERICS
from vitlab.cli import main
from vitlab.models import create_model, get_config
from vitlab.models.hybrid import HybridVisionTransformer


def _hybrid(name: str, numerics: dict, gelu: str, **overrides) -> HybridVisionTransformer:
    cfg = get_config(name, **overrides)
    cfg = cfg.replace(gelu=gelu, backbone=cfg.backbone.replace(**numerics))
    return randomize_(HybridVisionTransformer(cfg)).eval()


@pytest.mark.parametrize("name,overrides", [
    ("r26_vit_s32", dict(img_size=64, depth=2, num_classes=5)),   # 4 stages of 2 units
    ("r_vit_ti16", dict(img_size=32, depth=2, num_classes=3)),    # the stem alone, 8x8 patches
    ("r50_vit_b16", dict(img_size=32, depth=1, num_classes=4, representation_size=768)),  # 3 stages, pre-logits
])
def test_hybrid_npz_round_trip_gives_equal_logits(tmp_path, name, overrides):
    model = _hybrid(name, VIT_JAX_BACKBONE_NUMERICS, "tanh", **overrides)
    path = tmp_path / "hybrid.npz"
    export_npz(model, path)
    keys = set(np.load(path).files)
    assert {"conv_root/kernel", "gn_root/scale", "embedding/kernel", "head/kernel"} <= keys
    if model.cfg.backbone.layers:
        assert "block1/unit1/conv_proj/kernel" in keys and "block1/unit2/gn3/bias" in keys
    back = vitlab.load(path)
    assert back.cfg == model.cfg
    x = torch.randn(2, 3, *model.cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-5)


def test_cli_converts_a_hybrid_to_npz_and_back(tmp_path, capsys):
    model = _hybrid("r26_vit_s32", VIT_JAX_BACKBONE_NUMERICS, "tanh", img_size=64, depth=1, num_classes=2)
    src = tmp_path / "hybrid.safetensors"
    vitlab.save(model, src)
    assert main(["convert", str(src), str(tmp_path / "hybrid.npz"), "--to", "npz"]) == 0
    capsys.readouterr()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load(tmp_path / "hybrid.npz")(x), model(x), rtol=0, atol=1e-5)


def test_timm_reads_the_exported_hybrid_npz(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import _load_weights

    model = _hybrid("r26_vit_s32", TIMM_BACKBONE_NUMERICS, "exact", img_size=64, depth=2, num_classes=5)
    path = tmp_path / "hybrid.npz"
    notes = export_npz(model, path)
    assert any("backbone computes with" in n for n in notes)  # timm numerics differ from vit_jax's: said so
    reference = timm.create_model("vit_small_r26_s32_224", img_size=64, depth=2, num_classes=5).eval()
    _load_weights(reference, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_hybrids_vit_jax_cannot_express_are_refused(tmp_path):
    model = create_model("r_vit_fmnist")  # 3x3 stem without max-pool, GroupNorm(8)
    with pytest.raises(ValueError, match="7x7 stem"):
        export_npz(model, tmp_path / "x.npz")
