"""Reading parquet and arrow files in place with pyarrow (installed with ``datasets``): whole, or a piece at a time.

A *piece* is a parquet row group or an arrow record batch: the unit a stream reads, so that memory holds one piece
(per DataLoader worker) however large the files are. Arrow files are memory-mapped (the IPC stream format
``datasets`` writes, or the IPC file format); parquet files are decoded. Any read failure is a
:class:`~vitlab.errors.VitlabError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import VitlabError


def _pa():
    import pyarrow as pa  # comes with the optional datasets dependency
    import pyarrow.parquet as pq

    return pa, pq


def _unreadable(path: Path, exc: BaseException) -> VitlabError:
    text = str(exc).strip().splitlines()
    return VitlabError(f"{path}: unreadable {path.suffix.lstrip('.') or 'table'} file ({text[0] if text else exc!r})")


def _open_arrow(path: Path):
    """(reader, is_file_format) over a memory map of an arrow file: the IPC stream format, else the file format."""
    pa, _ = _pa()
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source), False
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path))), True


def read_schema(path: Path):
    """The arrow schema of one parquet / arrow file (with the ``huggingface`` features metadata when present)."""
    _, pq = _pa()
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(str(path))
        reader, _ = _open_arrow(path)
        return reader.schema
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a readable table"
        raise _unreadable(path, exc) from exc


@dataclass(frozen=True)
class Piece:
    """Rows ``first .. first + rows - 1`` (row numbers of the whole split) in piece ``unit`` of ``files[file]``."""

    file: int
    unit: int
    rows: int
    first: int


def list_pieces(files: list[Path]) -> list[Piece]:
    """The pieces of ``files`` in row order, from parquet footers and arrow message headers (no data read)."""
    pieces, first = [], 0
    for i, path in enumerate(files):
        try:
            if path.suffix == ".parquet":
                _, pq = _pa()
                meta = pq.ParquetFile(str(path)).metadata
                counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            else:
                reader, file_format = _open_arrow(path)
                if file_format:
                    counts = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
                else:
                    counts = [batch.num_rows for batch in reader]
        except Exception as exc:  # a damaged footer or message: name the file
            raise _unreadable(path, exc) from exc
        for unit, rows in enumerate(counts):
            if rows:
                pieces.append(Piece(i, unit, rows, first))
                first += rows
    return pieces


def read_piece(files: list[Path], piece: Piece, columns: list[str]):
    """The ``columns`` of one piece as a pyarrow Table."""
    pa, pq = _pa()
    path = files[piece.file]
    try:
        if path.suffix == ".parquet":
            return pq.ParquetFile(str(path)).read_row_group(piece.unit, columns=columns)
        reader, file_format = _open_arrow(path)
        if file_format:
            batch = reader.get_batch(piece.unit)
        else:  # the stream format has no index: read past the messages before it (headers only, memory-mapped)
            batch = next(b for index, b in enumerate(reader) if index == piece.unit)
        return pa.Table.from_batches([batch]).select(columns)
    except Exception as exc:  # truncated or corrupt data surface here
        raise _unreadable(path, exc) from exc


def read_columns(files: list[Path], columns: list[str]):
    """The ``columns`` of all files as one pyarrow Table: arrow files memory-mapped (no copy), parquet decoded."""
    pa, pq = _pa()
    tables = []
    for path in files:
        try:
            if path.suffix == ".parquet":
                table = pq.read_table(str(path), columns=columns)
            else:
                reader, _ = _open_arrow(path)
                table = reader.read_all().select(columns)
        except KeyError as exc:
            raise VitlabError(f"{path}: no column {exc} (the files of one split must have the same columns)") from exc
        except Exception as exc:
            raise _unreadable(path, exc) from exc
        tables.append(table)
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise VitlabError(f"{files[0].parent}: the files have different column types ({exc})") from exc


def total_bytes(files: list[Path]) -> int:
    """Bytes of the files on disk (what decides streaming under ``stream=auto``)."""
    return sum(f.stat().st_size for f in files)
