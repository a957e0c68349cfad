"""Hugging Face sources as vitlab data sets: random access (:class:`HFImageDataset`) or a stream
(:class:`HFStreamDataset`); :func:`build_hf_dataset` picks one (see :mod:`vitlab.data.hf` for the source strings).

Random access behaves as an image folder: the training loader draws a seeded permutation, a row's augmentation is
seeded by (seed, epoch, row), so the same images as a folder (rows in the folder's order) train to the same weights.
The stream reads pieces (parquet row groups, arrow record batches) in turn, split over (rank, DataLoader worker)
slots as tar shards are: with at least as many pieces as slots, slot ``s`` reads pieces ``s, s + S, ...``; with fewer,
every slot reads every piece and keeps the rows ``r`` with ``r % S == s``. When training (the training loader sets
``sample_seed``), the piece order and a shuffle buffer of ``shuffle_buffer`` rows are seeded by (seed, epoch) and each
row's augmentation by (seed, epoch, row), so an epoch's stream is the same on every run with the same processes and
workers and a resumed run replays it exactly; otherwise (evaluation, few-shot) the rows come in order. Memory holds
one piece and the buffer per worker, whatever the size of the data.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import InvalidValueError, VitlabError
from .folder import ON_ERROR, BadSample
from .hf import STREAM_BYTES, STREAM_CHOICES, Resolved, parse_spec, require_datasets, resolve
from .hf_tables import list_pieces, read_columns, read_piece, total_bytes
from .images import ImageLoadError, load_image

_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
_LABEL_NAMES = ("label", "labels")
_BYTES_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_INT = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _describe(features) -> str:
    return ", ".join(f"{k} ({type(v).__name__ if not hasattr(v, 'dtype') else v.dtype})" for k, v in features.items())


def _is_image(feature) -> bool:
    datasets = require_datasets()
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary")
    return isinstance(feature, dict) and "bytes" in feature  # {bytes, path} written without features metadata


def find_image_column(features, chosen: str | None, name: str) -> str:
    """The image column: ``chosen``, else the one ``Image`` feature, else a binary column with a usual name."""
    datasets = require_datasets()
    if chosen is not None:
        if chosen not in features:
            raise VitlabError(f"{name}: no column {chosen!r} (columns: {_describe(features)})")
        if not _is_image(features[chosen]):
            raise VitlabError(f"{name}: column {chosen!r} is {features[chosen]}, not images (an Image feature or "
                              "bytes)")
        return chosen
    images = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if len(images) > 1:
        raise VitlabError(f"{name}: several image columns ({', '.join(images)}); choose one with image_column",
                          options=("image_column",))
    if images:
        return images[0]
    named = [k for k in features if k.lower() in _IMAGE_NAMES and _is_image(features[k])]
    if named:
        return named[0]
    raise VitlabError(f"{name}: no image column (an Image feature) among {_describe(features)}; "
                      "choose one with image_column", options=("image_column",))


def _class_label(feature):
    datasets = require_datasets()
    return feature if isinstance(feature, datasets.ClassLabel) else None


def _list_item(feature):
    datasets = require_datasets()
    kinds = tuple(k for k in (getattr(datasets, "List", None), getattr(datasets, "LargeList", None),
                              datasets.Sequence) if isinstance(k, type))
    if isinstance(feature, kinds):
        return feature.feature
    if isinstance(feature, list) and len(feature) == 1:  # the older spelling of a list feature
        return feature[0]
    return None


def find_label_column(features, chosen: str | None, image: str, name: str) -> str:
    """The label column: ``chosen``, else the one ``ClassLabel`` (or list of ``ClassLabel``), else ``label`` /
    ``labels``."""
    if chosen is not None:
        if chosen not in features:
            raise VitlabError(f"{name}: no column {chosen!r} (columns: {_describe(features)})")
        return chosen
    labelled = [k for k, v in features.items()
                if k != image and (_class_label(v) or _class_label(_list_item(v)))]
    if len(labelled) == 1:
        return labelled[0]
    for candidate in _LABEL_NAMES:
        if candidate in features and candidate != image:
            return candidate
    if labelled:
        raise VitlabError(f"{name}: several label columns ({', '.join(labelled)}); choose one with label_column",
                          options=("label_column",))
    raise VitlabError(f"{name}: no label column (a ClassLabel, or a column named label / labels) among "
                      f"{_describe(features)}; choose one with label_column", options=("label_column",))


def image_cell(value, where: str, channels: int = 3, max_pixels: int | None = None, base: Path | None = None):
    """The image in one cell of an image column (bytes, or ``{bytes, path}``; a path is taken as given, else under
    ``base``), decoded with vitlab's guards; :class:`ImageLoadError` naming ``where`` when it cannot be."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = value, None
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    if data is not None:
        try:
            return load_image(io.BytesIO(data), channels, name=where, **kwargs)
        except ImageLoadError as exc:  # Pillow names the file object in its reasons: say what it held instead
            raise ImageLoadError(_BYTES_REPR.sub("the row's image bytes", str(exc))) from exc
    if path:  # an Image feature that refers to a file instead of holding its bytes: as given, else beside the data
        found = Path(path) if Path(path).is_file() or base is None else base / path
        return load_image(found, channels, name=f"{where} ({path})", **kwargs)
    raise ImageLoadError(f"{where}: no image (empty cell)")


