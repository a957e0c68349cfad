"""CSV and JSONL manifests: a file that lists image paths and their labels.

CSV: a header row, then one row per image. Columns (names are case-insensitive, others are ignored):

- ``path`` (or ``image``, ``file``, ``filename``): the image file, relative to the manifest's folder (or absolute);
- ``label``: one class name per image (single-label), or ``labels``: the image's class names separated by ``|``,
  possibly none (multi-label: the target is a multi-hot vector);
- ``split`` (optional): ``train`` / ``test`` / ``val`` ... per row; ``build_dataset(manifest, split)`` keeps the rows
  of that split (``test`` also takes ``val`` rows and back, as image-folder trees do). Without it every row belongs
  to whatever split is asked.

JSONL: one JSON object per line with the same keys; ``labels`` may be a list (``["cat", "dog"]``) or a ``|``-separated
string; numbers are taken as class names (``3`` is the class ``"3"``).

The class list: the ``classes`` given (a list, or a text file with one name per line), else ``classes.txt`` beside the
manifest, else the sorted unique labels of every row of the file (all splits, so that the splits of one manifest
agree; numerically when every label is an integer). A row whose label is not in a given list is an error naming the
manifest and its line.

Images are read as in image folders (:func:`~vitlab.data.images.load_sample`): a missing or unreadable file is a bad
sample, skipped and counted (``on_error='skip'``, its reason naming the manifest line) or stopping the run.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidValueError, VitlabError
from .folder import ON_ERROR, ImageFolderDataset

MANIFEST_SUFFIXES = (".csv", ".jsonl")
PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_SEPARATOR = "|"


def looks_like_manifest(spec: str | Path) -> bool:
    """Whether ``spec`` names a CSV or JSONL manifest file."""
    return str(spec).lower().endswith(MANIFEST_SUFFIXES)


def _read_rows(path: Path) -> tuple[list[tuple[int, list]], list[str]]:
    """(line number, the row's values in column order) for every non-blank row, and the lower-case column names
    (a JSONL file's: every key that occurs, in order of appearance)."""
    rows: list[tuple[int, list]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".jsonl":
                objects = []
                columns: dict[str, None] = {}
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise VitlabError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
                    if not isinstance(obj, dict):
                        raise VitlabError(f"{path} line {number}: not a JSON object")
                    obj = {str(k).lower(): v for k, v in obj.items()}
                    columns.update(dict.fromkeys(obj))
                    objects.append((number, obj))
                names = list(columns)
                return [(number, [obj.get(c) for c in names]) for number, obj in objects], names
            reader = csv.reader(f)
            try:
                header = [c.strip().lower() for c in next(reader, [])]
                for values in reader:
                    if any(values):  # blank lines are not rows
                        rows.append((reader.line_num, values))
            except csv.Error as exc:
                raise VitlabError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    except FileNotFoundError:
        raise VitlabError(f"{path}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VitlabError(f"{path}: cannot read the manifest ({exc})") from exc
    return rows, header


def _label_names(value, multi: bool, manifest: Path, number: int) -> list[str]:
    """The class names in one label cell (line ``number`` of ``manifest``, for the errors)."""
    if isinstance(value, str):
        if multi:
            return [part for part in map(str.strip, value.split(LABEL_SEPARATOR)) if part]
        text = value.strip()
        if text and LABEL_SEPARATOR not in text:
            return [text]
    where = f"{manifest} line {number}"
    if value is None or (isinstance(value, str) and not value.strip()):
        if multi:
            return []
        raise VitlabError(f"{where}: empty label")
    if isinstance(value, str):
        raise VitlabError(f"{where}: label {value.strip()!r} holds the separator '{LABEL_SEPARATOR}'; name the "
                          "column 'labels' for multi-label data")
    if isinstance(value, list):
        if not multi:
            raise VitlabError(f"{where}: a list of labels in the 'label' column; name it 'labels' for multi-label data")
        names = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise VitlabError(f"{where}: label {item!r} is not a class name")
            names.append(str(item).strip())
        return [n for n in names if n]
    if isinstance(value, bool) or not isinstance(value, int):
        raise VitlabError(f"{where}: label {value!r} is not a class name")
    return [str(value)]


def _sorted_classes(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def read_class_list(classes: str | Path | Sequence[str]) -> list[str]:
    """A class list given as names, or as a text file with one name per line (blank lines ignored)."""
    if isinstance(classes, (str, Path)):
        path = Path(classes)
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise VitlabError(f"class list {path}: cannot read it ({exc})") from exc
        where = str(path)
    else:
        names, where = [str(c) for c in classes], "the class list"
    if not names:
        raise VitlabError(f"{where}: no class names")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise VitlabError(f"{where}: class {dup!r} is listed twice")
    return names


def _resolve(cell: str, base: str) -> str:
    """A manifest's path cell as a file name: ``~`` expanded, relative paths taken from the manifest's folder
    (``os.path``, not ``Path``: a million rows stay quick)."""
    file = os.path.expanduser(cell) if cell.startswith("~") else cell
    return os.path.join(base, file) if not os.path.isabs(file) and base != "." else file


def unlabelled_manifest_files(path: str | Path, split_names: Sequence[str] | None = None) -> list[str] | None:
    """The image files a manifest without a label column lists (what prediction reads: labels are not needed),
    in its row order, the rows of ``split_names`` only when it has a ``split`` column; None when it has a label
    column (read it as a :class:`ManifestDataset`)."""
    manifest = Path(path).expanduser()
    rows, columns = _read_rows(manifest)
    if "label" in columns or "labels" in columns:
        return None
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise VitlabError(f"{manifest}: no path column (columns: {', '.join(map(str, columns)) or 'none'}); "
                          f"name the image column one of {', '.join(PATH_COLUMNS)}")
    path_at, split_at = columns.index(path_column), columns.index("split") if "split" in columns else None
    wanted = None if split_at is None or split_names is None else {s.lower() for s in split_names}
    files = []
    for number, values in rows:
        cell = values[path_at] if path_at < len(values) else None
        if cell is None or not str(cell).strip():
            raise VitlabError(f"{manifest} line {number}: empty {path_column}")
        split = values[split_at] if split_at is not None and split_at < len(values) else None
        if wanted is None or str(split or "").strip().lower() in wanted:
            files.append(_resolve(str(cell).strip(), str(manifest.parent)))
    if not files:
        raise VitlabError(f"{manifest}: no rows" + (f" of split {'/'.join(split_names[:2])}" if wanted else ""))
    return files


class ManifestDataset(ImageFolderDataset):
    """The images a CSV / JSONL manifest lists (see the module doc), with :class:`ImageFolderDataset`'s loading,
    bad-image handling and seeded transforms, so that every loader that reads image folders reads manifests.

    ``split_names``: keep the rows whose ``split`` cell is one of these (None: every row; ignored without a split
    column). ``classes``: the class list (names or a text file). Targets are class indices, or float32 multi-hot
    tensors (K,) when the manifest has a ``labels`` column (``multi_label``)."""

    def __init__(self, path: str | Path, split_names: Sequence[str] | None = None, *,
                 classes: str | Path | Sequence[str] | None = None, transform: Callable | None = None,
                 channels: int = 3, on_error: str = "skip", max_pixels: int | None = None):
        if on_error not in ON_ERROR:
            raise InvalidValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.manifest = Path(path).expanduser()
        rows, columns = _read_rows(self.manifest)
        if not rows:
            raise VitlabError(f"{self.manifest}: the manifest is empty (no rows)")
        path_column = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_column is None:
            raise VitlabError(f"{self.manifest}: no path column (columns: {', '.join(map(str, columns)) or 'none'}); "
                              f"name the image column one of {', '.join(PATH_COLUMNS)}")
        if "labels" in columns:
            label_column, self.multi_label = "labels", True
        elif "label" in columns:
            label_column, self.multi_label = "label", False
        else:
            raise VitlabError(f"{self.manifest}: no label column (columns: {', '.join(map(str, columns))}); name it "
                              "'label' (one class per image) or 'labels' (several, separated by '|')")
        def column(name: str) -> int | None:
            return columns.index(name) if name in columns else None

        path_at, label_at, split_at = column(path_column), column(label_column), column("split")
        parsed = []
        for number, values in rows:
            width = len(values)
            cell = values[path_at] if path_at < width else None
            if cell is None or not str(cell).strip():
                raise VitlabError(f"{self.manifest} line {number}: empty {path_column}")
            label = values[label_at] if label_at < width else None
            split = values[split_at] if split_at is not None and split_at < width else None
            parsed.append((number, str(cell).strip(), _label_names(label, self.multi_label, self.manifest, number),
                           str(split or "").strip().lower()))
        if classes is None and (self.manifest.parent / "classes.txt").is_file():
            classes = self.manifest.parent / "classes.txt"
        if classes is not None:
            names = read_class_list(classes)
            source = f"the class list {classes}" if isinstance(classes, (str, Path)) else "the class list given"
        else:
            names = _sorted_classes({n for _, _, labels, _ in parsed for n in labels})
            source = "the manifest"
            if not names:
                raise VitlabError(f"{self.manifest}: no row has a label")
        self.has_split_column = "split" in columns
        if self.has_split_column and split_names is not None:
            wanted = {s.lower() for s in split_names}
            present = sorted({s for *_, s in parsed})
            parsed = [p for p in parsed if p[3] in wanted]
            if not parsed:
                raise VitlabError(f"{self.manifest}: no rows of split {'/'.join(split_names[:2])} (its split "
                                  f"column has {', '.join(present)})")
        index = {name: i for i, name in enumerate(names)}
        base = str(self.manifest.parent)
        samples, lines = [], []
        for number, cell, labels, _ in parsed:
            for name in labels:
                if name not in index:
                    raise VitlabError(f"{self.manifest} line {number}: label {name!r} is not in {source} "
                                      f"({len(names)} classes)")
            file = _resolve(cell, base)
            ids = tuple(sorted({index[n] for n in labels}))
            samples.append((file, ids if self.multi_label else ids[0]))
            lines.append(number)
        # the attributes torchvision's DatasetFolder sets and ImageFolderDataset reads
        torch.utils.data.Dataset.__init__(self)
        self.root = str(self.manifest.parent)
        self.transform, self.target_transform, self.loader = transform, None, self._load
        self.classes, self.class_to_idx = list(names), index
        self.samples = samples
        self.imgs = samples
        self.targets = [s[1] for s in samples]
        self.channels, self.on_error, self.max_pixels = channels, on_error, max_pixels
        self.sample_seed = None
        self.lines = np.asarray(lines, dtype=np.int64)  # the manifest line of each sample (compact for big files)

    def _name(self, index: int, path: str) -> str:
        shown = path.removeprefix(self.root + os.sep)  # as the manifest gives it, when relative
        return f"{self.manifest} line {int(self.lines[index])}: {shown}"

    def _target(self, label):
        if not self.multi_label:
            return label
        target = torch.zeros(len(self.classes), dtype=torch.float32)
        target[list(label)] = 1.0
        return target
