"""Reading and writing checkpoint files safely: sniff the bytes first, never unpickle code, write atomically.

Every reader here raises :class:`~vitlab.errors.VitlabError` with a one-line message that names the file and says what
is wrong (an HTML page, a Git-LFS pointer, a truncated archive, pickled code, ...). Nothing here knows about models.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import VitlabError

SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # what the safetensors library itself accepts
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than ~1032:1; a member declaring more is lying
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
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
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # a pickle, protocol 2-5
        if _starts_with_torch_magic(head):
            return "torch-legacy"  # torch.save before 1.6: pickles, then raw storages
        raise VitlabError(f"{path}: a Python pickle, not a checkpoint: refused (unpickling can run code; vitlab "
                          "reads .safetensors, .npz and torch.save files, the latter with weights only)")
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
    if path.suffix.lower() == ".onnx":  # the name only hints: the bytes decided it is no checkpoint
        raise VitlabError(f"{path}: an ONNX file, not a checkpoint: {EXPORTED_HINT}")
    raise VitlabError(f"{path}: not a checkpoint vitlab can read (unrecognised file type; first bytes "
                      f"{head[:8].hex(' ')}); expected .safetensors, .npz, a torch.save file or a Hugging Face folder")


# what an exported model (`vitlab export`, `vitlab export-onnx`) given to a command that needs the weights is told
EXPORTED_HINT = ("vitlab predict, eval and serve take exported models; this command needs the checkpoint it was "
                 "exported from")


RUN_FOLDER_FILES = ("model.safetensors", "adapter.safetensors")  # what a finished vitlab training run saves


def run_folder_model(path: str | os.PathLike) -> Path | None:
    """The model file a vitlab training run folder stands for (its ``model.safetensors``, else a LoRA run's
    ``adapter.safetensors``), or None when ``path`` is not a run folder. A run folder is told from a Hugging Face
    model folder (which also holds a ``config.json``) by its config: a training config names ``data`` and
    ``model``, a Hugging Face one its ``model_type``. A run that saved no model yet is an error that says so."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return None
    try:
        document = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(document, dict) or "model_type" in document or not {"data", "model"} <= set(document):
        return None
    for name in RUN_FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise VitlabError(f"{path}: a vitlab run folder without a saved model (the run has not finished: continue it "
                      "with vitlab train --resume, or load a checkpoint under its checkpoints/)")


def _starts_with_torch_magic(head: bytes) -> bool:
    """Whether a pickle's first value is the magic number legacy ``torch.save`` writes first."""
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(head)):
            if opcode.name in ("PROTO", "FRAME"):
                continue
            return opcode.name == "LONG1" and arg == _TORCH_LEGACY_MAGIC
    except ValueError:  # the 512 bytes end inside an opcode
        return False
    return False


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_sizes(path, archive)
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise VitlabError(f"{path}: truncated or corrupt zip archive ({exc}); download the file again") from None
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    if any("/aotinductor/" in n for n in names):
        raise VitlabError(f"{path}: a PyTorch .pt2 package (AOTInductor), not a checkpoint: {EXPORTED_HINT}")
    raise VitlabError(f"{path}: a zip archive that is neither an .npz of arrays nor a torch.save file "
                      f"(members: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")


def check_zip_sizes(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse an archive whose central directory declares members larger than the file can hold (a zip64 entry
    claiming a terabyte, say), before anything is read or allocated: a stored member must lie inside the file and
    hold what it declares; a deflated one cannot expand beyond deflate's maximum ratio."""
    size = path.stat().st_size
    for info in archive.infolist():
        name, stored = info.filename, info.compress_size
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise VitlabError(f"{path}: member {name} uses zip compression method {info.compress_type}; .npz and "
                              "torch.save archives are stored or deflated only")
        if info.header_offset + stored > size:
            raise VitlabError(f"{path}: member {name} declares {stored:,} bytes at offset {info.header_offset:,}, "
                              f"beyond the end of the {size:,}-byte file; the archive is corrupt")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != stored:
            raise VitlabError(f"{path}: member {name} is stored uncompressed but declares {info.file_size:,} bytes "
                              f"for {stored:,} stored; the archive is corrupt")
        if info.file_size > DEFLATE_MAX_RATIO * stored + 1024:
            raise VitlabError(f"{path}: member {name} declares {info.file_size:,} bytes uncompressed from {stored:,} "
                              "compressed, more than deflate can produce; the archive is corrupt")


# ----------------------------------------------------------------------------------------------------------- readers
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a ``.safetensors`` file (on CPU) and its ``__metadata__`` (empty dict if none)."""
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
    path = Path(path)
    try:
        with warnings.catch_warnings(), open(path, "rb") as f:
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            legacy = not zipfile.is_zipfile(f)
            f.seek(0)
            if legacy:
                _check_legacy_storages(path, f)
                f.seek(0)
            # a file object, not the path: torch.load would pick safetensors for a name ending in .safetensors
            return torch.load(f, map_location="cpu", weights_only=True)
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


def _check_legacy_storages(path: Path, f) -> None:
    """Unpickle a legacy ``torch.save`` file's objects with torch's weights-only unpickler onto storages on the meta
    device (nothing allocated), and refuse the file if its storages declare more bytes than the file holds: torch
    itself would allocate every declared storage before reading a byte of it."""
    from torch import _weights_only_unpickler as restricted

    declared: dict[str, int] = {}

    def record(pid):
        try:
            _, storage_type, key, _location, numel = pid[:5]
            dtype = storage_type.dtype
            nbytes = int(numel) * torch._utils._element_size(dtype)
        except (TypeError, ValueError, AttributeError) as exc:
            raise VitlabError(f"{path}: corrupt legacy torch.save file (storage record {pid!r:.80}: {exc})") from None
        declared[str(key)] = max(declared.get(str(key), 0), nbytes)
        storage = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    if restricted.Unpickler(f, encoding="utf-8").load() != _TORCH_LEGACY_MAGIC:
        raise VitlabError(f"{path}: a Python pickle, not a torch.save file: refused (unpickling can run code)")
    for _ in range(2):  # protocol version, system info
        restricted.Unpickler(f, encoding="utf-8").load()
    unpickler = restricted.Unpickler(f, encoding="utf-8")
    unpickler.persistent_load = record
    unpickler.load()
    size = path.stat().st_size
    total = sum(declared.values())
    if total > size:
        key, largest = max(declared.items(), key=lambda kv: kv[1])
        raise VitlabError(f"{path}: the pickled storages declare {total:,} bytes (storage {key}: {largest:,}) but the "
                          f"file holds {size:,}; the file is corrupt")


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
            check_zip_sizes(path, archive)
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
    expected = header_len + math.prod(int(n) for n in shape) * dtype.itemsize  # exact: int64 products wrap
    if info.file_size != expected:
        raise VitlabError(f"{path}: member {info.filename} declares shape {tuple(shape)} {dtype} ({expected} bytes "
                          f"with header) but holds {info.file_size} bytes; the archive is corrupt")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, with its I/O failures (a full disk) raised as the OSError they are, so that
    the atomic writer around it reports them like any other write error."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from exc


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (a config, an index, a preprocessor config) as a dict, or one error naming the
    file: unreadable, not JSON (a corrupt download, another file under the name) or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitlabError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise VitlabError(f"{path}: a JSON {type(data).__name__}, expected an object")
    return data


def write_json(path: Path, data: dict) -> None:
    """Write JSON (indented, trailing newline) to ``path`` directly; callers make it atomic."""
    path.write_text(json.dumps(data, indent=2) + "\n")