class LabelCodec:
    """Maps a label column's values to targets: an int class index, or for list labels a float32 multi-hot tensor
    of ``len(class_names)``. ``chunks()`` gives the column's values in lists (read only as far as needed: integer
    and string labels read them all, a ``ClassLabel`` up to the first labelled row)."""

    def __init__(self, features, column: str, chunks: Callable[[], Iterator[list]], name: str):
        feature = features[column]
        item = _list_item(feature)
        self.multi_label = item is not None
        base = item if self.multi_label else feature
        where = f"{name}: label column {column!r}"
        labels = _class_label(base)
        self.lookup: dict | None = None
        if labels is not None:
            self.class_names = list(labels.names)
        else:
            dtype = getattr(base, "dtype", None)
            if dtype not in (*_INT, "string", "large_string", "bool"):
                raise VitlabError(f"{where} is {feature}, not class labels (ClassLabel, integers or strings, or a "
                                  "list of them)")
            present = set().union(*(self._present(chunk) for chunk in chunks()))
            if not present:
                raise VitlabError(f"{where} is empty (no row has a label)")
            if dtype in ("string", "large_string"):
                self.class_names = sorted(present)
                self.lookup = {n: i for i, n in enumerate(self.class_names)}
            else:
                if min(present) < 0:
                    raise VitlabError(f"{where}: negative label {min(present)}")
                self.class_names = [str(i) for i in range(int(max(present)) + 1)]
        if labels is not None and not any(self._present(chunk, unlabelled=-1) for chunk in chunks()):
            raise VitlabError(f"{where} is empty (no row has a label)")
        self.num_classes = len(self.class_names)

    def _present(self, column: list, unlabelled=None) -> set:
        out = set()
        for value in column:
            items = value if self.multi_label and isinstance(value, list) else [value]
            out.update(v for v in items if v is not None and v != unlabelled)
        return out

    def _index(self, value) -> int:
        if self.lookup is not None:
            if value not in self.lookup:
                raise ValueError(f"label {value!r} is not a class")
            return self.lookup[value]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"label {value!r} is not a class index")
        if not 0 <= value < self.num_classes:
            raise ValueError(f"label {value} is not one of the {self.num_classes} classes" if value != -1
                             else "no label (-1)")
        return value

    def target(self, value):
        """The target for a label value; ValueError saying what is wrong."""
        if value is None:
            raise ValueError("no label")
        if not self.multi_label:
            return self._index(value)
        if not isinstance(value, list):
            raise ValueError(f"label {value!r} is not a list")
        hot = torch.zeros(self.num_classes, dtype=torch.float32)
        for v in value:
            hot[self._index(v)] = 1.0
        return hot

    def placeholder(self):
        """A target for a skipped row (dropped by the collate function with its image)."""
        return torch.zeros(self.num_classes, dtype=torch.float32) if self.multi_label else 0


