"""Hugging Face ``datasets`` data as vitlab data sets: a Hub dataset, a ``save_to_disk`` folder, parquet / arrow files.

Sources (``spec``):

- ``hf:org/name[:config][@revision]``: a Hub dataset through ``datasets.load_dataset`` (downloaded and prepared in
  the datasets cache, ``HF_DATASETS_CACHE``; ``HF_DATASETS_OFFLINE=1`` uses only what is cached there);
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- parquet or arrow files: one file, a glob, or a folder of them.

``#split`` after the source names the split explicitly (``hf:org/name#validation``); without it vitlab's split
(``train``, ``test``, ``val``) picks the first split the data has among its usual names. ``?image=COL&label=COL&
stream=auto|on|off`` after the source chooses the columns and the reading path (the command lines' ``--image-column``
/ ``--label-column`` / ``--stream`` write these); ``text=COL`` is the captions' column of image-text retrieval data
(:mod:`vitlab.data.captions`, ``--text-column``).

The image column is an ``Image`` feature (or a binary / ``{bytes, path}`` column named ``image`` / ``img``); the
label column a ``ClassLabel`` (class names from it), integers (classes ``0 .. max``), strings (sorted, as image
folders sort their class folders), or a list of any of those (multi-label: a float32 multi-hot target of the class
count). The images are read as raw bytes and decoded with :func:`vitlab.data.images.load_image` (truncation,
decompression bombs, 16-bit, alpha, EXIF), never with ``datasets``' own decoder.

Nothing is converted or copied: files and the ``datasets`` cache are read in place (memory-mapped arrow; parquet read
whole into memory for the random-access path, one row group at a time when streamed, :mod:`vitlab.data.hf_stream`).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidValueError, VitlabError
from .hf_tables import read_schema

HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".parquet", ".arrow")
STREAM_CHOICES = ("auto", "on", "off")
# above this many bytes of parquet / arrow data, ``stream=auto`` streams instead of reading for random access
STREAM_BYTES = 1 << 30
_OPTIONS = re.compile(r"\?((?:image|label|text|stream)=[^&?#]*(?:&(?:image|label|text|stream)=[^&?#]*)*)$")
INSTALL = "pip install 'vitlab[hf]' (or pip install datasets)"


def require_datasets():
    """The ``datasets`` module, or a one-line error saying how to install it."""
    try:
        import datasets  # optional dependency: only Hugging Face sources need it
    except ImportError as exc:
        raise VitlabError(f"Hugging Face data sources need the datasets library: {INSTALL}") from exc
    return datasets


# ----- the source string
@dataclass
class HFSpec:
    """A parsed source: ``target`` is a Hub repo (``hub``) or a local path / glob; ``split`` the explicit ``#split``;
    ``image`` / ``label`` / ``stream`` the ``?`` options."""

    text: str
    target: str
    hub: bool
    config: str | None = None
    revision: str | None = None
    split: str | None = None
    options: dict = field(default_factory=dict)


def _strip(spec: str) -> tuple[str, str | None, dict]:
    options: dict = {}
    match = _OPTIONS.search(spec)
    if match:
        for part in match.group(1).split("&"):
            key, _, value = part.partition("=")
            options[key] = value or None
        spec = spec[: match.start()]
    split = None
    if "#" in spec:
        spec, split = spec.rsplit("#", 1)
        split = split or None
    return spec, split, options


def parse_spec(spec: str | Path) -> HFSpec:
    """Parse ``hf:org/name[:config][@revision][#split][?options]`` or a local path with ``#split`` / options."""
    text = str(spec)
    base, split, options = _strip(text)
    hub = base.startswith(HF_PREFIX)
    target = base[len(HF_PREFIX):] if hub else base
    config = revision = None
    if hub and Path(target).expanduser().exists():
        hub = False  # hf:/path/to/saved: a local folder spelled with the prefix
    if hub:
        if "@" in target:
            target, revision = target.split("@", 1)
        if ":" in target:
            target, config = target.split(":", 1)
        if not target or target.count("/") > 1:
            raise InvalidValueError(f"{text}: a Hub dataset is hf:<repo>[:config][@revision], e.g. hf:org/name")
    if options.get("stream") not in (None, *STREAM_CHOICES):
        raise InvalidValueError(f"{text}: stream must be one of {', '.join(STREAM_CHOICES)}")
    return HFSpec(text, target, hub, config or None, revision or None, split, options)


def with_options(spec: str | None, image_column: str | None = None, label_column: str | None = None,
                 stream: str | None = None, text_column: str | None = None) -> str | None:
    """``spec`` with the command line's column / stream choices appended as ``?`` options when it is a Hugging Face
    source (other sources are returned unchanged)."""
    if spec is None or not any((image_column, label_column, stream, text_column)) or not looks_like_hf(spec):
        return spec
    base, split, options = _strip(str(spec))
    for key, value in (("image", image_column), ("label", label_column), ("text", text_column), ("stream", stream)):
        if value:
            options[key] = value
    return base + (f"#{split}" if split else "") + "?" + "&".join(f"{k}={v}" for k, v in options.items() if v)


def _table_files(path: str) -> list[Path] | None:
    """Parquet / arrow files named by ``path`` (a file, a glob, or a folder holding them, also under ``data/``), or
    None when it names none."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p] if p.suffix in TABLE_SUFFIXES else None
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in TABLE_SUFFIXES and f.is_file())
        return files or None
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p)) if f.endswith(TABLE_SUFFIXES))
        return files or None
    return None


def _is_saved(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def looks_like_hf(spec: str | Path) -> bool:
    """Whether ``spec`` names a Hugging Face source: ``hf:...``, a ``save_to_disk`` folder, or parquet / arrow
    files (a file, a glob, or a folder of them)."""
    base, _, _ = _strip(str(spec))
    if base.startswith(HF_PREFIX):
        return True
    p = Path(base).expanduser()
    if _is_saved(p):
        return True
    if p.is_dir():  # a folder of parquet / arrow files and nothing that looks like images or shards
        entries = [f for f in p.iterdir() if not f.name.startswith(".")]
        tables = [f for f in entries if f.suffix in TABLE_SUFFIXES]
        data_dir = p / "data"
        return bool(tables) and len(tables) == len([f for f in entries if f.is_file()]) or (
            data_dir.is_dir() and any(f.suffix in TABLE_SUFFIXES for f in data_dir.iterdir()))
    if any(c in base for c in "*?[") and not base.endswith(TABLE_SUFFIXES):  # a glob: all it matches are tables
        matched = glob.glob(str(p))
        return bool(matched) and all(m.endswith(TABLE_SUFFIXES) for m in matched)
    return base.endswith(TABLE_SUFFIXES)


# ----- resolving a source to files and features
@dataclass
class Resolved:
    """The split of a source: its arrow / parquet ``files`` in row order, its ``datasets.Features``, and ``name``
    (used in messages)."""

    name: str
    files: list[Path]
    features: object


def _pick_split(available: Sequence[str], spec: HFSpec, candidates: Sequence[str], name: str) -> str:
    if spec.split is not None:
        if spec.split not in available:
            raise VitlabError(f"{name}: no split {spec.split!r} (splits: {', '.join(available)})")
        return spec.split
    for candidate in candidates:
        if candidate in available:
            return candidate
    raise VitlabError(f"{name}: no {'/'.join(candidates[:2])} split (splits: {', '.join(available)}); "
                      f"name one with #split or give the evaluation data separately")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _from_dataset(ds, name: str) -> Resolved:
    """Files and features of an arrow-backed ``datasets.Dataset`` (read in place, memory-mapped)."""
    if getattr(ds, "_indices", None) is not None:
        raise VitlabError(f"{name}: the dataset holds an indices mapping (a select / shuffle / filter not yet "
                          "written out); save it with flatten_indices().save_to_disk(...) and use that folder")
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files:
        raise VitlabError(f"{name}: the dataset is held in memory only; save it with save_to_disk and use that folder")
    return Resolved(name, files, ds.features)


def _resolve_hub(spec: HFSpec, candidates: Sequence[str]) -> Resolved:
    datasets = require_datasets()
    name = HF_PREFIX + spec.target + (f":{spec.config}" if spec.config else "")
    try:  # all splits: load_dataset prepares them all in any case; the split is then picked by vitlab's rules
        loaded = datasets.load_dataset(spec.target, spec.config, revision=spec.revision)
    except Exception as exc:  # network, offline, missing config / revision: many types, one line each
        raise VitlabError(f"{name}{'@' + spec.revision if spec.revision else ''}: {_first_line(exc)}") from exc
    split = _pick_split(list(loaded), spec, candidates, name)
    return _from_dataset(loaded[split], f"{name}#{split}")


def _resolve_saved(path: Path, spec: HFSpec, candidates: Sequence[str]) -> Resolved:
    datasets = require_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged folder: missing state.json keys, unreadable arrow files
        raise VitlabError(f"{path}: not a readable save_to_disk folder ({_first_line(exc)})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = _pick_split(list(loaded), spec, candidates, str(path))
        return _from_dataset(loaded[split], f"{path}#{split}")
    if spec.split is not None:
        raise VitlabError(f"{path}: a single saved split; it has no split {spec.split!r}")
    return _from_dataset(loaded, str(path))


def _files_of_split(files: list[Path], spec: HFSpec, candidates: Sequence[str], name: str) -> list[Path]:
    """For a folder whose files carry split names (``train-00000-of-00002.parquet``, ``data/test-...``), the files of
    the split; otherwise all files (the split is not used, as for tar shards)."""
    def split_of(f: Path) -> str | None:
        stem = f.name.split(".")[0]
        head = re.split(r"[-_.]", stem, maxsplit=1)[0]
        return head if head in ("train", "training", "test", "val", "valid", "validation", "dev") else None

    named = {f: split_of(f) for f in files}
    available = sorted({s for s in named.values() if s})
    if not available:
        if spec.split is not None:
            raise VitlabError(f"{name}: no file names a split, so there is no split {spec.split!r}")
        return files
    split = _pick_split(available, spec, candidates, name)
    return [f for f in files if named[f] == split]


def resolve(spec: HFSpec, candidates: Sequence[str]) -> Resolved:
    """The files and features of the split of ``spec``; ``candidates`` are the split names tried in order when the
    source string names none."""
    if spec.hub:
        return _resolve_hub(spec, candidates)
    path = Path(spec.target).expanduser()
    if _is_saved(path):
        return _resolve_saved(path, spec, candidates)
    files = _table_files(spec.target)
    if files is None:
        raise VitlabError(f"{spec.target}: no parquet or arrow files")
    datasets = require_datasets()
    files = _files_of_split(files, spec, candidates, spec.target)
    schema = read_schema(files[0])
    try:
        features = datasets.Features.from_arrow_schema(schema)
    except Exception as exc:  # a schema datasets cannot map (e.g. an unsupported arrow type)
        raise VitlabError(f"{files[0]}: column types datasets cannot read ({_first_line(exc)})") from exc
    name = spec.target + (f"#{spec.split}" if spec.split else "")
    return Resolved(name, files, features)
