"""WebDataset-style tar shards, read with the standard ``tarfile`` module: data too large for one disk or machine.

A shard is a plain tar file; files that share a basename (the "key", up to the first dot of the file name) form one
sample: an image (``.jpg``, ``.png``, ...) and a label (``.cls``: the class index as text, or ``.json`` with a
``"label"`` field). Class names come from ``classes.txt`` (one per line) next to the shards when it exists.

Shards are assigned to (rank, worker) slots: with at least as many shards as slots, slot s reads shards s, s + S,
s + 2S, ... (S = world size x workers); with fewer shards every slot reads every shard and keeps every S-th sample,
so each sample is still seen exactly once per epoch. The shard order and a shuffle buffer are seeded by
(seed, epoch), so an epoch's stream is the same on every run with the same world size and worker count.
"""

from __future__ import annotations

import glob
import io
import json
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import VitlabError
from .folder import BadSample
from .images import ImageLoadError, load_image

_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shard_pattern(spec: str | Path) -> list[Path]:
    """Shard files named by ``spec``: a folder (its ``*.tar`` files), a glob, or a brace range such as
    ``data/train-{000000..000099}.tar`` (zero padding kept). Sorted; an empty result is an error."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.tar"))
    else:
        match = _BRACES.search(spec)
        if match:
            lo, hi = match.group(1), match.group(2)
            width = len(lo)
            names = [spec[: match.start()] + str(i).zfill(width) + spec[match.end():]
                     for i in range(int(lo), int(hi) + 1)]
            files = [Path(n) for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise VitlabError(f"shard files missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        else:
            files = sorted(Path(p) for p in glob.glob(spec))
    if not files:
        raise VitlabError(f"{spec}: no tar shards found")
    return files


def looks_like_shards(spec: str | Path) -> bool:
    """Whether ``spec`` names tar shards (a .tar path, glob or brace range, or a folder holding .tar files only)."""
    spec = str(spec)
    if spec.endswith(".tar"):
        return True
    path = Path(spec)
    if path.is_dir():
        entries = [p for p in path.iterdir() if p.name != "classes.txt"]
        return bool(entries) and all(p.suffix == ".tar" for p in entries)
    return False


def _split_key(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)
    stem = base[-1]
    prefix = base[0] + "/" if len(base) == 2 else ""
    key, _, ext = stem.partition(".")
    return prefix + key, ext.lower()


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one tar file, streaming (the file is read once, in order)."""
    current, parts = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key != current:
                    if current is not None:
                        yield current, parts
                    current, parts = key, {}
                data = tar.extractfile(member)
                parts[ext] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VitlabError(f"{path}: unreadable tar shard ({exc})") from exc
    if current is not None:
        yield current, parts


def count_samples(files: list[Path]) -> int:
    """Number of samples (keys with an image) in the shards, from the tar headers only."""
    total = 0
    for path in files:
        keys = set()
        try:
            with tarfile.open(path, mode="r:*") as tar:
                for member in tar.getmembers():
                    key, ext = _split_key(member.name)
                    if member.isfile() and ext in _IMAGE_SUFFIXES:
                        keys.add(key)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise VitlabError(f"{path}: unreadable tar shard ({exc})") from exc
        total += len(keys)
    return total


def read_class_names(files: list[Path]) -> list[str] | None:
    """Class names from ``classes.txt`` beside the first shard, or None."""
    names = files[0].parent / "classes.txt"
    if names.is_file():
        return [line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


class ShardDataset(IterableDataset):
    """Iterable (image tensor, label) samples from tar shards; bad samples come out as :class:`BadSample`.

    ``rank``/``world_size`` select this process's part (default: from ``torch.distributed`` when initialised);
    DataLoader workers split it further. ``shuffle_buffer`` > 0 shuffles within a buffer of that many samples and
    shuffles the shard order; call :meth:`set_epoch` each epoch for a new order. Labels are class indices.

    ``with_names`` (set by prediction, which needs no labels): each sample is ``(image, label, "shard.tar:key")``
    and a sample without a usable label keeps its image, with label -1."""

    multi_label = False
    with_names = False

    def __init__(self, spec: str | Path, transform: Callable | None = None, channels: int = 3,
                 on_error: str = "skip", shuffle_buffer: int = 0, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, max_pixels: int | None = None):
        super().__init__()
        self.files = expand_shard_pattern(spec)
        self.transform = transform
        self.channels = channels
        self.on_error = on_error
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        self.rank, self.world_size = rank, world_size
        self.class_names = read_class_names(self.files)
        self._length: int | None = None

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def __len__(self) -> int:
        """Samples in all shards together (counted once from the tar headers)."""
        if self._length is None:
            self._length = count_samples(self.files)
        return self._length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, key: str, parts: dict[str, bytes], shard: Path):
        name = f"{shard}:{key}"
        image_ext = next((e for e in _IMAGE_SUFFIXES if e in parts), None)
        if image_ext is None:
            return None  # a key without an image (e.g. metadata only) is not a sample
        try:
            if "cls" in parts:
                label = int(parts["cls"].decode().strip())
            elif "json" in parts:
                label = int(json.loads(parts["json"])["label"])
            else:
                raise ValueError("no .cls or .json label")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            if not self.with_names:  # predicting needs no label: the image is still used
                if self.on_error == "fail":
                    raise VitlabError(f"{name}: bad label ({exc})") from exc
                return BadSample(f"{name}: bad label ({exc})"), -1
            label = -1
        try:
            kwargs = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
            image = load_image(io.BytesIO(parts[image_ext]), self.channels, **kwargs)
        except ImageLoadError as exc:
            reason = str(exc).replace("<_io.BytesIO object", name, 1) if "<_io" in str(exc) else str(exc)
            reason = f"{name}: {reason.split(': ', 1)[-1]}"
            if self.on_error == "fail":
                raise ImageLoadError(reason) from exc
            return BadSample(reason), label
        return (self.transform(image) if self.transform else image), label

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        files = list(self.files)
        if self.shuffle_buffer:
            rng.shuffle(files)
        by_shard = len(files) >= slots
        mine = files[slot::slots] if by_shard else files
        # per-slot RNG for augmentation and the buffer, so that slots do not repeat each other's draws
        torch.manual_seed(self.seed * 7919 + self.epoch * 104_729 + slot)
        buffer: list = []
        index = 0
        for shard in mine:
            for key, parts in iter_tar_samples(shard):
                if not any(e in parts for e in _IMAGE_SUFFIXES):
                    continue
                if not by_shard:
                    index += 1
                    if (index - 1) % slots != slot:
                        continue
                sample = self._decode(key, parts, shard)
                if self.with_names:
                    sample = (*sample, f"{shard}:{key}")
                if self.shuffle_buffer:
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
                else:
                    yield sample
        rng.shuffle(buffer)
        yield from buffer
