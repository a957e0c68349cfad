"""Crafted checkpoint files: broken or hostile in one way each, built in code, small on disk.

Each builder writes one file into a folder and returns its path. The files are what a corrupt download or an
attacker could hand to vitlab: archives whose headers declare far more data than the file holds, configs that ask
for an absurd model, pickles under a safetensors name. :func:`good_vitlab_file` is the tiny valid file the memory
baselines are measured on. Nothing here uses vitlab's checkpoint readers.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

TERABYTE = 2**40
MARKER = "vitlab_payload_ran"


class Payload:
    """Unpickling this runs ``os.system`` (creates a marker file): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_vit(pos_embed: str = "learned"):
    import vitlab

    return vitlab.create_model("vit_ti16", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                               mlp_dim=64, num_classes=3, pos_embed=pos_embed)


def good_vitlab_file(folder: Path) -> Path:
    import vitlab

    path = folder / "good.safetensors"
    vitlab.save(tiny_vit(), path)
    return path


def good_train_state(folder: Path) -> Path:
    """A (weights-only readable) torch.save file that is a training state in shape only: what `--resume` reads."""
    path = folder / "good_state.pt"
    torch.save({"format": "vitlab-train-state", "version": 1, "model": tiny_vit().state_dict()}, path)
    return path


def _npy_header(shape: tuple, descr: str = "<f4") -> bytes:
    """A version 1.0 .npy header for ``shape`` (the data that follows is up to the caller)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _zip_with_lying_sizes(path: Path, members: dict[str, bytes], declared: dict[str, int],
                          method: int = zipfile.ZIP_STORED, lie_compressed: bool = True) -> Path:
    """A zip whose central directory declares ``declared[name]`` bytes for a member (written with zip64 extra
    fields, as a genuine archive over 4 GiB would be); the bytes actually stored are the honest ones."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for info in archive.filelist:
            if info.filename in declared:
                info.file_size = declared[info.filename]
                if lie_compressed:
                    info.compress_size = declared[info.filename]
    path.write_bytes(buf.getvalue())
    return path


