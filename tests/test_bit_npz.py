"""BiT ResNet-v2 releases (the paper's convolutional baseline): BiT's own ``.npz`` layout and timm's ResNetV2 state
dicts read into vitlab's ResNetV2, checked against timm's model and timm's own BiT npz loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlab
from tests.checkpoint_fixtures import randomize_weights_

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def bit():
    return randomize_weights_(timm.create_model("resnetv2_50x1_bit", num_classes=5), seed=1).eval()


def _bit_arrays(model) -> dict[str, np.ndarray]:
    """BiT's npz names for a timm ResNetV2 (the names timm's ``_load_weights`` reads), kernels as HWIO."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hwio = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # noqa: E731
    out = {"resnet/root_block/standardized_conv2d/kernel": hwio(sd["stem.conv.weight"]),
           "resnet/group_norm/gamma": sd["norm.weight"], "resnet/group_norm/beta": sd["norm.bias"],
           "resnet/head/conv2d/kernel": hwio(sd["head.fc.weight"]), "resnet/head/conv2d/bias": sd["head.fc.bias"]}
    for i, stage in enumerate(model.stages):
        for j, _ in enumerate(stage.blocks):
            ours, theirs = f"stages.{i}.blocks.{j}", f"resnet/block{i + 1}/unit{j + 1:02d}"
            for n, letter in enumerate("abc", start=1):
                out[f"{theirs}/{letter}/standardized_conv2d/kernel"] = hwio(sd[f"{ours}.conv{n}.weight"])
                out[f"{theirs}/{letter}/group_norm/gamma"] = sd[f"{ours}.norm{n}.weight"]
                out[f"{theirs}/{letter}/group_norm/beta"] = sd[f"{ours}.norm{n}.bias"]
            if f"{ours}.downsample.conv.weight" in sd:
                out[f"{theirs}/a/proj/standardized_conv2d/kernel"] = hwio(sd[f"{ours}.downsample.conv.weight"])
    return out


def test_bit_npz_gives_timms_logits(bit, tmp_path):
    from timm.models.resnetv2 import _load_weights

    path = tmp_path / "BiT-M-R50x1.npz"
    np.savez(path, **_bit_arrays(bit))
    check = timm.create_model("resnetv2_50x1_bit", num_classes=5).eval()
    _load_weights(check, str(path))  # timm's reader of BiT's files agrees that the test wrote that layout
    model = vitlab.load(path)
    assert model.cfg.layers == (3, 4, 6, 3) and model.cfg.num_classes == 5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(check(x), bit(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), bit(x), rtol=1e-4, atol=1e-4)
    assert vitlab.checkpoints.inspect_checkpoint(path)["format"] == "bit"


def test_timm_resnetv2_state_dict_loads(bit, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bit.safetensors"
    save_file({k: v.contiguous() for k, v in bit.state_dict().items()}, str(path))
    model = vitlab.load(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bit(x), rtol=1e-4, atol=1e-4)
