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

Images with another number of channels than 1 or 3 (satellite bands, microscopy) are arrays, not PIL images:
:func:`load_array_image` reads ``.npy`` files (``np.load(allow_pickle=False)``) and multi-band TIFFs (``tifffile``,
an optional dependency: ``pip install vitlab[bands]``) into a float32 tensor (C, H, W); :func:`load_sample` picks the
reader from the file name (or, for uploaded bytes, their first bytes) and the channel count. Both refuse an array
over ``max_pixels`` from its header, before its pixels are read; :func:`declared_pixels` reads only that header.

Array layout rule: a 2-D array (H, W) is one channel; a 3-D array is (H, W, C) when its last axis has ``channels``
entries, else (C, H, W) when its first axis has; anything else is refused naming the shape. Values: unsigned integers
are scaled by their type's maximum (uint8 by 255, uint16 by 65535), booleans become 0 / 1, signed integers and floats
are taken as they are (normalise them with per-channel statistics, ``normalize_from_data``).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InvalidValueError, VitlabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
ARRAY_EXTENSIONS = (".npy",)
TIFF_EXTENSIONS = (".tif", ".tiff")
SAMPLE_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS  # what image folders and manifests read
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


def _array_to_chw(array: np.ndarray, channels: int, label) -> torch.Tensor:
    """A numeric array laid out by the module's rule -> float32 tensor (C, H, W)."""
    if array.dtype.kind not in "buif":  # object, string, complex, structured: not pixels
        raise ImageLoadError(f"{label}: not a numeric array (dtype {array.dtype})")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageLoadError(f"{label}: an array of shape {array.shape}, expected (H, W, C) or (C, H, W)")
    if array.shape[2] == channels:
        array = array.transpose(2, 0, 1)
    elif array.shape[0] != channels:
        raise ImageLoadError(f"{label}: {_bands(array.shape)}, expected {channels} channel(s) (shape "
                             f"{array.shape}: neither the first nor the last axis has {channels} entries)")
    if array.dtype.kind == "u":
        scaled = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    else:
        scaled = array.astype(np.float32)
    if not np.isfinite(scaled).all():
        raise ImageLoadError(f"{label}: the array holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(scaled))


def _bands(shape: tuple) -> str:
    first, last = shape[0], shape[-1]
    return f"{last} band(s)" if last <= first else f"{first} band(s)"


NPY_MAGIC = b"\x93NUMPY"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def _sniff(source: BinaryIO) -> str | None:
    """``"npy"`` or ``"tiff"`` from a file object's first bytes (uploads have no file name), else None."""
    position = source.tell()
    head = source.read(6)
    source.seek(position)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    return None


def _array_kind(path: str | Path | BinaryIO) -> str | None:
    if not isinstance(path, (str, Path)):
        return _sniff(path)
    suffix = Path(path).suffix.lower()
    return "npy" if suffix in ARRAY_EXTENSIONS else "tiff" if suffix in TIFF_EXTENSIONS else None


def _height_width(shape: tuple, channels: int) -> tuple[int, int] | None:
    """(H, W) of an array shape by the module's layout rule; None when it has neither 2 nor 3 axes."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return tuple(shape[:2]) if shape[-1] == channels else tuple(shape[1:])
    return None


def _npy_header(source: BinaryIO) -> tuple[tuple, np.dtype]:
    """Shape and dtype from a ``.npy`` header (nothing else read; the position is restored)."""
    position = source.tell()
    try:
        version = np.lib.format.read_magic(source)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(source)
    finally:
        source.seek(position)
    return tuple(shape), dtype


def _open_array(path: str | Path | BinaryIO, kind: str, channels: int, max_pixels: int | None, label):
    """Read the array of a ``.npy`` / TIFF file or file object, refusing one over ``max_pixels`` (or with the wrong
    number of axes) from its header, before its pixels are read."""
    def check(shape: tuple, dtype: np.dtype) -> None:
        if dtype.kind not in "buif":  # object, string, complex, structured: not pixels
            raise ImageLoadError(f"{label}: not a numeric array (dtype {dtype})")
        hw = _height_width(shape, channels)
        if hw is None:
            raise ImageLoadError(f"{label}: an array of shape {tuple(shape)}, expected (H, W, C) or (C, H, W)")
        if max_pixels is not None and hw[0] * hw[1] > max_pixels:
            raise ImageLoadError(f"{label}: image too large ({hw[1]}x{hw[0]} pixels, limit {max_pixels:,})")

    if kind == "npy":
        if isinstance(path, (str, Path)):
            # memory-mapped first: the shape is checked before the pixels are read; never unpickles objects
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            check(array.shape, array.dtype)
            return array
        check(*_npy_header(path))  # object arrays refused before np.load (which would refuse them too)
        return np.load(path, allow_pickle=False)
    try:
        import tifffile  # optional dependency (vitlab[bands]); imported where a multi-band TIFF is read
    except ImportError as exc:
        raise ImageLoadError(f"{label}: reading {channels}-band TIFFs needs tifffile (pip install "
                             "vitlab[bands])") from exc
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageLoadError(f"{label}: no pixels (an empty or damaged file)")
        # from the tags: a small file declaring a huge image is refused undecoded
        check(tif.series[0].shape, tif.series[0].dtype)
        return tif.asarray()


def load_array_image(path: str | Path | BinaryIO, channels: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     name: str | None = None) -> torch.Tensor:
    """A ``.npy`` array or a (multi-band) TIFF as a float32 tensor (channels, H, W), laid out and scaled by the
    module's rule. ``path`` is a file name (the format from its extension) or a binary file object such as
    ``io.BytesIO`` of uploaded bytes (the format from its first bytes). Raises :class:`ImageLoadError` naming the
    file (or ``name``) for a missing, unreadable, non-numeric or wrongly shaped file, or one over ``max_pixels``
    (checked from the header, before the pixels are read)."""
    label = path if name is None else name
    kind = _array_kind(path)
    try:
        if kind is None:
            what = (f"a {Path(path).suffix or 'extension-less'} file" if isinstance(path, (str, Path))
                    else "data that is neither a .npy array nor a TIFF")
            raise ImageLoadError(f"{label}: {what} cannot hold {channels} channels; use .npy arrays or multi-band "
                                 "TIFFs")
        array = _open_array(path, kind, channels, max_pixels, label)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: no such file") from None
    except Exception as exc:  # numpy and tifffile raise ValueError, OSError, TiffFileError, ...: all mean "bad file"
        reason = str(exc) or type(exc).__name__
        raise ImageLoadError(f"{label}: cannot read array ({reason})") from exc
    if not isinstance(array, np.ndarray):
        raise ImageLoadError(f"{label}: not a single array")
    if array.size == 0:  # tifffile answers a damaged file with an empty array and a logged warning
        raise ImageLoadError(f"{label}: no pixels (an empty or damaged file)")
    return _array_to_chw(np.asarray(array), channels, label)


def declared_pixels(source: BinaryIO, channels: int = 3) -> int:
    """Width x height that a file object's header declares, as :func:`load_sample` would read it, with nothing
    decoded: a ``.npy`` header, the first series of a TIFF read as bands, else Pillow's header. 0 when the header is
    unreadable (decoding then fails with the reason)."""
    try:
        kind = _sniff(source)
        if kind == "npy":
            hw = _height_width(_npy_header(source)[0], channels)
        elif kind == "tiff" and channels not in (1, 3):
            import tifffile  # optional dependency (vitlab[bands]), as in _open_array

            position = source.tell()
            try:
                with tifffile.TiffFile(source) as tif:
                    hw = _height_width(tif.series[0].shape, channels) if tif.series else None
            finally:
                source.seek(position)
        else:
            with Image.open(source) as img:
                hw = img.size
        return 0 if hw is None else int(hw[0]) * int(hw[1])
    except Exception:  # any unreadable header: decoding reports it as a bad image
        return 0


def is_array_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``.npy`` array (read by :func:`load_array_image` whatever the channel count)."""
    return str(path).lower().endswith(ARRAY_EXTENSIONS)


def load_sample(path: str | Path | BinaryIO, channels: int = 3, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                name: str | None = None) -> Image.Image | torch.Tensor:
    """One image file for a data set: a PIL image (``RGB`` / ``L``, :func:`load_image`) for 1 or 3 channels, a
    float32 tensor (C, H, W) (:func:`load_array_image`) for ``.npy`` files and for any other channel count.
    ``path`` may be a binary file object (uploaded bytes): then its first bytes tell a ``.npy`` array from an
    image."""
    if channels < 1:
        raise InvalidValueError(f"channels must be positive, got {channels}")
    if isinstance(path, (str, Path)):
        array = is_array_file(path)
    else:
        array = _sniff(path) == "npy"
    if channels in (1, 3) and not array:
        if isinstance(path, (str, Path)) and not Path(path).exists():
            raise ImageLoadError(f"{path if name is None else name}: no such file")
        if isinstance(path, (str, Path)) and Path(path).is_dir():  # Pillow would say "[Errno 21] Is a directory"
            raise ImageLoadError(f"{path if name is None else name}: a folder, not an image file")
        return load_image(path, channels, max_pixels=max_pixels, name=name)
    return load_array_image(path, channels, max_pixels=max_pixels, name=name)
