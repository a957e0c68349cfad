"""Prediction files: the top-k classes of every image as a table, or the images' pooled features as an array.

Tables (``.csv``, ``.jsonl``, ``.parquet``; the same columns in each, so that ``pandas.read_csv``,
``read_json(lines=True)`` and ``read_parquet`` give the same frame): ``source`` (the file, or the data set's row),
``index_0 .. index_{k-1}`` (class indices, best first), ``label_0 ..`` (class names), ``prob_0 ..``
(probabilities), ``error`` (why the image could not be read; then the class cells are empty / null). Rows are
written as the predictions come, so a data set of any size takes little memory.

Features (``.safetensors``, ``.npz``, ``.parquet``): a float32 matrix (N, D), one row per readable image, in input
order, with the sources of its rows; unreadable images are left out and listed with their errors:

- ``.safetensors``: tensor ``features``; metadata ``sources`` and ``errors`` (JSON lists: strings, and
  ``{"source", "error"}`` objects), ``representation`` (``pre_logits``; an image-text model's joint-space unit
  embeddings: ``image_embeds``, or ``text_embeds`` whose sources are the texts);
- ``.npz``: arrays ``features``, ``sources`` (strings), ``error_sources`` and ``errors`` (``np.load`` reads them
  without pickle);
- ``.parquet``: columns ``source`` and ``features`` (a fixed-size list of D float32), the errors as JSON in the
  file's key-value metadata (``errors``).

Every file is written atomically (:mod:`vitlab.atomic`): a run that fails or is interrupted leaves no file. An
existing file is refused before any work (:func:`check_output`), as is an extension that is not one of these.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, check_folder
from ..checkpoints.files import write_safetensors
from ..errors import InvalidValueError, VitlabError
from .predict import Prediction

TABLE_FORMATS = (".csv", ".jsonl", ".parquet")
FEATURE_FORMATS = (".safetensors", ".npz", ".parquet")
PARQUET_ROWS = 4096  # rows per parquet row group written while predicting


@dataclass
class Written:
    """What a prediction file holds: its path, the rows written, the unreadable images (source, error)."""

    path: Path
    rows: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def check_output(path: str | os.PathLike, features: bool = False) -> str:
    """The format (its extension) to write ``path`` in; refuses, before any work, an existing file, an extension
    that is not one of :data:`TABLE_FORMATS` (:data:`FEATURE_FORMATS` with ``features``), a file in the way of its
    folder, and parquet without pyarrow."""
    path = Path(path)
    formats = FEATURE_FORMATS if features else TABLE_FORMATS
    suffix = path.suffix.lower()
    if suffix not in formats:
        what = "features" if features else "predictions"
        raise InvalidValueError(f"{path}: {what} are written as {', '.join(formats)} (the extension picks the "
                                "format)", options=("out",))
    if path.exists() or path.is_symlink():
        raise VitlabError(f"{path} exists; remove it or give another file name", options=("out",))
    check_folder(path.parent)
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise VitlabError(f"{path}: parquet files need pyarrow (pip install pyarrow, or vitlab[hf])",
                          options=("out",))
    return suffix


def table_columns(k: int) -> list[str]:
    """The columns of a predictions table with the top ``k`` classes."""
    return (["source"] + [f"index_{i}" for i in range(k)] + [f"label_{i}" for i in range(k)]
            + [f"prob_{i}" for i in range(k)] + ["error"])


def table_row(p: Prediction, k: int) -> list:
    """One prediction as the values of :func:`table_columns` (None where there is nothing)."""
    top = list(p.top) + [(None, None, None)] * (k - len(p.top))
    return ([p.source] + [t[0] for t in top] + [t[1] for t in top] + [t[2] for t in top] + [p.error])


def write_predictions(path: str | os.PathLike, predictions: Iterable[Prediction], k: int) -> Written:
    """Write ``predictions`` (top ``k`` classes each) to a CSV, JSONL or parquet table at ``path`` (the extension
    picks; see the module doc), atomically, as they come."""
    path = Path(path)
    suffix = check_output(path)
    written = Written(path)
    columns = table_columns(k)

    def rows():
        for p in predictions:
            if p.error is not None:
                written.errors.append((p.source, p.error))
            written.rows += 1
            yield table_row(p, k)

    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            _write_parquet_table(tmp, columns, rows(), k)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                if suffix == ".csv":
                    out = csv.writer(f)
                    out.writerow(columns)
                    for row in rows():  # repr of a float reads back exactly; None is an empty cell
                        out.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
                else:
                    for row in rows():
                        f.write(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n")
    return written


def _write_parquet_table(tmp: Path, columns: list[str], rows: Iterable[list], k: int) -> None:
    import pyarrow as pa  # optional: installed with datasets (the hf extra)
    import pyarrow.parquet as pq

    types = [pa.string()] + [pa.int64()] * k + [pa.string()] * k + [pa.float64()] * k + [pa.string()]
    schema = pa.schema(list(zip(columns, types)))
    with pq.ParquetWriter(tmp, schema) as out:
        chunk: list[list] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == PARQUET_ROWS:
                out.write_table(pa.Table.from_pylist([dict(zip(columns, r)) for r in chunk], schema=schema))
                chunk = []
        # always one (possibly empty) table: the file then has its schema even with no rows
        out.write_table(pa.Table.from_pylist([dict(zip(columns, r)) for r in chunk], schema=schema))


def write_features(path: str | os.PathLike, predictions: Iterable[Prediction],
                   metadata: dict[str, str] | None = None, representation: str = "pre_logits",
                   what: str = "image") -> Written:
    """Write the ``features`` of ``predictions`` (``iter_predictions(..., features=True)``) as one float32 matrix
    (N, D) with its rows' sources to a safetensors, npz or parquet file (see the module doc), atomically; the
    unreadable images are left out and listed. ``metadata``: extra string entries for safetensors / parquet
    (the checkpoint's name). ``representation`` is recorded with them (``pre_logits``; ``image_embeds`` /
    ``text_embeds``: an image-text model's joint-space unit embeddings, whose rows' sources are the image files or
    the texts themselves). Refuses a run in which no ``what`` (image) could be read."""
    path = Path(path)
    suffix = check_output(path, features=True)
    written = Written(path)
    rows, sources = [], []
    for p in predictions:
        if p.error is not None:
            written.errors.append((p.source, p.error))
        else:
            rows.append(p.features)
            sources.append(p.source)
    if not rows:
        raise VitlabError(f"{path}: not written: no {what} could be read")
    features = torch.stack(rows).float().contiguous()
    written.rows = len(rows)
    errors = [{"source": s, "error": e} for s, e in written.errors]
    meta = {**(metadata or {}), "representation": representation, "sources": json.dumps(sources),
            "errors": json.dumps(errors)}
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            write_safetensors({"features": features}, tmp, meta)
        elif suffix == ".npz":
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
                np.savez(f, features=features.numpy(), sources=np.array(sources, dtype=str),
                         error_sources=np.array([s for s, _ in written.errors], dtype=str),
                         errors=np.array([e for _, e in written.errors], dtype=str))
        else:
            import pyarrow as pa  # optional: installed with datasets (the hf extra)
            import pyarrow.parquet as pq

            dim = features.shape[1]
            column = pa.FixedSizeListArray.from_arrays(pa.array(features.numpy().reshape(-1)), dim)
            table = pa.table({"source": pa.array(sources, pa.string()), "features": column})
            kept = {k: v for k, v in meta.items() if k != "sources"}  # the sources are a column
            pq.write_table(table.replace_schema_metadata(kept), tmp)
    return written
