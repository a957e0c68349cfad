"""Opening image files without the usual Pillow pitfalls.

``load_image`` decodes a file fully inside its own error handling and returns a clean ``RGB`` or ``L`` image:

- ``Image.open`` is lazy: a truncated file opens fine and fails only when pixels are read, so the pixels are read
  here (``load()``), not later inside a transform;
- ``DecompressionBombError`` is not an ``OSError``; images over ``max_pixels`` are refused before decoding;
- 16-bit (``I;16``) and 32-bit integer images are rescaled to 8 bits (``convert`` would clip everything above 255
  to white); float images in [0, 1] are scaled by 255;
- images with transparency are composited over a background colour instead of dropping the alpha channel;
- CMYK, YCbCr, LAB, HSV and palette images are converted to RGB; the EXIF orientation is applied.

Any failure to decode becomes an :class:`ImageLoadError` naming the file and the reason, so that a data loader can
skip and report it instead of crashing a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from ..errors import InvalidValueError, VitlabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
# Pillow's own decompression-bomb limit (about 89.5 megapixels); above it we refuse to decode
DEFAULT_MAX_PIXELS = 89_478_485


class ImageLoadError(VitlabError):
    """An image file that cannot be used: unreadable, truncated, not an image or too large."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """Rescale high-bit-depth single-channel images to 8-bit ``L`` without clipping."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
    elif img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs decode to mode I on some Pillow versions; only values above 255 tell the range apart
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
    else:
        return img
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with transparency over ``background`` (returns RGB)."""
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def load_image(path: str | Path | BinaryIO, channels: int = 3, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255), draft_size: tuple[int, int] | None = None,
               name: str | None = None) -> Image.Image:
    """Decode ``path`` (a file name, or a binary file object such as ``io.BytesIO`` of uploaded bytes) completely
    and return an ``RGB`` (``channels=3``) or ``L`` (``channels=1``) image.

    ``max_pixels`` refuses larger images before decoding (None: no limit beyond Pillow's own); ``draft_size``
    lets JPEG decode at a reduced scale that is still at least that size (faster for large photos). Raises
    :class:`ImageLoadError` naming the file (or ``name``, which labels a file object) on any decoding problem."""
    if channels not in (1, 3):
        raise InvalidValueError(f"channels must be 1 or 3, got {channels}")
    label = path if name is None else name
    try:
        with Image.open(path) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(f"{label}: image too large ({width}x{height} pixels, limit {max_pixels:,})")
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB" if channels == 3 else "L", draft_size)
            img.load()  # decode now: truncation and corrupt data surface here, not later
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block should not cost the pixels; keep the stored orientation
                pass
            img = _to_8bit(img)
            has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
            if has_alpha:
                img = _flatten_alpha(img, background)
            target = "RGB" if channels == 3 else "L"
            out = img.convert(target) if img.mode != target else img.copy()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{label}: image too large ({exc})") from exc
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, struct.error, ...: all mean "bad file"
        reason = str(exc) or type(exc).__name__
        raise ImageLoadError(f"{label}: cannot decode image ({reason})") from exc
    return out


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of the image extensions vitlab reads (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)
