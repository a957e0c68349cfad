"""Reading and writing checkpoint files safely: sniff the bytes first, never unpickle code, write atomically.

Every reader here raises :class:`~vitlab.errors.VitlabError` with a one-line message that names the file and says what
is wrong (an HTML page, a Git-LFS pointer, a truncated archive, pickled code, ...). Nothing here knows about models.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import VitlabError

SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # what the safetensors library itself accepts
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")
_LFS_START = b"version https://git-lfs"


def sniff(path: str | os.PathLike) -> str:
    """The kind of file at ``path`` from its first bytes (never from its name).

    Returns ``"directory"``, ``"safetensors"``, ``"npz"``, ``"torch-zip"`` (``torch.save`` since 1.6) or
    ``"torch-legacy"`` (an older pickle-based ``torch.save``). Raises :class:`VitlabError` for a missing or empty file,
    an HTML page, a Git-LFS pointer, a truncated or corrupt archive, and anything else that is not a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise VitlabError(f"{path}: no such file or directory")
    if path.is_dir():
        return "directory"
    size = path.stat().st_size
    if size == 0:
        raise VitlabError(f"{path}: the file is empty, not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(512)
    stripped = head.lstrip().lower()
    if stripped.startswith(_HTML_STARTS):
        raise VitlabError(f"{path}: this is an HTML/XML page, not a checkpoint (did a download link return a web page "
                          "instead of the file?)")
    if head.startswith(_LFS_START):
        raise VitlabError(f"{path}: this is a Git-LFS pointer file, not the weights; fetch the real file with "
                          "`git lfs pull` (or download it directly)")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"  # pickle protocol 2-5: legacy torch.save (or a bare pickle, refused when read)
    if size >= 8:
        header_len = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{":
            if header_len > SAFETENSORS_HEADER_LIMIT:
                raise VitlabError(f"{path}: safetensors header declares {header_len} bytes, over the 100 MB limit; "
                                  "the file is corrupt")
            if 8 + header_len > size:
                raise VitlabError(f"{path}: truncated safetensors file ({size} bytes, header alone declares "
                                  f"{8 + header_len})")
            return "safetensors"
    if head.startswith(b"\x93NUMPY"):
        raise VitlabError(f"{path}: a single .npy array, not a checkpoint (expected an .npz archive of named arrays)")
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()[0][:60] if head.strip() else ""
        raise VitlabError(f"{path}: a text file ({first!r}...), not a checkpoint")
    raise VitlabError(f"{path}: not a checkpoint vitlab can read (unrecognised file type; first bytes "
                      f"{head[:8].hex(' ')}); expected .safetensors, .npz, a torch.save file or a Hugging Face folder")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise VitlabError(f"{path}: truncated or corrupt zip archive ({exc}); download the file again") from None
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise VitlabError(f"{path}: a zip archive that is neither an .npz of arrays nor a torch.save file "
                      f"(members: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")


# ----------------------------------------------------------------------------------------------------------- readers
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a ``.safetensors`` file (on CPU) and its ``__metadata__`` (empty dict if none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as exc:
        raise VitlabError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise VitlabError(f"{path}: cannot read safetensors file ({exc})") from None
    return tensors, metadata


def read_torch(path: str | os.PathLike) -> object:
    """What ``torch.save`` wrote, loaded with ``weights_only=True`` (tensors, containers and plain values only).

    There is deliberately no fallback to full unpickling: a file that needs it is refused with the offending object
    named in the message."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(str(exc))
        raise VitlabError(f"{path}: refused: the file holds pickled Python objects other than tensors ({detail}); "
                          "vitlab only loads with torch.load(weights_only=True) and never runs code from a file"
                          ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "central directory" in text or "PytorchStreamReader" in text:
            raise VitlabError(f"{path}: truncated or corrupt torch.save archive ({text.splitlines()[0]})") from None
        raise VitlabError(f"{path}: cannot read torch.save file ({text.splitlines()[0]})") from None
    except (EOFError, zipfile.BadZipFile, ValueError, OSError, struct.error) as exc:
        raise VitlabError(f"{path}: truncated or corrupt torch.save file ({type(exc).__name__}: {exc})") from None


def _unpickling_detail(message: str) -> str:
    for line in message.splitlines():
        line = line.strip()
        if "Unsupported global" in line or "GLOBAL" in line or "Unsupported operand" in line:
            return line.rstrip(".")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[0][:200] if lines else "unknown object"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive, read with ``allow_pickle=False`` after checking every member's declared size
    against its ``.npy`` header (so a corrupt archive fails with a clear message, before any large allocation)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_npy_member(path, archive, info)
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except zipfile.BadZipFile as exc:
        raise VitlabError(f"{path}: truncated or corrupt .npz archive ({exc})") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise VitlabError(f"{path}: the .npz holds Python object arrays, which would need unpickling; refused"
                              ) from None
        raise VitlabError(f"{path}: corrupt .npz archive ({exc})") from None
    except (OSError, EOFError) as exc:
        raise VitlabError(f"{path}: cannot read .npz archive ({exc})") from None


def _check_npy_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        except ValueError as exc:
            raise VitlabError(f"{path}: member {info.filename} is not a valid .npy array ({exc})") from None
        header_len = member.tell()
    if dtype.hasobject:
        raise VitlabError(f"{path}: member {info.filename} is a Python object array, which would need unpickling; "
                          "refused")
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size != expected:
        raise VitlabError(f"{path}: member {info.filename} declares shape {tuple(shape)} {dtype} ({expected} bytes "
                          f"with header) but holds {info.file_size} bytes; the archive is corrupt")


def write_json(path: Path, data: dict) -> None:
    """Write JSON (indented, trailing newline) to ``path`` directly; callers make it atomic."""
    path.write_text(json.dumps(data, indent=2) + "\n")