class _Rows:
    """What both kinds share: the columns, the label codec, and decoding one row with vitlab's image guards.

    ``with_names`` (set by prediction, which needs no labels): each sample is ``(image, target, "NAME: row N")``
    and a row without a usable label keeps its image (with the placeholder target)."""

    with_names = False

    def _setup(self, resolved: Resolved, image_column: str | None, label_column: str | None, channels: int,
               on_error: str, max_pixels: int | None, chunks: Callable[[str], Iterator[list]]) -> None:
        if on_error not in ON_ERROR:
            raise InvalidValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.name, self.files, self.features = resolved.name, resolved.files, resolved.features
        self.image_column = find_image_column(self.features, image_column, self.name)
        self.label_column = find_label_column(self.features, label_column, self.image_column, self.name)
        self.codec = LabelCodec(self.features, self.label_column, lambda: chunks(self.label_column),
                                self.name)
        self.channels, self.on_error, self.max_pixels = channels, on_error, max_pixels
        self.transform: Callable | None = None
        self.sample_seed: Callable[[int], int] | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.codec.class_names)

    @property
    def num_classes(self) -> int:
        return self.codec.num_classes

    @property
    def multi_label(self) -> bool:
        return self.codec.multi_label

    def _image(self, value, where: str):
        return image_cell(value, where, self.channels, self.max_pixels, self.files[0].parent)

    def _sample(self, row: int, image_value, label_value):
        """(image, target) of one row, or (BadSample, placeholder) when it cannot be used and ``on_error='skip'``;
        plus the row's name with ``with_names``."""
        where = f"{self.name}: row {row}"
        sample = self._decoded(where, row, image_value, label_value)
        return (*sample, where) if self.with_names else sample

    def _decoded(self, where: str, row: int, image_value, label_value):
        try:
            target = self.codec.target(label_value)
        except ValueError as exc:
            if not self.with_names:  # predicting needs no label: the image is still used
                if self.on_error == "fail":
                    raise VitlabError(f"{where}: {exc}") from exc
                return BadSample(f"{where}: {exc}"), self.codec.placeholder()
            target = self.codec.placeholder()
        try:
            image = self._image(image_value, where)
        except ImageLoadError as exc:
            if self.on_error == "fail":
                raise
            return BadSample(str(exc)), target
        if self.transform is not None:
            if self.sample_seed is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.sample_seed(row))
                    image = self.transform(image)
            else:
                image = self.transform(image)
        return image, target


class HFImageDataset(_Rows, Dataset):
    """Random access to the rows of a Hugging Face source (arrow memory-mapped, parquet read into memory); indexing
    gives ``(image, target)`` as :class:`~vitlab.data.folder.ImageFolderDataset` does."""

    def __init__(self, resolved: Resolved, image_column: str | None = None, label_column: str | None = None,
                 channels: int = 3, on_error: str = "skip", max_pixels: int | None = None):
        def chunks(column: str) -> Iterator[list]:
            return (chunk.to_pylist() for chunk in self._table.column(column).chunks)

        first = find_image_column(resolved.features, image_column, resolved.name)
        label = find_label_column(resolved.features, label_column, first, resolved.name)
        self._table = read_columns(resolved.files, [first, label])
        self._setup(resolved, first, label, channels, on_error, max_pixels, chunks)

    def __len__(self) -> int:
        return self._table.num_rows

    def stored_labels(self) -> list:
        """Every row's label without reading an image: a class index, a tuple of class indices (multi-label), or
        None for a row without a usable label (which training skips)."""
        out = []
        for chunk in self._table.column(self.label_column).chunks:
            for value in chunk.to_pylist():
                try:
                    target = self.codec.target(value)
                except ValueError:
                    out.append(None)
                    continue
                out.append(tuple(torch.nonzero(target).flatten().tolist()) if self.multi_label else target)
        return out

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = self._table.column(self.image_column)[index].as_py()
        label = self._table.column(self.label_column)[index].as_py()
        return self._sample(index, image, label)


