"""Image files in, model inputs out, for the inspection figures."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..errors import VitlabError
from ..preprocessing import Preprocessing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def find_images(path: str | Path, limit: int | None = None) -> list[Path]:
    """The image file ``path``, or the image files under the folder ``path`` (recursively, sorted by path), at most
    ``limit`` of them. Raises :class:`VitlabError` when there are none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise VitlabError(f"--images {path}: no such file or folder")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise VitlabError(f"--images {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return found[:limit] if limit else found


def load_images(paths: list[Path], preprocessing: Preprocessing) -> torch.Tensor:
    """Decode and preprocess images: (N, channels, height, width) float32, normalised as the model expects.

    EXIF orientation is applied; a file that is not a readable image raises :class:`VitlabError` naming it."""
    transform = preprocessing.transform()
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                image.load()
                tensors.append(transform(image))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise VitlabError(f"{path}: not a readable image ({exc})") from exc
    return torch.stack(tensors)


def display_images(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Undo the normalisation for display: (N, C, H, W) -> (N, C, H, W) in [0, 1]."""
    mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)
    return (images.cpu() * std + mean).clamp(0.0, 1.0)
