"""Augmentation of whole batches of in-memory images, one random draw per sample.

torchvision's transforms draw one set of parameters per call, so a batch tensor passed through them gets the same
crop for every image. For data held in memory as one uint8 tensor (Fashion-MNIST, CIFAR, digits) it is much faster to
augment the batch at once than to build PIL images one by one; these functions do that with per-sample parameters
drawn from an explicit ``torch.Generator``, or with ``keys`` from each sample's own key
(:mod:`vitlab.data.sample_random`: the same draws for a sample whichever process or micro-batch holds it), so that a
resumed run redraws exactly the same augmentations.

All functions take and return float tensors (B, C, H, W); :func:`to_float` maps uint8 pixels to [-1, 1] (the paper's
``(x - 127.5) / 127.5``) or to any mean / std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError
from . import sample_random as SR


def _uniform(batch: int, count: int, generator: torch.Generator | None, keys: torch.Tensor | None,
             stream: int) -> torch.Tensor:
    """(batch, count) uniform draws in [0, 1) on the CPU: from each sample's key when ``keys`` are given, else
    from ``generator``."""
    if keys is not None:
        # keys are made on the host (step_keys); a device copy would make .cpu() wait for the device
        return SR.keyed_uniform(keys if keys.device.type == "cpu" else keys.cpu(), count, stream)
    return torch.rand(batch, count, generator=generator)


def to_float(images: torch.Tensor, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 ``(x / 255 - mean) / std`` per channel; mean = std = 0.5 gives
    the paper's [-1, 1]."""
    c = images.shape[1]
    # built on the host and copied without waiting (a tensor made from numbers right on a GPU waits for it)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).to(images.device, non_blocking=True).expand(c).view(1, c, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).to(images.device, non_blocking=True).expand(c).view(1, c, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                keys: torch.Tensor | None = None) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = _uniform(x.shape[0], 1, generator, keys, SR.FLIP)[:, 0] < p
    return torch.where(flip.to(x.device, non_blocking=True).view(-1, 1, 1, 1), x.flip(-1), x)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                 fill: float = -1.0, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Translate each image by a random whole number of pixels in [-max_shift, max_shift] per axis (the "pad and
    random crop" of small-image recipes); uncovered pixels get ``fill`` (-1 is black after [-1, 1] scaling)."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    span = 2 * max_shift + 1
    offsets = (_uniform(B, 2, generator, keys, SR.SHIFT).t() * span).long().clamp_(max=span - 1)
    offsets = offsets.to(x.device, non_blocking=True)
    rows = (offsets[0, :, None] + torch.arange(H, device=x.device)).view(B, 1, H, 1)
    cols = (offsets[1, :, None] + torch.arange(W, device=x.device)).view(B, 1, 1, W)
    batch = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    chan = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return padded[batch, chan, rows, cols]


ERASE_SCALE = (0.02, 1 / 3)  # area of the erased rectangle, as a share of the image (Zhong et al. 2020, timm)
ERASE_RATIO = (0.3, 1 / 0.3)  # its aspect ratio, drawn log-uniform


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator | None = None,
                   keys: torch.Tensor | None = None) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) of normalised images (B, C, H, W): with probability ``p`` each image gets
    one rectangle of :data:`ERASE_SCALE` of its area and log-uniform aspect ratio in :data:`ERASE_RATIO`, placed
    uniformly, filled with standard normal noise per pixel and channel (torchvision's ``value="random"``, timm's
    ``mode="pixel"``). Sides too long for the image are clamped to it (torchvision retries the draw instead)."""
    if p <= 0:
        return x
    B, C, H, W = x.shape
    u = _uniform(B, 5, generator, keys, SR.ERASE)
    area = (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[:, 1]) * H * W
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = (log_lo + (log_hi - log_lo) * u[:, 2]).exp()
    h = (area * aspect).sqrt().round().clamp(1, H).long()
    w = (area / aspect).sqrt().round().clamp(1, W).long()
    top = (u[:, 3] * (H - h + 1)).long()
    left = (u[:, 4] * (W - w + 1)).long()
    rows, cols = torch.arange(H), torch.arange(W)
    inside = ((rows >= top[:, None]) & (rows < (top + h)[:, None]))[:, :, None] & \
             ((cols >= left[:, None]) & (cols < (left + w)[:, None]))[:, None, :]
    mask = (inside & (u[:, 0] < p)[:, None, None]).unsqueeze(1)  # (B, 1, H, W)
    if keys is not None:  # each image's noise from its own key, as its other draws
        uniform = SR.keyed_uniform(keys if keys.device.type == "cpu" else keys.cpu(), C * H * W, SR.ERASE_NOISE)
        noise = torch.special.ndtri(uniform.clamp_(2.0 ** -25, 1.0 - 2.0 ** -24)).view(B, C, H, W)
    else:
        noise = torch.randn(B, C, H, W, generator=generator)
    return torch.where(mask.to(x.device, non_blocking=True), noise.to(x.device, non_blocking=True), x)


def sample_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float] = (0.05, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None,
                      keys: torch.Tensor | None = None) -> torch.Tensor:
    """Random boxes (batch, 4) as (left, top, box width, box height) in pixels, fractional: area uniform in
    ``scale`` x image area, aspect ratio log-uniform in ``ratio``, clamped to the image, placed uniformly inside it
    (the Inception crop's distribution; torchvision's ``RandomResizedCrop`` draws the same area and ratio but retries
    instead of clamping)."""
    u = _uniform(batch, 4, generator, keys, SR.CROP)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = (log_lo + (log_hi - log_lo) * u[:, 1]).exp()
    w = (area * aspect).sqrt().clamp(1, width)
    h = (area / aspect).sqrt().clamp(1, height)
    left = u[:, 2] * (width - w)
    top = u[:, 3] * (height - h)
    return torch.stack([left, top, w, h], dim=1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flip: torch.Tensor | None = None,
                interpolation: str = "bilinear") -> torch.Tensor:
    """Crop box i of image i and resize it to ``size`` (``interpolation``: bilinear, bicubic or nearest; sample
    points at pixel centres as in ``F.interpolate(align_corners=False)``), mirroring the images where ``flip`` is
    true; one ``grid_sample`` for the batch. ``boxes``: (B, 4) as (left, top, width, height) in pixels."""
    B, _, H, W = x.shape
    left, top, w, h = boxes.unbind(1)
    sign = torch.where(flip, -1.0, 1.0) if flip is not None else torch.ones(B)
    # affine_grid works in normalised coordinates (align_corners=False: the image spans [-1, 1] edge to edge)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = sign * w / W
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype, non_blocking=True), [B, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=_mode(interpolation), padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] = (0.05, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False,
                        generator: torch.Generator | None = None, interpolation: str = "bilinear",
                        keys: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's Inception crop per sample (:func:`sample_crop_boxes`, default area 5%..100%), resized to
    ``size`` with ``interpolation``, optionally mirrored left-right with probability 1/2."""
    B, _, H, W = x.shape
    boxes = sample_crop_boxes(B, H, W, scale, ratio, generator, keys)
    mirror = _uniform(B, 1, generator, keys, SR.MIRROR)[:, 0] < 0.5 if flip else None
    return crop_resize(x, boxes, size, mirror, interpolation)


def _mode(interpolation: str) -> str:
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise InvalidValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
    return interpolation


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Squash a batch to ``size`` (``interpolation``: bilinear or bicubic, antialiased when shrinking; nearest);
    no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = _mode(interpolation)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def resize_center_crop(x: torch.Tensor, size: tuple[int, int], crop_pct: float,
                       interpolation: str = "bilinear") -> torch.Tensor:
    """timm's evaluation resize on a batch: the shorter side to ``size / crop_pct`` (the aspect ratio kept; both
    sides scaled to ``size / crop_pct`` when ``size`` is not square), then the centre ``size`` crop, placed as
    torchvision's ``CenterCrop`` places it (what :meth:`vitlab.preprocessing.Preprocessing.transform` does to one
    image)."""
    H, W = x.shape[-2:]
    th, tw = size
    if th == tw:
        short = int(round(th / crop_pct))
        scaled = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    else:
        scaled = (int(round(th / crop_pct)), int(round(tw / crop_pct)))
    x = resize(x, scaled, interpolation)
    top, left = int(round((scaled[0] - th) / 2.0)), int(round((scaled[1] - tw) / 2.0))
    return x[..., top: top + th, left: left + tw]
