"""Per-image training transforms (torchvision v2) for image folders and tar shards.

Policies: ``inception`` is the paper's training preprocessing (Inception crop covering 5%..100% of the area, random
left-right flip, square resize, pixels to [-1, 1]); ``crop`` is a milder random-resized crop (``crop_scale``, 0.08..1
in torchvision and timm), ``shift`` resizes and translates by a few pixels (small-image recipes), ``resize`` only
squashes to the square size (no augmentation). RandAugment can be added to any policy. Evaluation uses the model's
:class:`~vitlab.preprocessing.Preprocessing` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T

from ..errors import InvalidValueError
from . import batch_transforms as BT

POLICIES = ("inception", "crop", "shift", "flip", "resize", "none")


def train_transform(img_size: tuple[int, int], channels: int = 3, policy: str = "inception",
                    crop_scale: tuple[float, float] = (0.05, 1.0), flip: bool = True, max_shift: int = 0,
                    randaugment: tuple[int, int] | None = None, mean: Sequence[float] = (0.5,),
                    std: Sequence[float] = (0.5,), interpolation: str = "bilinear", erasing: float = 0.0) -> T.Compose:
    """PIL image (``RGB`` or ``L``) -> normalised float tensor (channels, H, W) with random augmentation.

    ``randaugment=(num_ops, magnitude)`` applies torchvision's RandAugment on the uint8 image before normalising.
    ``mean``/``std`` are per channel (a single value is repeated). ``erasing`` > 0: torchvision's random erasing
    with that probability, after normalising, filled with normal noise (the in-memory path's
    :func:`vitlab.data.batch_transforms.random_erasing` draws the same rectangles)."""
    if policy not in POLICIES:
        raise InvalidValueError(f"augmentation policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    interp = getattr(T.InterpolationMode, interpolation.upper())
    steps: list = [T.ToImage()]
    if policy in ("inception", "crop"):
        steps.append(T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=interp, antialias=True))
    else:
        steps.append(T.Resize(img_size, interpolation=interp, antialias=True))
        if policy == "shift" and max_shift > 0:
            steps.append(T.RandomCrop(img_size, padding=max_shift))
    if flip and policy != "none" and policy != "resize":
        steps.append(T.RandomHorizontalFlip())
    if randaugment is not None:
        steps.append(T.RandAugment(num_ops=randaugment[0], magnitude=randaugment[1]))
    mean_c = tuple(mean) * channels if len(mean) == 1 else tuple(mean)
    std_c = tuple(std) * channels if len(std) == 1 else tuple(std)
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean_c, std_c)]
    if erasing > 0:
        steps.append(T.RandomErasing(p=erasing, scale=BT.ERASE_SCALE, ratio=BT.ERASE_RATIO, value="random"))
    return T.Compose(steps)
