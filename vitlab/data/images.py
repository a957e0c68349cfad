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
    """Rescale high-bit-depth single-channel images to 8-bit ``L`` without clipping: ``I;16`` divided by 257 (65535
    -> 255), ``I`` the same when a value is above 255, ``F`` times 255 when its values are in [0, 1]. Integer
    arithmetic on blocks of rows: a 25-megapixel 16-bit upload costs its 8-bit result plus a few MB, not float64
    copies of the whole image."""
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.uint16, copy=False)  # big-endian I;16B as native integers
    scale = 1.0
    if img.mode == "F":
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
    wide = img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255)
    out = np.empty(arr.shape, dtype=np.uint8)
    rows = max(1, (1 << 16) // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    for start in range(0, arr.shape[0], rows):
        block = arr[start: start + rows]
        if img.mode == "F":
            block = block.astype(np.float32)
            block *= scale
            np.rint(block, out=block)
        elif wide:  # rint(x / 257) in integers: floor((2x + 257) / 514), in place
            block = block.astype(np.int64)
            block *= 2
            block += 257
            block //= 514
        np.clip(block, 0, 255, out=out[start: start + rows], casting="unsafe")
    return Image.fromarray(out, mode="L")


def _check_jpeg_length(img: Image.Image, label) -> None:
    """Refuse a JPEG too short for the size its header declares: libjpeg fills a scan that ends early with grey and
    only warns, so Pillow decodes such a file "successfully". Every 8 x 8 block of the full-resolution component
    costs at least one bit in any Huffman-coded JPEG (its DC code; progressive files included), so the file must
    hold at least blocks / 8 bytes."""
    width, height = img.size
    blocks = -(-width // 8) * -(-height // 8)
    fp = img.fp
    try:
        position = fp.tell()
        length = fp.seek(0, 2)
        fp.seek(position)
    except (AttributeError, OSError, ValueError):
        return
    if 8 * length < blocks:
        raise ImageLoadError(f"{label}: cannot decode image (truncated: its header declares {width}x{height} pixels, "
                             f"which take at least {blocks // 8:,} bytes as JPEG; the file has {length:,})")


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
            if img.format == "JPEG":
                _check_jpeg_length(img, label)
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