class HFStreamDataset(_Rows, IterableDataset):
    """The rows of a Hugging Face source read a piece at a time (see the module doc); ``rank`` / ``world_size``
    default to ``torch.distributed``'s. Call :meth:`set_epoch` each epoch. ``shuffle_buffer`` rows are shuffled while
    training (``sample_seed`` set); 0, or no ``sample_seed``, reads in order."""

    def __init__(self, resolved: Resolved, image_column: str | None = None, label_column: str | None = None,
                 channels: int = 3, on_error: str = "skip", max_pixels: int | None = None,
                 shuffle_buffer: int = 1000, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.pieces = list_pieces(resolved.files)

        def chunks(column: str) -> Iterator[list]:  # the label column alone, a piece at a time (a small read)
            return (read_piece(resolved.files, piece, [column]).column(0).to_pylist() for piece in self.pieces)

        self._setup(resolved, image_column, label_column, channels, on_error, max_pixels, chunks)
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return sum(p.rows for p in self.pieces)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def _buffer(self) -> int:
        return self.shuffle_buffer if self.sample_seed is not None else 0

    def _rows(self, slot: int, slots: int):
        """(row, image value, label value) of this slot, in stream order before the shuffle buffer."""
        pieces = list(self.pieces)
        if self._buffer:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(pieces)
        by_piece = len(pieces) >= slots
        columns = [self.image_column, self.label_column]
        for piece in pieces[slot::slots] if by_piece else pieces:
            table = read_piece(self.files, piece, columns)
            images, labels = table.column(0), table.column(1)
            for j in range(piece.rows):
                row = piece.first + j
                if by_piece or row % slots == slot:
                    yield row, images[j].as_py(), labels[j].as_py()
            del table, images, labels

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        rows = self._rows(slot, slots)
        if not self._buffer:
            for row, image, label in rows:
                yield self._sample(row, image, label)
            return
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 7919 + slot)
        buffer: list = []
        for item in rows:  # undecoded rows in the buffer: a row is decoded once, when it leaves
            buffer.append(item)
            if len(buffer) >= self._buffer:
                yield self._sample(*buffer.pop(rng.randrange(len(buffer))))
        rng.shuffle(buffer)
        for item in buffer:
            yield self._sample(*item)


def build_hf_dataset(spec: str | Path, split_names: Sequence[str], *, channels: int = 3, on_error: str = "skip",
                     max_pixels: int | None = None, image_column: str | None = None,
                     label_column: str | None = None, stream: str | None = None
                     ) -> HFImageDataset | HFStreamDataset:
    """The data set behind a Hugging Face source (:mod:`vitlab.data.hf`). ``split_names``: the split names tried in
    order when the source names none. ``stream``: ``on`` / ``off``, or ``auto`` (default): stream when the split's
    files are larger than 1 GiB. Arguments override the source string's ``?`` options."""
    parsed = parse_spec(spec)
    image_column = image_column or parsed.options.get("image")
    label_column = label_column or parsed.options.get("label")
    stream = stream or parsed.options.get("stream") or "auto"
    if stream not in STREAM_CHOICES:
        raise InvalidValueError(f"stream must be one of {', '.join(STREAM_CHOICES)}, got {stream!r}")
    resolved = resolve(parsed, split_names)
    if stream == "on" or (stream == "auto" and total_bytes(resolved.files) > STREAM_BYTES):
        return HFStreamDataset(resolved, image_column, label_column, channels, on_error, max_pixels)
    return HFImageDataset(resolved, image_column, label_column, channels, on_error, max_pixels)


__all__ = ["HFImageDataset", "HFStreamDataset", "LabelCodec", "build_hf_dataset", "find_image_column",
           "find_label_column", "image_cell"]
