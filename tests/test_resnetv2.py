"""BiT ResNet-v2: parity with timm on copied weights, weight standardisation and SAME padding against their
definitions, compute accounting against a count of the convolutions that actually run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.compute.flops import forward_macs, resnetv2_forward_macs
from vitlab.errors import VitlabError
from vitlab.models import ResNetV2, ResNetV2Config, config_from_dict, family_of
from vitlab.models.resnetv2 import pad_same, same_padding, standardize_weight

from .conftest import assert_checkpointing_keeps_gradients, randomize_

timm = pytest.importorskip("timm")


def _meta_params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def count_conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs of every Conv2d / Linear that runs, measured with forward hooks (independent of the analytic count)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        per_image = output[0].numel()
        if isinstance(module, torch.nn.Conv2d):
            total += per_image * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            total += per_image * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("ours,theirs,expected", [
    ("bit_r50x1", "resnetv2_50x1_bit", 25_549_352),  # timm's count for BiT-M R50x1
    ("bit_r101x1", "resnetv2_101x1_bit", None),
    ("resnetv2_152x2_bit", "resnetv2_152x2_bit", None),
])
def test_parameter_count_equals_timm(ours, theirs, expected):
    count = _meta_params(lambda: vitlab.create_model(ours))
    assert count == _meta_params(lambda: timm.create_model(theirs, num_classes=1000))
    if expected:
        assert count == expected


def test_bit_r50x1_logits_match_timm_with_copied_weights():
    reference = randomize_(timm.create_model("resnetv2_50x1_bit", num_classes=7)).eval()
    model = vitlab.create_model("bit_r50x1", num_classes=7).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected, got = reference(x), model(x)
        assert expected.abs().max() > 0.02
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True),
                                   atol=1e-5, rtol=1e-4)
        # the comparison is sensitive to padding: TF "SAME" instead of BiT's symmetric padding changes the logits
        same = vitlab.create_model("bit_r50x1", num_classes=7, padding="same").eval()
        same.load_state_dict(reference.state_dict())
        assert (same(x) - expected).abs().max() > 1e-3


def test_weight_standardisation_matches_both_definitions():
    w = torch.randn(8, 3, 5, 5) * 0.3 + 0.1
    flat = w.numpy().reshape(8, -1).astype(np.float64)
    mean, std = flat.mean(1, keepdims=True), flat.std(1, keepdims=True)
    timm_form = (flat - mean) / np.sqrt(std**2 + 1e-8)
    jax_form = (flat - mean) / (std + 1e-5)  # vit_jax models_resnet.weight_standardize
    np.testing.assert_allclose(standardize_weight(w, 1e-8, "var").reshape(8, -1).numpy(), timm_form, atol=1e-5)
    np.testing.assert_allclose(standardize_weight(w, 1e-5, "std").reshape(8, -1).numpy(), jax_form, atol=1e-5)
    ws = standardize_weight(w, 1e-8).reshape(8, -1)
    torch.testing.assert_close(ws.mean(1), torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(ws.var(1, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)


def test_tf_same_padding_values_and_conv_equivalence():
    assert same_padding(224, 7, 2) == (2, 3)  # odd total: the extra pixel goes after
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(56, 3, 1) == (1, 1)
    assert same_padding(56, 1, 2) == (0, 0)
    assert same_padding(5, 3, 2) == (1, 1)
    x = torch.randn(1, 2, 9, 10)
    w = torch.randn(4, 2, 3, 3)
    out = F.conv2d(pad_same(x, (3, 3), (2, 2)), w, stride=2)
    assert out.shape[-2:] == (math.ceil(9 / 2), math.ceil(10 / 2))
    # on the even axis SAME pads (0, 1); a symmetric pad (1, 1) shifts every window by one pixel
    symmetric = F.conv2d(x, w, stride=2, padding=1)
    assert out.shape == symmetric.shape and (out - symmetric).abs().max() > 1e-3
    # rows (odd, 9): SAME pads (1, 1); columns (even, 10): (0, 1)
    manual = F.conv2d(F.pad(x, (0, 1, 1, 1)), w, stride=2)
    torch.testing.assert_close(out, manual)


@pytest.mark.parametrize("name,overrides,size", [
    ("bit_r50x1", {}, 224),
    ("bit_r50x1", {"padding": "same"}, 97),  # odd size: both paddings round up
    ("bit_fmnist", {}, 28),
])
def test_analytic_macs_equal_the_convolutions_that_run(name, overrides, size):
    cfg = vitlab.get_config(name, img_size=size, **overrides)
    model = ResNetV2(cfg).eval()
    assert resnetv2_forward_macs(cfg) == forward_macs(cfg) == count_conv_macs(model, torch.randn(1, cfg.in_chans,
                                                                                                   size, size))


def test_bit_r50x1_compute_is_the_known_resnet50_figure():
    assert forward_macs(vitlab.get_config("bit_r50x1")) / 1e9 == pytest.approx(4.09, abs=0.01)


def test_head_reset_pre_logits_and_config_round_trip():
    model = vitlab.create_model("bit_fmnist")
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert torch.count_nonzero(model(x)) == 0  # zero-initialised head
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, 256)
    model.reset_head(4)
    assert model(x).shape == (3, 4) and model.cfg.num_classes == 4
    cfg = model.cfg
    assert family_of(cfg).name == "resnetv2" and family_of(ResNetV2(cfg)).model_class is ResNetV2
    assert config_from_dict(cfg.to_dict(), "resnetv2") == cfg
    with pytest.raises(ValueError, match="expected input of shape"):
        model(torch.randn(1, 3, 28, 28))


def test_config_errors_are_explicit():
    with pytest.raises(ValueError, match="divisible by gn_groups"):
        ResNetV2Config(stem_width=40)
    with pytest.raises(ValueError, match="padding must be"):
        ResNetV2Config(padding="valid")
    with pytest.raises(ValueError, match="unknown ResNet-v2 config keys"):
        vitlab.get_config("bit_r50x1", patch_size=16)
    with pytest.raises(ValueError, match="need as many channels"):
        ResNetV2Config(layers=(1, 1, 1, 1, 1))


def test_drop_path_only_in_training_and_checkpointing_keeps_gradients():
    model = randomize_(vitlab.create_model("bit_fmnist", drop_path_rate=0.5), std=0.2)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert (model(x) - model(x)).abs().max() > 1e-4
    assert_checkpointing_keeps_gradients(randomize_(vitlab.create_model("bit_fmnist"), std=0.2).train(), x, rtol=1e-4)


def test_bit_convert_and_features_give_one_line_errors(tmp_path, capsys):
    """A BiT checkpoint through `vitlab convert` (ViT-only layouts, a new resolution) and the `gap` representation
    were AttributeError / RuntimeError tracebacks."""
    from vitlab.cli import main
    from vitlab.evaluate.features import output_function

    src = tmp_path / "bit.safetensors"
    vitlab.save(vitlab.create_model("bit_fmnist"), src)
    for to, dst in [("npz", "b.npz"), ("hf", "b_hf"), ("timm", "b.pth"), ("torchvision", "tv.pth")]:
        assert main(["convert", str(src), str(tmp_path / dst), "--to", to]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write the {to} layout for a ResNetV2" in err
        assert not (tmp_path / dst).exists()
    assert main(["convert", str(src), str(tmp_path / "b32.safetensors"), "--to", "vitlab", "--img-size", "32",
                 "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "32x32 px, 5 classes" in out and "new resolution, new zero-initialised head" in out
    assert vitlab.load(tmp_path / "b32.safetensors").cfg.img_size == (32, 32)
    with pytest.raises(VitlabError, match="representation 'gap'.*needs a model with tokens"):
        output_function(vitlab.load(src), "gap")