def npz_zip64_terabyte(folder: Path, compressed: bool = False) -> Path:
    """An .npz whose one member's .npy header says (2^38,) float32 (1 TiB) and whose zip64 central directory says
    the member holds that much; the file is a few hundred bytes."""
    shape = (TERABYTE // 4,)
    header = _npy_header(shape)
    data = header + bytes(64)
    declared = {"embedding/kernel.npy": len(header) + TERABYTE}
    name = "zip64_deflated.npz" if compressed else "zip64_terabyte.npz"
    return _zip_with_lying_sizes(folder / name, {"embedding/kernel.npy": data}, declared,
                                 zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED,
                                 lie_compressed=not compressed)


def npy_header_terabyte(folder: Path) -> Path:
    """An honest zip holding one .npy member whose header claims a terabyte of float32."""
    data = _npy_header((TERABYTE // 4,)) + bytes(64)
    path = folder / "npy_terabyte.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("embedding/kernel.npy", data)
    return path


def npy_header_overflow(folder: Path) -> Path:
    """A .npy header whose shape product overflows 64 bits (wraps to a small number in int64 arithmetic)."""
    data = _npy_header((2**32, 2**32, 16)) + bytes(64)
    path = folder / "npy_overflow.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("embedding/kernel.npy", data)
    return path


def safetensors_header_beyond_file(folder: Path) -> Path:
    """A safetensors file whose 8-byte header length points 1 TiB past its end."""
    path = folder / "header_beyond.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", TERABYTE) + header + bytes(16))
    return path


def safetensors_tensor_beyond_file(folder: Path) -> Path:
    """A safetensors file with an honest header length whose tensor claims a terabyte of data."""
    path = folder / "tensor_beyond.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [TERABYTE // 4], "data_offsets": [0, TERABYTE]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return path


def _rewrite_vitlab_config(src: Path, dst: Path, **changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    document = json.loads(metadata["vitlab"])
    document["config"].update(changes)
    save_file(tensors, str(dst), metadata={"vitlab": json.dumps(document)})
    return dst


def vitlab_absurd_sincos(folder: Path) -> Path:
    """A valid vitlab file of a sin-cos ViT whose stored config says img_size 100,000: the weights still fit (a
    fixed embedding has no tensor), but building the model would compute a 156M-row embedding (about 20 GB)."""
    import vitlab

    base = folder / "sincos_base.safetensors"
    vitlab.save(tiny_vit("sincos"), base)
    out = _rewrite_vitlab_config(base, folder / "absurd_img_size.safetensors", img_size=[100000, 100000])
    base.unlink()
    return out


def vitlab_sincos_grid_too_big(folder: Path) -> Path:
    """A sin-cos ViT whose config says 12,000 px at patch 8: a plausible side, but a 1500 x 1500 grid whose fixed
    embedding (72M values) is a thousand times the weights the file holds."""
    import vitlab

    base = folder / "sincos_base.safetensors"
    vitlab.save(tiny_vit("sincos"), base)
    out = _rewrite_vitlab_config(base, folder / "sincos_grid.safetensors", img_size=[12000, 12000])
    base.unlink()
    return out


def vitlab_absurd_no_posembed(folder: Path) -> Path:
    """A ViT without position embedding whose config says 1,000,000 px: the weights fit, and every input image
    would be resized to 10^12 pixels."""
    import vitlab

    base = folder / "nopos_base.safetensors"
    vitlab.save(tiny_vit("none"), base)
    out = _rewrite_vitlab_config(base, folder / "absurd_no_pos.safetensors", img_size=[1000000, 1000000])
    base.unlink()
    return out


def vitlab_lying_sizes(folder: Path, **changes) -> Path:
    """A valid vitlab file of a 1-block ViT whose stored config lies about one size (``depth=10_000_000``, say):
    building or iterating what it claims would run for minutes before any shape check."""
    import vitlab

    base = folder / "lying_base.safetensors"
    vitlab.save(tiny_vit(), base)
    out = _rewrite_vitlab_config(base, folder / f"lying_{'_'.join(changes)}.safetensors", **changes)
    base.unlink()
    return out


def pickle_named_safetensors(folder: Path, payload: bool, suffix: str = ".safetensors") -> Path:
    """A pickle (a harmless dict, or a payload that runs a command) under a ``.safetensors`` (or other) name."""
    path = folder / (("payload" if payload else "pickled_dict") + suffix)
    obj = Payload(folder / MARKER) if payload else {"weight": [1.0, 2.0]}
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def torch_zip_storage_beyond_record(folder: Path) -> Path:
    """A torch.save zip whose data.pkl declares a 2^38-element float storage while its record holds 16 bytes."""
    honest = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, honest)
    honest.seek(0)
    with zipfile.ZipFile(honest) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    big = TERABYTE // 4
    old = members[pkl_name]
    # the storage numel (4) and the tensor size (4,) are pickled as BININT1 4 ("K\x04"); make both 2^38 (LONG1)
    long1 = b"\x8a\x05" + big.to_bytes(5, "little")
    members[pkl_name] = old.replace(b"K\x04", long1)
    assert members[pkl_name] != old
    path = folder / "storage_beyond.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def torch_zip_member_terabyte(folder: Path) -> Path:
    """A torch.save zip whose central directory declares a terabyte for a tensor record."""
    honest = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, honest)
    honest.seek(0)
    with zipfile.ZipFile(honest) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    record = next(n for n in members if n.endswith("data/0"))
    return _zip_with_lying_sizes(folder / "record_terabyte.pt", members, {record: TERABYTE})


def html_page(folder: Path) -> Path:
    path = folder / "page.safetensors"
    path.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>login</body></html>\n")
    return path


def torch_payload(folder: Path) -> Path:
    path = folder / "payload.pth"
    torch.save({"model": tiny_vit().state_dict(), "extra": Payload(folder / MARKER)}, path)
    return path


def truncated_npz(folder: Path) -> Path:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((64, 64), np.float32), b=np.ones(1000, np.float32))
    path = folder / "truncated.npz"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def truncated_safetensors(folder: Path) -> Path:
    good = folder / "_good.safetensors"
    import vitlab

    vitlab.save(tiny_vit(), good)
    data = good.read_bytes()
    good.unlink()
    path = folder / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    return path


def lfs_pointer(folder: Path) -> Path:
    path = folder / "lfs.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 346293852\n")
    return path


