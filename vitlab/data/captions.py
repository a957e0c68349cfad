"""Captioned images: images with one or more texts each, for image-text retrieval (Flickr30k, COCO captions).

Two sources:

- a CSV / JSONL manifest (:mod:`vitlab.data.manifest`'s path column and ``split`` column) with a text column named
  ``text``, ``caption`` or ``captions``: one caption per row, and an image listed on several rows has several
  captions (Flickr30k and COCO have five per image); a JSONL cell may also be a list of captions;
- a Hugging Face source (:mod:`vitlab.data.hf`) with an image column and a text column (``text_column``, or the
  ``?text=COL`` option; default: the first of ``caption``, ``captions``, ``text``, ``texts``, ``sentences``): one
  image per row, the cell a caption or a list of captions.

:class:`CaptionedImages` holds the distinct images (in order of first appearance), the captions (in file order) and
``text_image``: the image of each caption. Indexing it gives ``(image, image index)``, the image prepared with
``transform``, or a :class:`~vitlab.data.folder.BadSample` when it cannot be read (``on_error='skip'``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import InvalidValueError, VitlabError
from .folder import ON_ERROR, BadSample
from .hf import looks_like_hf, parse_spec, require_datasets, resolve
from .hf_dataset import find_image_column, image_cell
from .hf_tables import read_columns
from .images import ImageLoadError, load_sample
from .manifest import PATH_COLUMNS, _read_rows, _resolve, looks_like_manifest

TEXT_COLUMNS = ("text", "caption", "captions")
HF_TEXT_COLUMNS = ("caption", "captions", "text", "texts", "sentences")


def _captions_of(value, where: str) -> list[str]:
    """The captions in one text cell: a string, or a list of strings (blank ones dropped)."""
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if item is None:
            continue
        if not isinstance(item, str):
            raise VitlabError(f"{where}: caption {item!r} is not text")
        if item.strip():
            texts.append(item.strip())
    return texts


class CaptionedImages(Dataset):
    """Distinct images and their captions. ``images``: what each image is read from (a file, or a row number of a
    Hugging Face table); ``sources``: how results name each image; ``texts``: the captions; ``text_image``: int64
    (M,) the image index of each caption. Every image has at least one caption. Subclasses read image ``i`` in
    :meth:`_read` (methods, not closures: DataLoader workers may need to pickle the data set)."""

    def __init__(self, name: str, images: list, sources: list[str], texts: list[str], text_image: Sequence[int],
                 channels: int = 3, on_error: str = "skip", max_pixels: int | None = None):
        if on_error not in ON_ERROR:
            raise InvalidValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.name, self.images, self.sources, self.texts = name, images, sources, texts
        self.text_image = np.asarray(text_image, dtype=np.int64)
        self.channels, self.on_error, self.max_pixels = channels, on_error, max_pixels
        self.transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        try:
            image = self._read(index)
        except ImageLoadError as exc:
            if self.on_error == "fail":
                raise
            return BadSample(str(exc)), index
        return (self.transform(image) if self.transform is not None else image), index


class _ManifestCaptions(CaptionedImages):
    def __init__(self, manifest: Path, files: list[str], lines: list[int], texts: list[str], text_image: list[int],
                 **kwargs):
        super().__init__(str(manifest), files, files, texts, text_image, **kwargs)
        self.lines, self.base = lines, str(manifest.parent)

    def _read(self, index: int):
        file = self.images[index]
        kwargs = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
        shown = file.removeprefix(self.base + os.sep)  # as the manifest gives it, when relative
        return load_sample(file, self.channels, name=f"{self.name} line {self.lines[index]}: {shown}", **kwargs)


class _TableCaptions(CaptionedImages):
    def __init__(self, name: str, column, base: Path, texts: list[str], text_image: list[int], **kwargs):
        rows = list(range(len(column)))
        super().__init__(name, rows, [f"{name}: row {i}" for i in rows], texts, text_image, **kwargs)
        self.column, self.base = column, base

    def _read(self, index: int):
        return image_cell(self.column[index].as_py(), f"{self.name}: row {index}", self.channels, self.max_pixels,
                          self.base)


def captioned_manifest(path: str | Path, split_names: Sequence[str] | None = None, *, text_column: str | None = None,
                       channels: int = 3, on_error: str = "skip", max_pixels: int | None = None
                       ) -> CaptionedImages:
    """The captioned images of a CSV / JSONL manifest (see the module doc); ``split_names`` as
    :class:`~vitlab.data.manifest.ManifestDataset` takes them."""
    manifest = Path(path).expanduser()
    rows, columns = _read_rows(manifest)
    listed = ", ".join(map(str, columns)) or "none"
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise VitlabError(f"{manifest}: no path column (columns: {listed}); name the image column one of "
                          f"{', '.join(PATH_COLUMNS)}")
    if text_column is not None:
        text = text_column.lower()
        if text not in columns:
            raise VitlabError(f"{manifest}: no text column {text_column!r} (columns: {listed})",
                              options=("text_column",))
    else:
        text = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text is None:
            raise VitlabError(f"{manifest}: no text column (columns: {listed}); name the captions' column one of "
                              f"{', '.join(TEXT_COLUMNS)}")
    path_at, text_at = columns.index(path_column), columns.index(text)
    split_at = columns.index("split") if "split" in columns else None
    wanted = None if split_at is None or split_names is None else {s.lower() for s in split_names}
    index: dict[str, int] = {}
    files, lines, texts, text_image = [], [], [], []
    base = str(manifest.parent)
    for number, values in rows:
        split = values[split_at] if split_at is not None and split_at < len(values) else None
        if wanted is not None and str(split or "").strip().lower() not in wanted:
            continue
        cell = values[path_at] if path_at < len(values) else None
        if cell is None or not str(cell).strip():
            raise VitlabError(f"{manifest} line {number}: empty {path_column}")
        captions = _captions_of(values[text_at] if text_at < len(values) else None, f"{manifest} line {number}")
        if not captions:
            raise VitlabError(f"{manifest} line {number}: empty {text}")
        file = _resolve(str(cell).strip(), base)
        if file not in index:
            index[file] = len(files)
            files.append(file)
            lines.append(number)
        texts.extend(captions)
        text_image.extend([index[file]] * len(captions))
    if not files:
        raise VitlabError(f"{manifest}: no rows" + (f" of split {'/'.join(split_names[:2])}" if wanted else ""))
    return _ManifestCaptions(manifest, files, lines, texts, text_image, channels=channels, on_error=on_error,
                             max_pixels=max_pixels)


def captioned_hf(spec: str, split_names: Sequence[str], *, image_column: str | None = None,
                 text_column: str | None = None, channels: int = 3, on_error: str = "skip",
                 max_pixels: int | None = None) -> CaptionedImages:
    """The captioned images of a Hugging Face source (see the module doc): one image per row."""
    parsed = parse_spec(spec)
    resolved = resolve(parsed, split_names)
    features, name = resolved.features, resolved.name
    image = find_image_column(features, image_column or parsed.options.get("image"), name)
    text = text_column or parsed.options.get("text")
    if text is None:
        lowered = {c.lower(): c for c in features if c != image}
        text = next((lowered[n] for n in HF_TEXT_COLUMNS if n in lowered), None)
        if text is None:
            raise VitlabError(f"{name}: no text column among {', '.join(features)}; choose one with text_column",
                              options=("text_column",))
    elif text not in features:
        raise VitlabError(f"{name}: no text column {text!r} (columns: {', '.join(features)})",
                          options=("text_column",))
    table = read_columns(resolved.files, [image, text])
    texts, text_image = [], []
    for row, value in enumerate(table.column(text).to_pylist()):
        captions = _captions_of(value, f"{name}: row {row}")
        if not captions:
            raise VitlabError(f"{name}: row {row} has no caption in column {text!r}")
        texts.extend(captions)
        text_image.extend([row] * len(captions))
    if not table.num_rows:
        raise VitlabError(f"{name}: no rows")
    return _TableCaptions(name, table.column(image), resolved.files[0].parent, texts, text_image, channels=channels,
                          on_error=on_error, max_pixels=max_pixels)


def build_captioned(spec: str | Path, split_names: Sequence[str] = ("test",), *, text_column: str | None = None,
                    image_column: str | None = None, channels: int = 3, on_error: str = "skip",
                    max_pixels: int | None = None) -> CaptionedImages:
    """Captioned images from a manifest or a Hugging Face source (the module doc); ``split_names``: the split names
    tried in order (a manifest's ``split`` column, a Hugging Face source's splits)."""
    text = str(spec)
    if looks_like_manifest(text):
        if image_column is not None:
            raise VitlabError(f"{text}: image_column is for Hugging Face sources; a manifest's image column is one "
                              f"of {', '.join(PATH_COLUMNS)}", options=("image_column",))
        return captioned_manifest(text, split_names, text_column=text_column, channels=channels,
                                  on_error=on_error, max_pixels=max_pixels)
    if looks_like_hf(text):
        require_datasets()
        return captioned_hf(text, split_names, image_column=image_column, text_column=text_column,
                            channels=channels, on_error=on_error, max_pixels=max_pixels)
    raise VitlabError(f"{text}: captioned images are a .csv / .jsonl manifest with a text column "
                      f"({', '.join(TEXT_COLUMNS)}) or a Hugging Face source with one")


def captioned_files(spec: str | Path, split_names: Sequence[str] | None = None) -> list[str] | None:
    """The distinct image files of a captions manifest (a ``.csv`` / ``.jsonl`` with a text column and no label
    column), in order of first appearance; None for anything else (read it as other image data)."""
    if not looks_like_manifest(spec):
        return None
    _, columns = _read_rows(Path(spec).expanduser())
    if "label" in columns or "labels" in columns or not any(c in columns for c in TEXT_COLUMNS):
        return None
    return captioned_manifest(spec, split_names).images


def read_texts(path: str | Path, split_names: Sequence[str] | None = None, text_column: str | None = None
               ) -> list[str]:
    """Texts to embed: a captions manifest's text column (``.csv`` / ``.jsonl``, every caption in file order, the
    rows of ``split_names`` when it has a split column), or any other file as UTF-8 text, one per line (blank lines
    skipped)."""
    if looks_like_manifest(path):
        return captioned_manifest(path, split_names, text_column=text_column).texts
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VitlabError(f"{file}: no such text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VitlabError(f"{file}: not a readable UTF-8 text file ({exc.__class__.__name__})") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise VitlabError(f"{file}: no texts in it (one per line)")
    return texts

