"""Atomic file writes for benchmark reports and exported models: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(path: str | os.PathLike) -> Path:
    """A new empty temp file in ``path``'s folder (created if missing), to be renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit(tmp: Path, path: str | os.PathLike) -> None:
    """fsync ``tmp`` and rename it onto ``path``."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = temp_beside(path)
    try:
        tmp.write_text(text)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