def object_array_npz(folder: Path) -> Path:
    path = folder / "objects.npz"
    with open(path, "wb") as f:
        np.savez(f, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    return path


def nan_weights(folder: Path) -> Path:
    sd = tiny_vit().state_dict()
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    path = folder / "nan.pth"
    torch.save(sd, path)
    return path


def empty_file(folder: Path) -> Path:
    path = folder / "empty.pt"
    path.write_bytes(b"")
    return path


# name -> (builder, a fragment the one-line message must contain)
CORPUS = {
    "npz_zip64_terabyte": (npz_zip64_terabyte, "embedding/kernel.npy"),
    "npz_zip64_deflated": (lambda d: npz_zip64_terabyte(d, compressed=True), "embedding/kernel.npy"),
    "npy_header_terabyte": (npy_header_terabyte, "embedding/kernel.npy"),
    "npy_header_overflow": (npy_header_overflow, "embedding/kernel.npy"),
    "safetensors_header_beyond_file": (safetensors_header_beyond_file, "header"),
    "safetensors_tensor_beyond_file": (safetensors_tensor_beyond_file, "safetensors"),
    "vitlab_absurd_sincos": (vitlab_absurd_sincos, "img_size"),
    "vitlab_sincos_grid_too_big": (vitlab_sincos_grid_too_big, "img_size"),
    "vitlab_absurd_no_posembed": (vitlab_absurd_no_posembed, "img_size"),
    "vitlab_lying_depth": (lambda d: vitlab_lying_sizes(d, depth=10_000_000), "depth"),
    "vitlab_lying_mlp_dim": (lambda d: vitlab_lying_sizes(d, mlp_dim=2_000_000_000), "mlp_dim"),
    "vitlab_lying_width": (lambda d: vitlab_lying_sizes(d, embed_dim=2**30, num_heads=2), "embed_dim"),
    "vitlab_lying_classes": (lambda d: vitlab_lying_sizes(d, num_classes=500_000_000), "num_classes"),
    "pickle_named_safetensors": (lambda d: pickle_named_safetensors(d, payload=False), "pickle"),
    "payload_named_safetensors": (lambda d: pickle_named_safetensors(d, payload=True), "pickle"),
    "payload_named_pt": (lambda d: pickle_named_safetensors(d, payload=True, suffix=".pt"), "pickle"),
    "torch_zip_storage_beyond_record": (torch_zip_storage_beyond_record, "storage"),
    "torch_zip_member_terabyte": (torch_zip_member_terabyte, "data/0"),
    "html": (html_page, "HTML"),
    "lfs": (lfs_pointer, "Git-LFS"),
    "torch_payload": (torch_payload, "refused"),
    "truncated_npz": (truncated_npz, "corrupt"),
    "truncated_safetensors": (truncated_safetensors, "truncated"),
    "object_array": (object_array_npz, "object array"),
    "nan": (nan_weights, "non-finite"),
    "empty": (empty_file, "empty"),
}


def build_corpus(folder: Path) -> dict[str, tuple[Path, str]]:
    """Every crafted file, each in its own sub-folder (so that a payload's marker is per file)."""
    out = {}
    for name, (builder, fragment) in CORPUS.items():
        sub = folder / name
        sub.mkdir(parents=True)
        out[name] = (builder(sub), fragment)
    return out


def torch_legacy_storage_terabyte(folder: Path) -> Path:
    """A legacy (pre-zip) torch.save file whose pickled storage declares 2^38 floats; 16 bytes follow."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    big = b"\x8a\x05" + (TERABYTE // 4).to_bytes(5, "little")
    import pickletools

    stream = io.BytesIO(data)
    for _ in range(3):  # the magic number, protocol version and sys-info pickles come first
        for _op in pickletools.genops(stream):
            pass
    start = stream.tell()
    for _op in pickletools.genops(stream):  # the main object's pickle, holding the storage's numel
        pass
    end = stream.tell()
    patched = data[:start] + data[start:end].replace(b"K\x04", big) + data[end:]
    assert patched != data
    path = folder / "legacy_terabyte.pt"
    path.write_bytes(patched)
    return path


CORPUS["torch_legacy_storage_terabyte"] = (torch_legacy_storage_terabyte, "storage")
