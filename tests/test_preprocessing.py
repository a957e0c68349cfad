"""The preprocessing record: values, geometry and validation."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.preprocessing import Preprocessing


def test_paper_preprocessing_maps_pixels_to_minus_one_one_and_squashes():
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, 20:] = 255  # right half white
    x = Preprocessing.for_model(8).transform()(Image.fromarray(img))
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, :, 0], torch.full((3, 8), -1.0))
    torch.testing.assert_close(x[:, :, -1], torch.full((3, 8), 1.0))


def test_crop_policy_keeps_the_centre_and_grey_scale_has_one_channel():
    img = np.zeros((100, 100), dtype=np.uint8)
    img[40:60, 40:60] = 255
    p = Preprocessing(img_size=10, resize="crop", crop_pct=0.5, channels=1, mean=(0.0,), std=(1.0,))
    x = p.transform()(Image.fromarray(img).convert("RGB"))
    assert x.shape == (1, 10, 10)
    # shorter side 100 -> 20 (10 / crop_pct), so the 20 px square becomes 4 px, centred in the 10 px crop
    assert x[0, 4:6, 4:6].min() > 0.99 and x[0, 3:7, 3:7].min() > 0.5 and x[0, 0, 0] < 0.01


def test_round_trip_and_validation():
    p = Preprocessing(img_size=(32, 48), resize="crop", crop_pct=0.9, interpolation="bicubic")
    assert Preprocessing.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="lanczos7")
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        Preprocessing.from_dict({"size": 3})
    with pytest.raises(ValueError, match="mean and std"):
        Preprocessing(channels=1)
