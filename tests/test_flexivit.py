"""Patch-size resampling (FlexiViT): the kernel resize equals timm's resample_patch_embed, satisfies FlexiViT's
defining property, and `vitlab.load(..., patch_size=)` / `vitlab convert --patch-size` give timm's logits."""

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.models.resample import patch_resize_matrix, resample_patch_embed

from .conftest import randomize_

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("old,new", [((16, 16), (8, 8)), ((16, 16), (32, 32)), ((8, 8), (12, 12)),
                                     ((6, 6), (8, 10))])
def test_kernel_resample_equals_timm_resample_patch_embed(old, new):
    from timm.layers import resample_patch_embed as timm_resample

    weight = torch.randn(12, 3, *old)
    torch.testing.assert_close(resample_patch_embed(weight, new), timm_resample(weight, list(new)),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("old,new", [((8, 8), (16, 16)), ((4, 6), (8, 9))])
def test_resampled_kernel_responds_to_resized_patches_as_the_original(old, new):
    """FlexiViT's definition: <x, w> = <resize(x), w'> for every patch x (exact when the patch grows)."""
    weight = torch.randn(10, 3, *old, dtype=torch.float64)
    patches = torch.randn(50, 3, *old, dtype=torch.float64)
    resized = F.interpolate(patches.float(), size=new, mode="bicubic", antialias=True, align_corners=False).double()
    new_weight = resample_patch_embed(weight, new)
    original = F.conv2d(patches, weight, stride=old)  # one output per patch: (50, 10, 1, 1)
    torch.testing.assert_close(F.conv2d(resized, new_weight, stride=new), original, atol=1e-4, rtol=1e-4)
    # the matrix form of the same resize
    B = patch_resize_matrix(old, new)
    torch.testing.assert_close(resized.reshape(50, 3, -1), patches.reshape(50, 3, -1) @ B.t(), atol=1e-5, rtol=1e-5)


def test_shrinking_patch_kernel_is_the_least_squares_fit():
    """Downsampling has no exact inverse: w' minimises the squared response error over all patches,
    i.e. B^T w' is the projection of w onto the range of B^T."""
    weight = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    new_weight = resample_patch_embed(weight, (4, 4))
    B = patch_resize_matrix((8, 8), (4, 4))  # (16, 64)
    w, w_new = weight.reshape(4, -1), new_weight.reshape(4, -1)
    residual = w - w_new @ B  # orthogonal to every response B^T v
    torch.testing.assert_close(residual @ B.t(), torch.zeros(4, 16, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("new_patch", [4, 16])
def test_load_with_patch_size_gives_timm_logits(tmp_path, new_patch):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    def timm_vit(patch):
        return VisionTransformer(img_size=32, patch_size=patch, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                                 num_classes=5).eval()

    source = randomize_(timm_vit(8))
    save_file(source.state_dict(), str(tmp_path / "p8.safetensors"))
    reference = timm_vit(new_patch)
    reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference), strict=True)
    ours = vitlab.load(tmp_path / "p8.safetensors", patch_size=new_patch)
    assert ours.cfg.patch_size == (new_patch, new_patch) and ours.cfg.grid_size == (32 // new_patch,) * 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        assert expected.abs().max() > 0.05
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)
    # the same through `vitlab convert --patch-size`
    assert main(["convert", str(tmp_path / "p8.safetensors"), str(tmp_path / "out.safetensors"), "--to", "vitlab",
                 "--patch-size", str(new_patch)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load(tmp_path / "out.safetensors")(x), expected, atol=1e-5, rtol=1e-4)


def test_patch_size_that_does_not_divide_the_image_is_one_error(tmp_path, capsys):
    model = vitlab.create_model("vit_ti16", img_size=32, depth=1, num_classes=3)
    vitlab.save(model, tmp_path / "m.safetensors")
    with pytest.raises(VitlabError, match="not a positive multiple of patch"):
        vitlab.load(tmp_path / "m.safetensors", patch_size=12)
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"), "--to", "vitlab",
                 "--patch-size", "12"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "patch" in err[0]
