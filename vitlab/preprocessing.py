"""How images become model inputs: the preprocessing a saved model carries with it.

One small record shared by checkpoints (saved with the weights), data loading (evaluation transforms) and prediction.
The paper's evaluation squashes the image to the square resolution, bilinear, and maps pixels to [-1, 1]
(mean = std = 0.5); timm's ViT defaults resize the shorter side to ``size / crop_pct`` and centre-crop, bicubic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

from .errors import InvalidValueError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: resize policy, interpolation, channel count and normalisation.

    ``resize='squash'`` resizes straight to ``img_size`` (aspect ratio not kept; vit_jax, HF); ``resize='crop'``
    resizes the shorter side to ``img_size / crop_pct`` and takes the centre crop (timm). ``channels`` is 1 for
    grey-scale models (images are converted to ``L``), 3 (``RGB``), or any other count for multi-band images (read
    as float tensors from ``.npy`` / TIFF files, :func:`vitlab.data.load_sample`). Pixels in [0, 1] are normalised
    as ``(x - mean) / std`` per channel.
    """

    img_size: tuple[int, int] = (224, 224)
    resize: Literal["squash", "crop"] = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channels: int = 3

    def __post_init__(self) -> None:
        size = self.img_size
        object.__setattr__(self, "img_size", (size, size) if isinstance(size, int) else tuple(int(s) for s in size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = []
        if self.resize not in ("squash", "crop"):
            problems.append(f"resize must be 'squash' or 'crop', got {self.resize!r}")
        if not 0 < self.crop_pct <= 1:
            problems.append(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            problems.append(f"channels must be a positive integer, got {self.channels!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(f"mean and std need {self.channels} values each, got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            problems.append("std values must be positive")
        if problems:
            raise InvalidValueError("invalid preprocessing: " + "; ".join(problems))

    @classmethod
    def for_model(cls, img_size: tuple[int, int] | int, in_chans: int = 3, **changes) -> Preprocessing:
        """The paper's evaluation preprocessing for a model input: squash, bilinear, [-1, 1]."""
        base = cls(img_size=img_size, channels=in_chans, mean=(0.5,) * in_chans, std=(0.5,) * in_chans)
        return base.replace(**changes) if changes else base

    def replace(self, **changes) -> Preprocessing:
        """A copy with some fields changed (validated again)."""
        return type(self)(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        out = asdict(self)
        out.update(img_size=list(self.img_size), mean=list(self.mean), std=list(self.std))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidValueError(f"unknown preprocessing keys: {', '.join(unknown)}")
        return cls(**data)

    def transform(self):
        """A torchvision transform: PIL image (or a float tensor (channels, H, W) of an array image) -> float tensor
        (channels, height, width), normalised."""
        import torch
        from torchvision.transforms import v2 as T

        interp = getattr(T.InterpolationMode, self.interpolation.upper())
        # multi-band images arrive as tensors of the right channel count; only 1 and 3 have a colour conversion
        steps = [T.Grayscale(1) if self.channels == 1 else T.RGB()] if self.channels in (1, 3) else []
        if self.resize == "squash":
            steps.append(T.Resize(self.img_size, interpolation=interp, antialias=True))
        else:
            scaled = tuple(int(round(s / self.crop_pct)) for s in self.img_size)
            steps += [T.Resize(scaled if self.img_size[0] != self.img_size[1] else scaled[0], interpolation=interp,
                               antialias=True), T.CenterCrop(self.img_size)]
        steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)
