"""Atomic file writes, used by every part of vitlab that writes a file a user keeps.

A file is written under a temporary name in its own folder, flushed to disk (fsync) and renamed onto its final name
with ``os.replace``; the rename is made durable by an fsync of the folder. Readers therefore see the old file or the
whole new one, never a part, and a process killed mid-write leaves the previous file untouched (plus, at worst, a
``.NAME.*.tmp`` file that :func:`remove_stale_temporaries` clears). Folders are built the same way
(:func:`atomic_directory`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import VitlabError


class WriteError(VitlabError, OSError):
    """A file or folder that cannot be written (read-only, a file in the way, a full disk): one line at the CLI, and
    still the OSError Python callers caught before."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``path`` (created if missing); when the block succeeds, fsync
    it and ``os.replace`` it onto ``path``. On any error the temporary file is removed and ``path`` is left as it
    was. The file gets the permissions a plain ``open`` would give it (``mkstemp`` makes it private)."""
    path = Path(path)
    try:
        _make_parent(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:  # a full disk, a quota, an I/O error: the previous file is still in place
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}; the previous file, if any, is unchanged"
                          ) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def make_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) if missing; a file in the way raises :class:`WriteError` naming
    it (``mkdir`` would only say "File exists", as a traceback)."""
    path = Path(path)
    check_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def check_folder(path: str | os.PathLike) -> None:
    """Refuse, before any work is done, a folder path with a file in the way (the path itself or a parent): the
    :class:`WriteError` :func:`make_folder` would raise at the end. Creates nothing."""
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise WriteError(f"cannot write {path}: {blocker} is a file, not a folder")


def check_new_file(path: str | os.PathLike, suffix: str, what: str) -> Path:
    """Refuse, before any work, an output ``path`` that does not end in ``suffix``, that exists (``what`` is never
    written over a file: remove it or choose another name) or whose folder has a file in the way. Returns the
    path. The errors name the option ``out``."""
    path = Path(path)
    if path.suffix != suffix:
        raise VitlabError(f"{path}: {what} is written as a {suffix} file; use a name ending in {suffix}",
                          options=("out",))
    if path.exists() or path.is_symlink():
        raise VitlabError(f"{path} already exists; remove it or choose another name ({what} never replaces a file)",
                          options=("out",))
    check_folder(path.parent)
    return path


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing one of ``folder`` and its parents when it is not a folder (None: the way is clear)."""
    for place in [folder, *folder.parents]:
        if place.exists():
            return None if place.is_dir() else place
    return None


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder; a file in the way is named (``mkdir`` would only say "File exists")."""
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise NotADirectoryError(20, f"{blocker} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: build it under a temporary name next to ``path``, then swap it in (an
    existing folder at ``path`` is replaced only once the new one is complete)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VitlabError(f"{path}: exists and is not a directory")
    try:
        _make_parent(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file() and not child.is_symlink():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if old is not None and not path.exists():  # put the previous folder back
            os.replace(old / path.name, path)
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}; the previous folder, if any, is unchanged"
                          ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating the folder); an OS error becomes a one-line
    :class:`VitlabError` naming the file. Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes killed mid-way left in ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(".*.tmp") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
